import dataclasses
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model

# One thread per test process: the tests use small tensors, where a second thread costs more in
# synchronisation than it gains, and on a busy 2-core machine two threads per process stall.
torch.set_num_threads(1)


def tiny(seed=0, **changes):
    """The tests' one small model: model.PRESETS["tiny"] (2 blocks, dim 64, GQA) with a seeded random init,
    as train.py builds it for --init tiny --seed SEED; `changes` replace ModelArgs fields."""
    torch.manual_seed(seed)
    return model.Transformer(dataclasses.replace(model.PRESETS["tiny"], **changes))


class HostSyncs(TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: reading a value (item, bool(t),
    float(t), `if t`: aten._local_scalar_dense; tolist), an output whose size depends on the values (nonzero,
    masked_select, unique, a boolean index), and torch.equal. On the CPU these cost nothing, which is why
    the tests count them: a CPU run shows what a CUDA run would wait for. (Not counted: host -> device
    copies, which a CPU run cannot show.)"""
    SIZE_FROM_VALUES = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten.equal",
                        "aten._local_scalar_dense", "aten.repeat_interleave.Tensor")

    def __enter__(self):
        self.ops, tolist = [], torch.Tensor.tolist
        self._tolist = tolist

        def counted(t):
            self.ops.append("tolist")
            return tolist(t)
        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in tree_leaves(args[1]))
        if name.startswith(self.SIZE_FROM_VALUES) or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_syncs():
    return HostSyncs()


class LiveBytes(TorchDispatchMode):
    """The peak, over the ops run inside it, of the bytes held by tensor storages that those ops allocated and
    that are still alive: what a GPU's allocator would report as memory allocated. A storage counts from the
    op that creates it (a view, an in-place op or a memory-mapped file allocates nothing) until the last
    tensor on it dies: weakrefs to the storage objects, which live exactly as long as their memory."""

    def __init__(self):
        super().__init__()
        self.storages, self.peak = {}, 0

    def now(self):
        self.storages = {p: (ref, n) for p, (ref, n) in self.storages.items() if ref() is not None}
        return sum(n for _, n in self.storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if s.data_ptr() not in inputs and s.nbytes():
                    self.storages[s.data_ptr()] = (weakref.ref(s), s.nbytes())
        self.peak = max(self.peak, self.now())
        return out
