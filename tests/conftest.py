import dataclasses

import torch

import model

# One thread per test process: the tests use small tensors, where a second thread costs more in
# synchronisation than it gains, and on a busy 2-core machine two threads per process stall.
torch.set_num_threads(1)


def tiny(seed=0, **changes):
    """The tests' one small model: model.PRESETS["tiny"] (2 blocks, dim 64, GQA) with a seeded random init,
    as train.py builds it for --init tiny --seed SEED; `changes` replace ModelArgs fields."""
    torch.manual_seed(seed)
    return model.Transformer(dataclasses.replace(model.PRESETS["tiny"], **changes))
