"""LoRA adapters in plain PyTorch, the reference policy mu for free, and a 4-bit (NF4) frozen base.

LoRA (Hu et al. 2021, arXiv:2106.09685 §4.1): freeze W [out, in] and learn a low-rank update,
    y = x W^T + (alpha / r) * x A^T B^T,      A [r, in], B [out, r],
so only r * (in + out) numbers per layer train. B starts at zero, so a fresh adapter IS the base
model; with the adapters switched off (`disabled`) the model is the frozen reference policy mu of
DPO / NCA, and no second copy of the weights is ever held.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314 §3): keep the frozen W as 4-bit NormalFloat (NF4)
codes with one absmax scale per block of 64 weights, dequantise on the fly, train LoRA on top.

    model = inject(model, targets=("q", "v"), r=16, alpha=32.0)   # only lora_A / lora_B train
    quantize_4bit(model)                                          # optional: NF4 frozen base
    with torch.no_grad(), disabled(model):
        ref_logits = model(tokens)                                # log mu, same weights
    save_adapter(model, "adapter.pt")
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import atomic_write, torch_load

# short target names -> the Meta reference attribute names in model.py (w1 = gate, w3 = up, w2 = down)
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}


# ----------------------------------------------------------------------------- NF4 (QLoRA §3)

def nf4_levels() -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA §3).

    8 positive levels from quantiles evenly spaced in [0.5, delta], 7 negative ones from one fewer
    (so 0 is a level and the code is asymmetric), delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 keeps the
    outermost quantile finite. Same construction as bitsandbytes' create_normal_map.
    """
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])   # 8 > 0
    neg = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 < 0
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (v / v.max()).float()


NF4 = nf4_levels()                                                     # [16]
# both values of a packed byte (high nibble first): dequantising is one gather of 2 values per byte
NF4_PAIRS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], dim=-1)  # [256, 2]


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed uint8 [n/2]: two 4-bit codes per byte, absmax bf16 [n_blocks]).

    The absmax scale is kept in bf16 (0.25 bit per weight); QLoRA double-quantises it to 8 bits
    (0.127 bit), a further 3% we skip for simplicity: 16 / 4.25 = 3.8x smaller than bf16.
    """
    # one float32 copy of w, scaled in place, and the int32 codes: quantising a weight as it is loaded needs
    # 8 bytes per number beyond it, less than a layer in float32 (train.py --quantize 4bit's load peak)
    flat = w.detach().to(torch.float32, copy=True).reshape(-1)
    if flat.numel() % block_size:
        flat = F.pad(flat, (0, -flat.numel() % block_size))
    blocks = flat.view(-1, block_size)                                        # [n_blocks, block_size]
    absmax = torch.linalg.vector_norm(blocks, math.inf, dim=1)                # max |w| of each block
    absmax = absmax.clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    x = blocks.div_(absmax.float()[:, None])                                  # in [-1, 1] (up to bf16 rounding)
    levels = NF4.to(w.device)
    codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2, out_int32=True).to(torch.uint8).view(-1)  # nearest level
    return codes[0::2] << 4 | codes[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype, pairs: torch.Tensor = NF4_PAIRS) -> torch.Tensor:
    """pairs: NF4_PAIRS on packed's device (LoRALinear's buffer nf4_pairs); elsewhere it is copied there first."""
    # index_select, not NF4_PAIRS[idx]: the same gather, 2.5x faster on CPU
    x = pairs.to(packed.device).index_select(0, packed.int()).view(absmax.numel(), -1)  # [n_blocks, block_size]
    return (x * absmax.float()[:, None]).view(-1)[: math.prod(shape)].view(shape).to(dtype)


class NF4Matmul(torch.autograd.Function):
    """x W^T + bias with W dequantised in forward and again in backward. Plain F.linear would save the
    dequantised W [out, in] for backward: a full 16-bit copy of every frozen layer held until backward,
    undoing the memory cut. W and bias are frozen, so only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, packed, absmax, pairs, bias, shape):
        ctx.save_for_backward(packed, absmax, pairs)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(packed, absmax, shape, x.dtype, pairs), bias)

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax, pairs = ctx.saved_tensors
        return grad_y @ dequantize_nf4(packed, absmax, ctx.shape, grad_y.dtype, pairs), None, None, None, None, None


