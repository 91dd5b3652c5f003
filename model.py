"""A Mistral / Llama / Qwen2-family decoder in one file, read top to bottom (after nanoGPT, gpt-fast and Meta's
reference model.py): config and presets, RMSNorm, RoPE, grouped-query attention, SwiGLU, the
Transformer, KV-cache generation, then checkpoint I/O (our own safetensors reader and writer, the
Hugging Face layout and Meta's / Mistral's original layout).

Parameter names are Meta's, so they ARE the state-dict keys of the original checkpoints
(`layers.0.attention.wq.weight`); the Hugging Face names are mapped in `_hf_name`.
"""
import copy
import json
import math
import mmap
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:  # defaults: the shape of Mistral 7B
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8           # grouped-query attention: each K/V head serves n_heads // n_kv_heads query heads
    vocab_size: int = 32000
    hidden_dim: int = 14336       # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 32768      # only recorded (config.json); RoPE is computed per position, no table to size
    sliding_window: int | None = None  # query i sees keys j with i - j < sliding_window (as HF Mistral)
    tie_embeddings: bool = False  # output.weight IS tok_embeddings.weight
    head_dim: int | None = None   # None = dim // n_heads (kept None, so dataclasses.replace(dim=...) re-derives it)
    qkv_bias: bool = False        # biases on wq, wk, wv: the one change Qwen2 / Qwen2.5 make to this decoder
    # Llama 3.1's RoPE scaling (see rope()): {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: dict | None = None

    def __post_init__(self):
        # sizes first: the checks below divide by them
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len",
                     "head_dim", "sliding_window"):
            v = getattr(self, name)
            if v is None and name in ("head_dim", "sliding_window"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelArgs: {name} must be a positive integer, got {v!r}")
        for name in ("norm_eps", "rope_theta"):  # a negative eps or a zero theta gives NaN, not an error
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"ModelArgs: {name} must be a finite number > 0, got {v!r}")
        if self.rope_scaling is not None:
            r = self.rope_scaling
            if set(r) != set(LLAMA3_ROPE) or not all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool)
                                                     and math.isfinite(r[k]) and r[k] > 0 for k in r) \
                    or not r["low_freq_factor"] < r["high_freq_factor"]:
                raise ValueError(f"ModelArgs: rope_scaling must hold numbers > 0 for exactly {', '.join(LLAMA3_ROPE)} "
                                 f"with low_freq_factor < high_freq_factor, got {r!r}")
        hd = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads or hd % 2:
            raise ValueError(f"ModelArgs: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}) and head_dim ({hd}) even (RoPE rotates pairs)")


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_7B = ModelArgs()
_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PRESETS = {
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192, max_seq_len=2048),
    "mistral-7b-v0.1": replace(_7B, vocab_size=32000, rope_theta=1e4, sliding_window=4096),
    "mistral-7b-v0.2": replace(_7B, vocab_size=32000, rope_theta=1e6),
    "mistral-7b-v0.3": replace(_7B, vocab_size=32768, rope_theta=1e6),
    "llama-3-8b": replace(_7B, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192),
    # Llama 3.1 / 3.2 (meta-llama/*, config.json): Llama 3's decoder with scaled RoPE; 3.2 1B ties its head
    "llama-3.1-8b": replace(_7B, vocab_size=128256, rope_theta=500000.0, max_seq_len=131072, rope_scaling=_LLAMA31_ROPE),
    "llama-3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                              rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                              rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}),
    # Qwen2.5 (Qwen/*, config.json): q, k, v biases, theta 1e6; 0.5B ties its head
    "qwen2.5-7b": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064, hidden_dim=18944,
                            norm_eps=1e-6, rope_theta=1e6, max_seq_len=131072, qkv_bias=True),
    "qwen2.5-0.5b": ModelArgs(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, vocab_size=151936, hidden_dim=4864,
                              norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, tie_embeddings=True, qkv_bias=True),
}
PRESETS["mistral-7b"] = PRESETS["mistral-7b-v0.1"]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # the mean of squares in float32 whatever the model dtype, as Meta and HF do
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(pos, head_dim, theta, scaling=None):
    """Rotary angles (Su et al. 2021) for integer positions pos [B, T] -> cos, sin [B, T, 1, head_dim/2]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    if scaling:
        # Llama 3.1 (Meta's apply_scaling; HF rope_type "llama3"): with L = original_max_position_embeddings,
        # s = clamp((L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor), 0, 1) and
        # f <- (1 - s) f / factor + s f: wavelengths under L / high_freq_factor keep their frequency, those
        # over L / low_freq_factor are slowed by `factor`, the band between is interpolated.
        s = ((scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi) - scaling["low_freq_factor"])
             / (scaling["high_freq_factor"] - scaling["low_freq_factor"])).clamp(0, 1)
        inv_freq = (1 - s) * inv_freq / scaling["factor"] + s * inv_freq
    angles = pos.float()[..., None] * inv_freq
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of each head: Meta's layout (the complex-number view).
    x [B, T, H, hd]; computed in float32 so bf16 keeps the phase of far positions."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, T, H, hd/2] each
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2).type_as(x)


def attention_mask(q_slot, k_slot, window=None, keep=None):
    """True where query slot i may attend key slot j: j <= i, i - j < window, and key j not padding.
    q_slot [Tq], k_slot [S], keep [B, S] bool -> [Tq, S] (no keep) or [B, 1, Tq, S].
    A padding query still attends to itself: an all-False row would make SDPA return NaN, and the NaN
    would reach real rows through 0 * NaN in the next layer's attention."""
    d = q_slot[:, None] - k_slot[None, :]  # [Tq, S]
    m = (d >= 0) if window is None else (d >= 0) & (d < window)
    if keep is not None:
        m = (m & keep[:, None, None, :]) | (d == 0)
    return m


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.head_dim or args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, pack=None):  # x [B, T, d]
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if pack is not None:  # packed rows (data.packed_batch): attention runs in collate's rows [prompt; response],
            # gathered out of the packed tokens one length bucket at a time, and each token's output is put back
            buckets, to_packed = pack  # [(to_padded [N, S], its mask or None)], [B, T]: flat indices
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # [B*T, H, hd]
            y = torch.cat([attend(q[rows], k[rows], v[rows], m).flatten(0, 1) for rows, m in buckets])  # [sum N*S, H, hd]
            return self.wo(y[to_packed].view(B, T, -1))
        if cache is not None:
            k, v = cache.update(k, v)  # [B, S, KV, hd]: every slot filled so far
        return self.wo(attend(q, k, v, mask).reshape(B, T, -1))


