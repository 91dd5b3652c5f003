import torch

# One thread per test process: the tests use small tensors, where a second thread costs more in
# synchronisation than it gains, and on a busy 2-core machine two threads per process stall.
torch.set_num_threads(1)