# ----------------------------------------------------------------------------- the LoRA layer

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; drop-in for the module it replaces."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # the base tensors themselves, not copies: the state-dict keys stay `...wq.weight`, and a model
        # built on the meta device or sharded (FSDP2) keeps working
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias.requires_grad_(False) if base.bias is not None else None)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))   # [r, in]
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))  # [out, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("weight_nf4", None)     # set by quantize_4bit, which then drops .weight
        self.register_buffer("weight_absmax", None)
        self.register_buffer("nf4_pairs", None, persistent=False)  # NF4_PAIRS on the codes' device
        self.enabled, self.merged = True, False
        self.reset_parameters()

    def reset_parameters(self):
        # A like nn.Linear's own init (as Microsoft's loralib), B = 0: the update B A starts at exactly 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling   # [out, in]

    def forward(self, x):
        if self.weight_nf4 is not None:
            shape = (self.out_features, self.in_features)
            y = NF4Matmul.apply(x, self.weight_nf4, self.weight_absmax, self.nf4_pairs, self.bias, shape)
        else:
            y = F.linear(x, self.weight, self.bias)      # exactly nn.Linear's forward: disabled == base
        if not self.enabled or self.merged:
            return y
        # [..., in] -> [..., r] -> [..., out]: never forms the [out, in] product B A
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self):
        nf4 = ", nf4" if self.weight_nf4 is not None else ""
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}{nf4}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def check(r, alpha, dropout=0.0, targets=tuple(TARGETS)) -> list[str]:
    """The adapters' settings, checked in one place (inject, and train.py's flags before any work):
    the target list, as short names."""
    targets = targets.split(",") if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {targets}: unknown {unknown}; expected a non-empty subset of {list(TARGETS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:  # r sizes lora_A / lora_B
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0 (the update is scaled by alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")
    return targets


def inject(model: nn.Module, targets=tuple(TARGETS), r: int = 16, alpha: float = 32.0,
           dropout: float = 0.0) -> nn.Module:
    """Replace every nn.Linear named by `targets` (e.g. layers[i].attention.wq for "q") by a LoRALinear,
    in place; freeze everything else. targets may be a comma-separated string, "q,v"."""
    targets = check(r, alpha, dropout, targets)
    if lora_modules(model):
        raise ValueError("inject(): the model already has LoRA adapters")
    names = {TARGETS[t] for t in targets}
    hits = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
            if name in names and isinstance(child, nn.Linear)]
    if missing := names - {name for _, name in hits}:
        raise ValueError(f"inject(): the model has no nn.Linear named {sorted(missing)} for targets {targets}")
    model.requires_grad_(False)                       # the base is frozen; only the new adapters train
    for parent, name in hits:
        setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout))
    return model


def _modules_or_raise(model, what):
    if not (mods := lora_modules(model)):
        raise ValueError(f"{what}: the model has no LoRA adapters; call lora.inject(model, ...) first")
    return mods


@contextmanager
def disabled(model: nn.Module):
    """Adapters off: the model computes the frozen base exactly, i.e. the reference policy mu."""
    mods = _modules_or_raise(model, "disabled()").values()
    if any(m.merged for m in mods):
        raise ValueError("disabled(): the adapters are merged into the base weights; call lora.unmerge(model) first")
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(mods, before):
            m.enabled = enabled


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """W <- W + (alpha/r) B A: plain linear layers again, for export and fast generation. While merged
    the adapters get no gradient (merge after training); unmerge subtracts the same update."""
    for name, m in _modules_or_raise(model, "merge()").items():
        if m.weight_nf4 is not None:
            raise ValueError(f"merge(): {name} has a 4-bit base; merging would requantise W + BA and lose "
                             "most of the update. Load the 16-bit base, load_adapter, then merge.")
        if not m.enabled:  # merged inside disabled(): the model would compute W + BA where mu was promised
            raise ValueError("merge(): the adapters are switched off (inside lora.disabled); merge outside it")
        if not m.merged:
            m.weight.copy_(m.weight.float() + m.delta_weight())
            m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """W <- W - (alpha/r) B A. Not exact: W + BA - BA is W only up to two roundings, each of relative
    size 2^-24 in float32 but 2^-8 in bf16, so after merge / unmerge disabled() gives mu only approximately.
    Restoring W exactly would mean holding a second copy of every adapted weight while merged; for the
    exact mu, merge a copy of the model (as train.py's export does) or reload the base weights."""
    for m in _modules_or_raise(model, "unmerge()").values():
        if m.merged:
            m.weight.copy_(m.weight.float() - m.delta_weight())
            m.merged = False
    return model