def attend(q, k, v, mask):
    """SDPA on [B, T, H, hd] queries and [B, S, KV, hd] keys and values -> [B, T, H, hd]. mask None = plain
    causal, which lets SDPA pick its flash kernel on GPU; enable_gqa shares each K/V head among
    n_heads // n_kv_heads query heads without materialising the repeats."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=True)
    return y.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer 2020)


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, pack=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, pack)
        return h + self.feed_forward(self.ffn_norm(h))


def _init(m):
    """N(0, 0.02) weights and zero biases as GPT-2 / HF (nn's defaults suit neither); an RMSNorm scales by 1."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, RMSNorm):
        nn.init.ones_(m.weight)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.checkpoint_activations = False  # recompute each block in backward: memory O(1 block) for ~1/3 more compute
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        for m in self.modules():
            _init(m)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
            # load_state_dict(assign=True) puts in new Parameter objects: tie them again after every load
            self.register_load_state_dict_post_hook(lambda m, _: setattr(m.output, "weight", m.tok_embeddings.weight))

    def hidden(self, tokens, pos=None, mask=None, cache=None, pack=None):
        """tokens [B, T] -> final-normed hidden states [B, T, d]. Training needs only tokens: attention is
        causal, so right padding cannot reach real positions. generate() also passes RoPE positions
        pos [B, T], a mask from attention_mask() and one KVCache per layer. Packed rows (nca.packed_logps)
        pass pos and pack = (to_padded, to_packed) from data.packed_batch: attention then runs in collate's
        rows [prompt; response], every other layer once per packed token."""
        T = tokens.shape[1]
        if cache is not None and mask is None:  # SDPA's is_causal aligns queries to the first keys, not the last
            raise ValueError("Transformer.hidden: with a cache, pass the mask (model.attention_mask), as generate() does")
        if pos is None:
            pos = torch.arange(T, device=tokens.device)[None]
        window = self.args.sliding_window

        def causal(S):  # None: plain causal attention over S slots; past the sliding window, a [S, S] mask
            slots = torch.arange(S, device=tokens.device)
            return None if window is None or S <= window else attention_mask(slots, slots, window)
        if pack is not None:
            pack = [(rows, causal(rows.shape[1])) for rows in pack[0]], pack[1]
        elif mask is None:
            mask = causal(T)
        cos, sin = rope(pos, self.layers[0].attention.head_dim, self.args.rope_theta, self.args.rope_scaling)
        x = self.tok_embeddings(tokens)  # [B, T, d]
        for i, layer in enumerate(self.layers):
            if self.checkpoint_activations and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, None, pack, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache[i], pack)
        return self.norm(x)

    def forward(self, tokens):
        return self.output(self.hidden(tokens))  # [B, T, V]


# ----------------------------------------------------------------------------- generation

class KVCache:
    """One layer's keys and values for every slot so far: [B, max_len, n_kv_heads, head_dim]."""

    def __init__(self, max_len):
        self.max_len, self.n, self.k, self.v = max_len, 0, None, None

    def update(self, k, v):  # append k, v [B, T, KV, hd]; return all filled slots
        if self.k is None:  # allocated on first use, in the dtype and device the layer computes in
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        end = self.n + k.shape[1]
        self.k[:, self.n:end], self.v[:, self.n:end] = k, v
        self.n = end
        return self.k[:, :end], self.v[:, :end]


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else nucleus sampling (Holtzman et al. 2020)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    if not temperature >= 0:  # a negative one would silently favour the least likely tokens
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    p, idx = probs.sort(-1, descending=True)
    if top_p < 1:
        # keep the smallest prefix whose mass reaches top_p (as HF's TopPLogitsWarper): a token goes
        # once the tokens before it already hold top_p, so mass exactly top_p ends the prefix
        p.masked_fill_(p.cumsum(-1) - p >= top_p, 0)  # not p[...] = 0: a boolean index waits for the device
    choice = torch.multinomial(p, 1, generator=generator)  # multinomial renormalises
    return idx.gather(-1, choice)[:, 0]


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, eos_id=None, generator=None):
    """New tokens for each prompt (list of token ids), EOS included if produced and nothing after it.
    Prompts are left-padded to a common length; each row gets its own RoPE positions (0 at its first real
    token) and a mask hiding its padding, so a row's tokens equal generating it alone. `generator` must
    live on the model's device. Runs in eval mode (no dropout) and restores the caller's mode."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    V = model.args.vocab_size
    if bad := [t for p in prompts for t in p if not 0 <= t < V]:  # else an index error deep in the embedding
        raise ValueError(f"generate: token id {bad[0]} is out of range for the model's vocabulary (0 .. {V - 1})")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), dtype=torch.long)
    device = model.tok_embeddings.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    L = P + max_new_tokens
    tokens = torch.zeros(B, L, dtype=torch.long)
    keep = torch.ones(B, L, dtype=torch.bool)  # False on left padding
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):P] = torch.tensor(p)
        keep[b, :P - len(p)] = False
    tokens, keep, eos = tokens.to(device), keep.to(device), eos.to(device)
    pos = (keep.cumsum(1) - 1).clamp(min=0)  # [B, L]
    slots = torch.arange(L, device=device)
    cache = [KVCache(L) for _ in model.layers]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.full((B,), max_new_tokens, device=device)  # tokens kept per row (through its EOS)
    window = model.args.sliding_window
    was_training = model.training
    model.eval()
    try:
        start, end = 0, P  # first call: the whole prompt block; then one slot per step
        mask = attention_mask(slots[:P], slots[:P], window, keep[:, :P])
        for i in range(max_new_tokens):
            h = model.hidden(tokens[:, start:end], pos[:, start:end], mask, cache)  # [B, T, d]
            nxt = sample(model.output(h[:, -1]).float(), temperature, top_p, generator)  # [B]
            tokens[:, end] = nxt
            hit = torch.isin(nxt, eos) & ~done
            n_new = torch.where(hit, i + 1, n_new)
            done |= hit
            # a finished row keeps decoding (what it adds after its EOS is dropped): asking the device whether
            # every row is done makes the host wait for it, so that is asked every 16 tokens, not every token
            if i % 16 == 15 and done.all():
                break
            start, end = end, end + 1
            # the new token (slot end - 1, never padding) attends every real slot so far: a view of keep,
            # narrowed to the last `window` slots once the sequence is longer (attention_mask's rule)
            mask = keep[:, None, None, :end]
            if window is not None and end > window:
                mask = mask & (slots[:end] >= end - window)
    finally:
        model.train(was_training)
    return [tokens[b, P:P + n].tolist() for b, n in enumerate(n_new.tolist())]


# ----------------------------------------------------------------------------- checkpoint I/O
# safetensors: [8-byte little-endian header length N][N bytes of JSON: name -> {dtype, shape,
# data_offsets: [begin, end)} plus an optional "__metadata__"][raw little-endian data; offsets count from here]

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} as views of a copy-on-write mmap of the file: nothing is read until used, nothing
    copied. Every length, offset, dtype and shape is checked against the file first."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path}: truncated ({size} bytes): a safetensors file starts with an 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated?")
        if n > 100_000_000:  # the format's own limit; a corrupt length would otherwise read gigabytes as JSON
            raise ValueError(f"{path}: header length {n} is over the format's limit of 100 MB: not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: the header is not valid JSON ({e})") from None
        data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)[8 + n:]
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            valid = isinstance(dtype, str) and all(type(v) is int and v >= 0 for v in [*shape, begin, end])
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"{where}: expected {{dtype, shape: [ints >= 0], data_offsets: [begin, end]}}, "
                             f"got {info!r}")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not begin <= end <= len(data):
            raise ValueError(f"{where}: data_offsets [{begin}, {end}] out of range: the data section has "
                             f"{len(data)} bytes (truncated file?)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets [{begin}, {end}] "
                             f"hold {end - begin}")
        t = data[begin:end]
        if t.storage_offset() % DTYPES[dtype].itemsize:
            t = t.clone()  # view(dtype) needs an aligned start; writers pad the header to 8 so this is rare
        tensors[name] = t.view(DTYPES[dtype]).view(shape)
        spans.append((begin, end, name))
    # as the official reader: the tensors tile the data section, no overlap, no gap, nothing after the last
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 != e0:
            raise ValueError(f"{path}: tensors {n0!r} [{b0}, {e0}] and {n1!r} [{b1}, {e1}] "
                             f"{'overlap' if b1 < e0 else 'leave a gap: bytes that belong to no tensor'}")
    first, last = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if first != 0 or last != len(data):
        raise ValueError(f"{path}: the tensors cover bytes [{first}, {last}] of a data section of {len(data)} "
                         f"bytes: the rest belongs to no tensor (a header entry lost, or bytes appended?)")
    return tensors


def write_safetensors(path, tensors, metadata=None):
    names = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"write_safetensors({path}): tensor {name!r} has dtype {t.dtype}, which this writer "
                             f"does not support (supported: {', '.join(map(str, names))})")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad, as the official writer does, so the data starts 8-byte aligned

    def write(f):
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    atomic_write(path, write)  # tensors read from the old file are mmap views: never write into it in place


def atomic_write(path, write):
    """write(f) fills a new file beside path, flushed to disk, then renamed over it: a crash or power loss
    leaves the previous file whole (os.replace is atomic; without the fsync the rename can reach the disk
    before the data), and mmap views of the previous file stay valid (rewriting it in place is a SIGBUS).
    A failed write (a full disk, a quota; torch.save reports those as RuntimeError) removes the temporary
    and raises one OSError naming the path. The temporary is the process's own: two processes may write one
    file at once (toy/pipeline.py's parallel runs each save the same reference cache), and the last rename wins."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise OSError(f"{path}: write failed ({reason}); the previous file, if any, is unchanged") from None


def torch_load(path, what, mmap=False):
    """torch.load(weights_only=True: no pickled code ever runs) of a file that should hold `what`. Its many
    failures (not a zip, cut short, a forbidden pickle global) become one line naming the file and what
    was found, never torch's advice to retry with weights_only=False."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        msg = str(e).split("WeightsUnpickler error:")[-1]  # the reason, after torch's advice
        reason = next((line.strip() for line in msg.splitlines() if line.strip()), "")
        reason = reason.split(". ")[0].removesuffix(".")  # miniz and friends add paragraphs of guesses
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}{': ' + reason if reason else ''}; "
                         f"{Path(path).stat().st_size:,} bytes)") from None


# Hugging Face names of our modules; blocks live under model.layers.{i}.
_HF = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
       "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
       "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
       "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(name):  # "layers.3.attention.wq.weight" -> "model.layers.3.self_attn.q_proj.weight"
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, sub = module.split(".", 2)
        return f"model.layers.{i}.{_HF[sub]}.{param}"
    return f"{_HF[module]}.{param}"


def _rope_permute(w, n_heads, to_hf):
    # Meta's RoPE (ours, and the original checkpoints') rotates interleaved pairs (x0, x1), (x2, x3), ... of a
    # head; HF's rotate_half rotates (x_i, x_{i + hd/2}). HF's converter reorders the rows of wq and wk within
    # each head so both conventions give the same q.k; we undo that reordering on load and redo it on save.
    # A bias (Qwen2) is one column of rows: reordered alike.
    if w.dim() == 1:
        return _rope_permute(w[:, None], n_heads, to_hf)[:, 0]
    rows, cols = w.shape
    half = rows // n_heads // 2
    grouped = w.reshape((n_heads, half, 2, cols) if to_hf else (n_heads, 2, half, cols))
    return grouped.transpose(1, 2).reshape(rows, cols)


def read_json(file):
    try:
        obj = json.loads(Path(file).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(obj, dict):  # config.json, params.json and the shard index are all objects
        raise ValueError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(cfg, key, file, kind=int, default=...):
    """cfg[key], checked to be a `kind` (or None where None is the default); required if no default."""
    v = cfg.get(key, default)
    if v is ... or not (isinstance(v, kind) or v is None and default is None):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"{file}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                         f"{'but it is missing' if v is ... else f'got {v!r}'}")
    return v


def _args(file, **kw):
    try:
        args = ModelArgs(**kw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if args.head_dim == args.dim // args.n_heads:
        args = replace(args, head_dim=None)  # the canonical form of a derived head_dim, as in PRESETS
    return args


def _args_from_hf(cfg, file):
    kind = cfg.get("model_type")
    if kind not in ("llama", "mistral", "qwen2"):  # this decoder (qwen2: + q, k, v biases); others are not
        raise ValueError(f"{file}: model_type {kind!r} is not supported (expected 'llama', 'mistral' or 'qwen2'; "
                         f"mixture-of-experts and other architectures are not)")
    rope_cfg = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}  # transformers 5 names it rope_parameters
    if not isinstance(rope_cfg, dict):
        raise ValueError(f"{file}: field 'rope_scaling' / 'rope_parameters' must be an object, got {rope_cfg!r}")
    rope_type = rope_cfg.get("rope_type", rope_cfg.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{file}: RoPE type {rope_type!r} is not supported (plain RoPE and Llama 3.1's 'llama3' only)")
    scaling = {k: _get(rope_cfg, k, f"{file}: rope_scaling", (int, float)) for k in LLAMA3_ROPE} \
        if rope_type == "llama3" else None
    # Llama's attention_bias puts a bias on wo too; Qwen2's sliding window covers only some layers
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu" \
            or cfg.get("use_sliding_window"):
        raise ValueError(f"{file}: attention_bias, mlp_bias, use_sliding_window or a hidden_act other than silu "
                         f"are not supported")
    n_heads = _get(cfg, "num_attention_heads", file)
    return _args(file, dim=_get(cfg, "hidden_size", file), n_layers=_get(cfg, "num_hidden_layers", file),
                 n_heads=n_heads, n_kv_heads=_get(cfg, "num_key_value_heads", file, default=n_heads),
                 vocab_size=_get(cfg, "vocab_size", file), hidden_dim=_get(cfg, "intermediate_size", file),
                 norm_eps=_get(cfg, "rms_norm_eps", file, (int, float), 1e-6),
                 rope_theta=_get(cfg, "rope_theta", file, (int, float), rope_cfg.get("rope_theta", 10000.0)),
                 max_seq_len=_get(cfg, "max_position_embeddings", file, default=32768),
                 sliding_window=_get(cfg, "sliding_window", file, int, None) if kind == "mistral" else None,
                 tie_embeddings=_get(cfg, "tie_word_embeddings", file, bool, False),
                 head_dim=_get(cfg, "head_dim", file, int, None), qkv_bias=kind == "qwen2", rope_scaling=scaling)


def _args_from_params(p, file, n_embeddings=None):
    if "moe" in p or p.get("use_scaled_rope"):
        # Meta's code fixes the scaling factor at 8, where HF's 3.2 configs say 32: use the HF layout for 3.1+
        raise ValueError(f"{file}: mixture-of-experts and scaled RoPE (Llama 3.1+) are not supported in Meta's "
                         f"layout; load the Hugging Face layout (config.json) of a Llama 3.1 / 3.2 checkpoint")
    dim = _get(p, "dim", file)
    hidden = _get(p, "hidden_dim", file, int, None)
    if hidden is None:  # Meta's rule: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of
        hidden = int(2 * 4 * dim / 3)
        if multiplier := _get(p, "ffn_dim_multiplier", file, (int, float), None):
            hidden = int(multiplier * hidden)
        m = _get(p, "multiple_of", file, default=256)
        if m <= 0:
            raise ValueError(f"{file}: field 'multiple_of' must be a positive integer, got {m}")
        hidden = m * -(-hidden // m)
    n_heads = _get(p, "n_heads", file)
    vocab_size = _get(p, "vocab_size", file, default=-1)
    if vocab_size <= 0 and n_embeddings is not None:  # Llama 2's params.json says -1: the embedding knows
        vocab_size = n_embeddings
    return _args(file, dim=dim, n_layers=_get(p, "n_layers", file), n_heads=n_heads,
                 n_kv_heads=_get(p, "n_kv_heads", file, default=n_heads), vocab_size=vocab_size, hidden_dim=hidden,
                 norm_eps=_get(p, "norm_eps", file, (int, float), 1e-5),
                 rope_theta=_get(p, "rope_theta", file, (int, float), 10000.0),
                 max_seq_len=_get(p, "max_seq_len", file, default=32768),
                 sliding_window=_get(p, "sliding_window", file, int, None),
                 tie_embeddings=_get(p, "tied_embeddings", file, bool, False),
                 head_dim=_get(p, "head_dim", file, int, None))


def _read_hf(path):
    """config.json + model.safetensors, or shards listed by model.safetensors.index.json."""
    args = _args_from_hf(read_json(path / "config.json"), path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> shard file name")
        files = {}
        for file in sorted(set(weight_map.values())):
            if Path(file).name != file:  # a shard is a file beside the index, never a path elsewhere
                raise ValueError(f"{index}: shard name {file!r} is a path; expected a file name in {path}")
            if not (path / file).is_file():
                raise ValueError(f"{index}: lists shard {file!r}, which does not exist")
            files[file] = read_safetensors(path / file)
        for name, file in weight_map.items():
            if name not in files[file]:
                raise ValueError(f"{index}: says tensor {name!r} is in {file}, which has no such tensor")
    elif (path / "model.safetensors").is_file():
        files = {"model.safetensors": read_safetensors(path / "model.safetensors")}
    else:
        raise ValueError(f"{path}: has config.json but neither model.safetensors nor model.safetensors.index.json")
    found = {}
    for file, tensors in files.items():
        for name, t in tensors.items():
            if name.endswith(".rotary_emb.inv_freq"):  # older transformers saved its RoPE table; we compute it
                continue
            if name in found:
                raise ValueError(f"{path / file}: tensor {name!r} is also in {found[name][1]}")
            found[name] = (t, path / file)
    return args, found


def _read_original(path):
    """params.json + consolidated.safetensors or consolidated.00.pth (one model-parallel shard only)."""
    params = read_json(path / "params.json")
    pth = sorted(path.glob("consolidated*.pth"))
    if (path / "consolidated.safetensors").is_file():
        file = path / "consolidated.safetensors"
        tensors = read_safetensors(file)
    elif len(pth) == 1:
        file = pth[0]
        tensors = torch_load(file, "weights-only torch checkpoint", mmap=True)
    else:
        raise ValueError(f"{path}: expected consolidated.safetensors or exactly one consolidated*.pth "
                         f"(model-parallel shards are not supported), found {[p.name for p in pth]}")
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file}: expected a dict of tensor name -> tensor")
    tensors.pop("rope.freqs", None)  # Llama 2 stored its RoPE table; we compute it
    embeddings = tensors.get("tok_embeddings.weight")
    n_embeddings = embeddings.shape[0] if embeddings is not None and embeddings.dim() else None
    args = _args_from_params(params, path / "params.json", n_embeddings)
    return args, {name: (t, file) for name, t in tensors.items()}


def load(path, *, device="cpu", dtype=None, prepare=None):
    """A checkpoint directory, HF layout (config.json) or original layout (params.json) -> Transformer.
    Built on the meta device, then each (mmap'd) tensor is moved to the device and assigned, one at a time:
    one copy in memory, none if it already has the requested device and dtype (default: the embedding's
    dtype in the file). prepare: see _fill (lora.qlora quantises each weight as it is read)."""
    path = Path(path)
    if (path / "config.json").is_file():
        (args, found), hf = _read_hf(path), True
    elif (path / "params.json").is_file():
        (args, found), hf = _read_original(path), False
    else:
        raise ValueError(f"{path}: not a checkpoint directory (no config.json for the Hugging Face layout, "
                         f"no params.json for the original layout)")
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {n: p.shape for n, p in model.state_dict().items() if not (args.tie_embeddings and n == "output.weight")}
    ours = {(_hf_name(n) if hf else n): n for n in shapes}
    head, embeddings = (_hf_name(n) if hf else n for n in ("output.weight", "tok_embeddings.weight"))
    if args.tie_embeddings and head in found:
        # some tied HF checkpoints store the head as well: a copy of the embedding is the tied weight
        t, file = found.pop(head)
        if embeddings not in found or not torch.equal(t, found[embeddings][0]):
            raise ValueError(f"{file}: tensor {head!r} differs from {embeddings!r}, but the config ties them")
    state = {}
    for key, (t, file) in found.items():
        if key not in ours:
            raise ValueError(f"{file}: unexpected tensor {key!r}: not part of the model its config describes")
        n = ours[key]
        if t.shape != shapes[n] or not t.is_floating_point():
            raise ValueError(f"{file}: tensor {key!r} is {t.dtype} {list(t.shape)}, the config needs a floating "
                             f"point tensor of shape {list(shapes[n])}")
        state[n] = t
    missing = [key for key, n in ours.items() if n not in state]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} tensor(s) the config needs: {missing[:4]}")
    dtype = dtype or state["tok_embeddings.weight"].dtype

    def tensors():
        for n, t in state.items():
            t = t.to(device=device, dtype=dtype)
            if hf and n.endswith(("wq.weight", "wk.weight", "wq.bias", "wk.bias")):  # on the device: no host copy
                t = _rope_permute(t, args.n_heads if "wq" in n else args.n_kv_heads, to_hf=False)
            yield n, t
    return _fill(model.to(dtype), tensors(), device, prepare)


def build(args, *, device="cpu", dtype=torch.float32, prepare=None):
    """Transformer(args) with its random init from torch's generator, made on the device one module at a time:
    the same numbers as `with torch.device(device): Transformer(args).to(dtype)`, never the model in float32.
    prepare: see _fill."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    plain = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))]

    def tensors():  # `plain` keeps the modules themselves: prepare may wrap them (LoRA) before this runs
        # Transformer.__init__ draws nn's own init of every module as it builds it, then draws _init's over
        # it: draw the first on a scratch copy and drop it, so the generator is where __init__ leaves it...
        for _, m in plain:
            if hasattr(m, "reset_parameters"):
                copy.deepcopy(m).float().to_empty(device=device).reset_parameters()
        for name, m in plain:  # ...then _init's, in float32 as __init__, cast to dtype as .to(dtype)
            m = copy.deepcopy(m).float().to_empty(device=device)
            _init(m)
            for p, t in m.named_parameters():
                if not (args.tie_embeddings and name == "output"):  # drawn, then replaced by the tie, as in __init__
                    yield f"{name}.{p}", t.detach().to(dtype)
    return _fill(model, tensors(), device, prepare)


def _fill(model, tensors, device, prepare=None):
    """Give a meta-device model its tensors one at a time: `tensors` yields (name, tensor on the device), and
    each replaces the parameter of that name as it comes, so only one is ever in flight.
    prepare(model), if given, first changes the model while it is still shapes only (lora.qlora injects
    adapters) and returns transform(name, tensor): what to assign in its place, or None where transform
    stored it itself (lora.qlora: as 4-bit codes). Parameters that no tensor fills (the adapters) are then
    allocated on the device and set by their module's reset_parameters(), in module order: the meta-device
    idiom of PyTorch, and the order in which building the model and then adding them would draw them."""
    transform = prepare(model) if prepare else None
    for name, t in tensors:
        if transform is not None:
            t = transform(name, t)
        if t is not None:
            module, attr = name.rsplit(".", 1)
            m = model.get_submodule(module)
            setattr(m, attr, nn.Parameter(t, requires_grad=getattr(m, attr).requires_grad))
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if torch.device(device).type == "meta":  # shapes only (train.py's other ranks, which shard() fills)
        return model
    for m in model.modules():
        if left := [(n, p) for n, p in m.named_parameters(recurse=False) if p.is_meta]:
            for n, p in left:
                setattr(m, n, nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad))
            m.reset_parameters()
    return model


def save_hf(model, path, *, max_shard_bytes=5 * 2**30, config=None):
    """Hugging Face layout: config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards and
    model.safetensors.index.json), loadable by transformers' Mistral-, Llama- or Qwen2ForCausalLM and by
    load(). `config` adds keys to config.json (e.g. the tokenizer spec). LoRA must be merged away first."""
    a, path = model.args, Path(path)
    with torch.device("meta"):
        names = list(Transformer(a).state_dict())
    state = model.state_dict()
    if set(state) != set(names):
        raise ValueError(f"save_hf: the model's parameters differ from the plain architecture (extra "
                         f"{sorted(set(state) - set(names))[:3]}, missing {sorted(set(names) - set(state))[:3]}): "
                         f"merge LoRA adapters into the base weights and remove them first")
    tensors = {}
    for n in names:
        if a.tie_embeddings and n == "output.weight":
            continue  # a tied head is stored once, as the embedding, as HF does
        t = state[n]
        if n.endswith(("wq.weight", "wk.weight", "wq.bias", "wk.bias")):
            t = _rope_permute(t, a.n_heads if "wq" in n else a.n_kv_heads, to_hf=True)
        tensors[_hf_name(n)] = t
    shards, size = [[]], 0  # greedy: a new shard when the next tensor would overflow this one
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("model*.safetensors*"):  # a stale index or shard from an earlier save would be read
        old.unlink()
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(files, shards):
        write_safetensors(path / file, {name: tensors[name] for name in shard}, {"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        atomic_write(path / "model.safetensors.index.json", lambda f: f.write(json.dumps(index, indent=2).encode()))
    # Without a window Llama and Mistral are the same network; Mistral's is the one that has the window,
    # Qwen2's the one with q, k, v biases (its window, on some layers only, is not ours).
    if a.qkv_bias and a.sliding_window is not None:
        raise ValueError("save_hf: no Hugging Face architecture has q, k, v biases and a sliding window on every layer")
    arch = "Qwen2" if a.qkv_bias else "Mistral" if a.sliding_window is not None else "Llama"
    rope_scaling = a.rope_scaling and {"rope_type": "llama3", **a.rope_scaling}
    cfg = {"architectures": [f"{arch}ForCausalLM"], "model_type": arch.lower(), "hidden_size": a.dim,
           "intermediate_size": a.hidden_dim, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
           "num_hidden_layers": a.n_layers, "head_dim": model.layers[0].attention.head_dim,
           "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "vocab_size": a.vocab_size,
           "tie_word_embeddings": a.tie_embeddings, "sliding_window": a.sliding_window,
           "max_position_embeddings": a.max_seq_len, "hidden_act": "silu", "rope_scaling": rope_scaling,
           "torch_dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), **(config or {})}
    atomic_write(path / "config.json", lambda f: f.write(json.dumps(cfg, indent=2).encode()))