def adapter_state(state: dict) -> dict:
    """The adapters' tensors (lora_A, lora_B) of a model's state dict: all that a LoRA run trains and saves."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def _merged(w, A, B, scaling):
    return (w.float() + (B.float() @ A.float()) * scaling).to(w.dtype)  # one [out, in] float32 product


@torch.no_grad()
def merged_state(state: dict, scaling: float) -> dict:
    """The state dict of the plain model: each adapted W <- W + scaling * B A in W's own dtype, lora_A and
    lora_B dropped. Works on tensors, not modules, one layer at a time: exporting a 7B needs one [out, in]
    float32 product beyond the weights, never a float32 copy of the model."""
    adapters = adapter_state(state)
    out = {k: v for k, v in state.items() if k not in adapters}
    for key in adapters:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            if f"{name}.weight" not in out:
                raise ValueError(f"merged_state: {name} has adapters but no base weight {name}.weight "
                                 "(a 4-bit base cannot be merged into: merge into the 16-bit base)")
            out[f"{name}.weight"] = _merged(out[f"{name}.weight"], state[key], state[f"{name}.lora_B"], scaling)
    return out


def merging(adapters: dict, scaling: float):
    """The `prepare` of model.load / model.build that merges trained adapters (adapter_state of a LoRA model)
    into the base as it is read: each adapted W <- W + scaling * B A in W's dtype, the moment W arrives. The
    export of a QLoRA run, whose base in memory is 4-bit: the 16-bit base is read again, never held twice."""
    pairs = {k.removesuffix(".lora_A"): (v, adapters[k.removesuffix("A") + "B"]) for k, v in adapters.items()
             if k.endswith(".lora_A")}

    def prepare(model):
        modules = dict(model.named_modules())
        for name, (A, B) in pairs.items():
            w = getattr(modules.get(name), "weight", None)
            if w is None or w.shape != (B.shape[0], A.shape[1]):
                raise ValueError(f"merging(): adapters for {name} [{B.shape[0]}, {A.shape[1]}] match no weight "
                                 f"of the model ({'absent' if w is None else list(w.shape)})")

        @torch.no_grad()
        def transform(name, t):
            adapter = pairs.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            return t if adapter is None else _merged(t, *adapter, scaling)
        return transform
    return prepare


def _adapter_metadata(mods: dict[str, LoRALinear]) -> dict:
    m = next(iter(mods.values()))
    attrs = {name.rsplit(".", 1)[-1] for name in mods}
    return {"r": m.r, "alpha": m.alpha, "targets": [t for t, a in TARGETS.items() if a in attrs],
            "shapes": {name: [m.out_features, m.in_features] for name, m in mods.items()}}


def save_adapter(model: nn.Module, path) -> None:
    """Only lora_A / lora_B plus a header to check them against the model they are loaded into.
    Plain dicts, lists, numbers and tensors, so torch.load(weights_only=True) reads it."""
    mods = _modules_or_raise(model, "save_adapter()")
    state = {f"{name}.{p}": getattr(m, p).detach().cpu() for name, m in mods.items() for p in ("lora_A", "lora_B")}
    atomic_write(path, lambda f: torch.save({**_adapter_metadata(mods), "state": state}, f))


@torch.no_grad()
def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load adapters saved by save_adapter; injects them first (same r, alpha, targets) if the model has none."""
    ckpt = torch_load(path, "LoRA adapter file (lora.save_adapter)")
    if not isinstance(ckpt, dict) or not {"r", "alpha", "targets", "shapes", "state"} <= ckpt.keys():
        raise ValueError(f"{path}: not a LoRA adapter file (expected keys r, alpha, targets, shapes, state)")
    if not (isinstance(ckpt["targets"], list) and isinstance(ckpt["shapes"], dict)
            and isinstance(ckpt["state"], dict)):
        raise ValueError(f"{path}: not a LoRA adapter file (targets must be a list, shapes and state dicts)")
    if not lora_modules(model):
        try:
            inject(model, ckpt["targets"], ckpt["r"], ckpt["alpha"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    mods = lora_modules(model)
    if any(m.merged for m in mods.values()):
        raise ValueError(f"load_adapter({path}): the model's adapters are merged; call lora.unmerge(model) first")
    mine = _adapter_metadata(mods)
    for key in ("targets", "r", "alpha"):
        if ckpt[key] != mine[key]:
            raise ValueError(f"{path}: adapter has {key}={ckpt[key]!r} but the model's adapters have "
                             f"{key}={mine[key]!r}")
    for name in sorted(ckpt["shapes"].keys() | mine["shapes"].keys()):
        saved, have = ckpt["shapes"].get(name), mine["shapes"].get(name)
        if saved != have:
            raise ValueError(f"{path}: layer {name}: adapter was saved for a base weight [out, in] = "
                             f"{saved or 'absent'} but the model has {have or 'absent'}")
    pairs = []
    for name, m in mods.items():                     # check every tensor before copying any
        for key, param in ((f"{name}.lora_A", m.lora_A), (f"{name}.lora_B", m.lora_B)):
            saved = ckpt["state"].get(key)
            if not isinstance(saved, torch.Tensor) or saved.shape != param.shape or not saved.is_floating_point():
                got = f"{saved.dtype} {list(saved.shape)}" if isinstance(saved, torch.Tensor) else repr(saved)
                raise ValueError(f"{path}: {key}: expected a floating point tensor of shape {list(param.shape)}, "
                                 f"found {got}")
            pairs.append((param, saved))
    if extra := sorted(map(str, ckpt["state"].keys() - {f"{name}.lora_{p}" for name in mods for p in "AB"})):
        raise ValueError(f"{path}: tensors {extra[:4]} match no adapter of the model")
    for param, saved in pairs:
        param.copy_(saved)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a 4-bit weight counts by its logical [out, in] size; tied weights count once."""
    params = list(model.parameters())
    nf4 = sum(m.out_features * m.in_features for m in lora_modules(model).values() if m.weight_nf4 is not None)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + nf4


def _check_block_size(block_size, what):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"{what}: block_size must be a positive even number, got {block_size}")


def _quantize(m: LoRALinear, w: torch.Tensor, block_size: int):
    m.weight_nf4, m.weight_absmax = quantize_nf4(w, block_size)
    # the 2 KiB lookup table lives with the codes and moves with the module (.to, .cuda): dequantising
    # copies nothing from the host. Not persistent: state dicts stay the same; a module made with
    # to_empty() must refill it (NF4_PAIRS).
    m.nf4_pairs = NF4_PAIRS.to(m.weight_nf4.device)
    m.weight = None                          # drop the 16-bit tensor: that is the memory saving


@torch.no_grad()
def quantize_4bit(model: nn.Module, block_size: int = 64) -> nn.Module:
    """Replace the frozen base weight of every LoRALinear by NF4 codes + per-block absmax (QLoRA §3)."""
    _check_block_size(block_size, "quantize_4bit()")
    for name, m in _modules_or_raise(model, "quantize_4bit()").items():
        if m.merged:
            raise ValueError(f"quantize_4bit(): {name} is merged; call lora.unmerge(model) first")
        if m.weight_nf4 is None:
            _quantize(m, m.weight, block_size)
    return model


def qlora(targets=tuple(TARGETS), r: int = 16, alpha: float = 32.0, dropout: float = 0.0, block_size: int = 64):
    """The `prepare` of model.load / model.build for QLoRA: the adapters are injected while the model is
    still shapes only (meta device), then each adapted weight is quantised the moment it reaches the device
    and its 16-bit copy dropped. Loading holds the NF4 model plus one weight in flight, never the 16-bit
    base (7B: about 4 GiB, not 14). The model equals inject(...) then quantize_4bit(...) on the loaded one."""
    check(r, alpha, dropout, targets)
    _check_block_size(block_size, "qlora()")

    def prepare(model):
        mods = lora_modules(inject(model, targets, r, alpha, dropout))

        @torch.no_grad()
        def transform(name, t):
            m = mods.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
            if m is None:
                return t
            _quantize(m, t, block_size)
            return None
        return transform
    return prepare
