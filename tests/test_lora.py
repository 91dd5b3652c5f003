import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from model import PRESETS, Transformer, build, load, save_hf
from conftest import LiveBytes, tiny

ARGS = PRESETS["tiny"]


def tokens(B=4, T=16, seed=1):
    return torch.randint(0, ARGS.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def train(model, steps, lr=1e-2):
    """Next-token cross-entropy on one fixed batch: enough to move the adapters away from B = 0."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)  # every parameter: the frozen ones must not move
    x, losses = tokens(), []
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomize_adapters(model):
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(std=0.05)


# ----------------------------------------------------------------------------- LoRA


def test_fresh_adapter_gives_outputs_identical_to_the_base_model():
    base, x = tiny(), tokens()
    want = base(x)
    model = tiny()
    wq = model.layers[0].attention.wq.weight
    lora.inject(model, r=4, alpha=8.0)
    assert torch.equal(model(x), want)
    assert model.layers[0].attention.wq.weight is wq          # the base tensor itself, not a copy
    assert "layers.0.attention.wq.weight" in model.state_dict()  # base keys unchanged: checkpoints load


def test_disabled_model_equals_the_base_model_after_training_steps():
    x = tokens()
    want = tiny()(x)
    model = lora.inject(tiny(), r=4, alpha=8.0)
    train(model, steps=3)
    trained = model(x)
    assert not torch.allclose(trained, want, atol=1e-3)
    with torch.no_grad(), lora.disabled(model):
        assert torch.equal(model(x), want)              # log mu exactly, from the same weights
    assert torch.equal(model(x), trained)               # adapters back on after the context


def test_merged_outputs_equal_unmerged_and_unmerge_restores_the_base():
    model, x = lora.inject(tiny(), r=4, alpha=8.0), tokens()
    randomize_adapters(model)
    base_w = model.layers[0].feed_forward.w2.weight.clone()
    with torch.no_grad():
        unmerged = model(x)
        merged = lora.merge(model)(x)
        with pytest.raises(ValueError, match="merged"):
            with lora.disabled(model):
                pass
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.layers[0].feed_forward.w2.weight, base_w)
        lora.unmerge(model)
    torch.testing.assert_close(model.layers[0].feed_forward.w2.weight, base_w, rtol=0, atol=1e-6)


def test_merging_inside_disabled_is_refused_so_disabled_stays_the_reference():
    model, x = lora.inject(tiny(), r=4, alpha=8.0), tokens()
    randomize_adapters(model)
    with torch.no_grad(), lora.disabled(model):
        mu = model(x)
        with pytest.raises(ValueError, match=r"merge\(\): the adapters are switched off"):
            lora.merge(model)
        assert torch.equal(model(x), mu)


def test_bf16_unmerge_restores_the_base_only_up_to_two_bf16_roundings():
    # the documented limit of unmerge: W' = bf16(bf16(W + D) - D), D = (alpha/r) B A in float32
    model = lora.inject(tiny().bfloat16(), r=4, alpha=8.0)
    randomize_adapters(model)
    layer = model.layers[0].feed_forward.w2
    w, d = layer.weight.float().clone(), layer.delta_weight()
    lora.unmerge(lora.merge(model))
    err = (layer.weight.float() - w).abs()
    assert not torch.equal(layer.weight.float(), w)  # not exact...
    assert (err <= 2**-7 * ((w + d).abs() + w.abs())).all()  # ...but within two roundings of relative 2^-8


def test_gradients_reach_only_adapters_and_an_optimizer_step_changes_nothing_else():
    model = lora.inject(tiny(), targets=("q", "v", "down"), r=4, alpha=8.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert {name.split(".")[-2] for name in trainable} == {"wq", "wv", "w2"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, steps=2)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) == (k not in trainable), k


def test_count_parameters_adds_r_times_in_plus_out_per_adapted_layer():
    base_total = sum(p.numel() for p in tiny().parameters())
    model = lora.inject(tiny(), targets=("q", "gate"), r=4, alpha=8.0)
    want = sum(4 * (lin.in_features + lin.out_features)            # r * (in + out) per adapted layer
               for name, lin in tiny().named_modules() if name.endswith((".wq", ".w1")))
    assert lora.count_parameters(model) == (want, base_total + want)
    assert lora.count_parameters(lora.quantize_4bit(model)) == (want, base_total + want)


def test_adapter_save_load_round_trips(tmp_path):
    model, x = lora.inject(tiny(), targets="q,k,up", r=4, alpha=8.0), tokens()
    train(model, steps=2)
    lora.save_adapter(model, tmp_path / "adapter.pt")
    loaded = lora.load_adapter(tiny(), tmp_path / "adapter.pt")      # injects r, alpha, targets from the file
    assert torch.equal(loaded(x), model(x))
    assert lora.count_parameters(loaded) == lora.count_parameters(model)


def test_loading_an_adapter_into_another_shape_or_targets_fails_clearly(tmp_path):
    path = tmp_path / "adapter.pt"
    lora.save_adapter(lora.inject(tiny(), targets=("q", "v"), r=4, alpha=8.0), path)
    with pytest.raises(ValueError, match=r"targets=\['q', 'v'\] but the model's adapters have targets=\['q'\]"):
        lora.load_adapter(lora.inject(tiny(), targets=("q",), r=4, alpha=8.0), path)
    with pytest.raises(ValueError, match="r=4 but the model's adapters have r=8"):
        lora.load_adapter(lora.inject(tiny(), targets=("q", "v"), r=8, alpha=8.0), path)
    shape = r"\[\d+, \d+\]"
    with pytest.raises(ValueError, match=f"layers.0.attention.wq: adapter was saved for .* {shape} "
                                         f"but the model has {shape}"):
        lora.load_adapter(tiny(dim=2 * ARGS.dim), path)
    with pytest.raises(ValueError, match=f"layers.{ARGS.n_layers}.attention.wq: .* absent"):
        lora.load_adapter(tiny(n_layers=ARGS.n_layers + 1), path)
    with pytest.raises(ValueError, match="unknown"):
        lora.inject(tiny(), targets=("q", "query"))
    for r in (4.0, 0):
        with pytest.raises(ValueError, match=f"LoRA rank r must be an integer >= 1, got {r}"):
            lora.inject(tiny(), r=r)
    for alpha in (float("nan"), 0.0, float("inf")):
        with pytest.raises(ValueError, match=f"LoRA alpha must be a finite number > 0 .* got {alpha}"):
            lora.inject(tiny(), alpha=alpha)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable LoRA adapter"):
        lora.load_adapter(tiny(), tmp_path / "junk.pt")
    torch.save({"model": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a LoRA adapter file"):
        lora.load_adapter(tiny(), tmp_path / "other.pt")


WQ_A = "layers.0.attention.wq.lora_A"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(targets="q"), "targets must be a list, shapes and state dicts"),
    (lambda c: c.update(state=[]), "targets must be a list, shapes and state dicts"),
    (lambda c: c.update(shapes=None), "targets must be a list, shapes and state dicts"),
    (lambda c: c.update(targets=["q", "query"]), r"LoRA targets \['q', 'query'\]: unknown \['query'\]"),
    (lambda c: c.update(r=4.0), "LoRA rank r must be an integer >= 1, got 4.0"),
    (lambda c: c["state"].update({WQ_A: torch.zeros(4, ARGS.dim, dtype=torch.int64)}),
     f"{WQ_A}: expected a floating point .* found torch.int64"),
    (lambda c: c["state"].update({WQ_A: torch.zeros(5, ARGS.dim)}),
     rf"{WQ_A}: expected a floating point tensor of shape \[4, 64\], found .* \[5, 64\]"),
    (lambda c: c["state"].update({"layers.0.attention.wk.lora_A": torch.zeros(4, ARGS.dim)}),
     r"tensors \['layers.0.attention.wk.lora_A'\] match no adapter of the model"),
])
def test_malformed_adapter_file_names_the_file_and_the_entry(tmp_path, edit, message):
    path = tmp_path / "adapter.pt"
    lora.save_adapter(lora.inject(tiny(), targets=("q", "v"), r=4, alpha=8.0), path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=message) as e:
        lora.load_adapter(tiny(), path)                      # injects from the file's header
    assert str(path) in str(e.value)


def test_truncated_adapter_file_is_refused_by_name(tmp_path):
    lora.save_adapter(lora.inject(tiny(), targets=("q",), r=4, alpha=8.0), tmp_path / "adapter.pt")
    raw = (tmp_path / "adapter.pt").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 100):          # torch raises RuntimeError for one, OSError for the other
        (tmp_path / "adapter.pt").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="adapter.pt: not a readable LoRA adapter file"):
            lora.load_adapter(tiny(), tmp_path / "adapter.pt")


# ----------------------------------------------------------------------------- NF4 / QLoRA


def test_nf4_levels_derived_from_normal_quantiles_match_the_qlora_table():
    # QLoRA (arXiv:2305.14314) Appendix E, as listed in bitsandbytes' get_4bit_type("nf4")
    table = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
    torch.testing.assert_close(lora.NF4, torch.tensor(table), rtol=0, atol=1e-6)


def test_nf4_error_on_gaussian_weights_is_within_half_a_level_gap_and_below_int4():
    w = torch.randn(384, 256, generator=torch.Generator().manual_seed(0))
    packed, absmax = lora.quantize_nf4(w, block_size=64)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    err = (lora.dequantize_nf4(packed, absmax, w.shape, torch.float32) - w).view(-1, 64)
    scale = w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    # nearest-level rounding: |error| <= half the widest gap (0.7230 -> 1.0) times the block's absmax,
    # plus the bf16 rounding of the scale (relative 2^-8)
    half_gap = (lora.NF4[1:] - lora.NF4[:-1]).max() / 2
    assert (err.abs() <= scale * (half_gap + 2**-8)).all()
    # QLoRA §3: NF4 suits normal weights better than uniform 4-bit absmax (levels k/7, k = -7..7)
    int4 = torch.round(w.view(-1, 64) / scale * 7) / 7 * scale - w.view(-1, 64)
    assert err.pow(2).mean() < 0.9 * int4.pow(2).mean()


@pytest.mark.parametrize("shape, dtype", [((7, 9), torch.bfloat16), ((1, 1), torch.float32), ((3, 130), torch.float16)])
def test_nf4_on_shapes_not_a_multiple_of_the_block_and_in_16_bit(shape, dtype):
    # 63, 1 and 390 weights: the last block is zero padded; the padding must not leak into the weights
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, absmax = lora.quantize_nf4(w)
    assert packed.numel() == 32 * absmax.numel() and absmax.numel() == -(-w.numel() // 64)
    back = lora.dequantize_nf4(packed, absmax, shape, dtype)
    assert back.dtype == dtype and back.shape == shape
    flat = F.pad(w.float().reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    scale = flat.abs().amax(dim=1, keepdim=True).expand(-1, 64).reshape(-1)[: w.numel()].view(shape)
    half_gap = (lora.NF4[1:] - lora.NF4[:-1]).max() / 2
    # nearest level, the bf16 scale, and the rounding of the result to dtype
    assert ((back.float() - w.float()).abs() <= scale * (half_gap + 2**-7)).all()


def test_nf4_of_zeros_is_exactly_zero_and_a_zero_block_does_not_disturb_its_neighbour():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-3, 3, 64)
    packed, absmax = lora.quantize_nf4(w)
    back = lora.dequantize_nf4(packed, absmax, w.shape, torch.float32)
    assert torch.equal(back[0], torch.zeros(64)) and back[1].isfinite().all()
    assert back[1].abs().max() == 3.0 and back[1][31:33].abs().max() < 0.3   # absmax exact in bf16; near 0 -> small


def test_quantize_4bit_refuses_a_block_size_that_is_not_an_even_integer():
    for block_size in (63, 0, 64.0):
        with pytest.raises(ValueError, match=f"block_size must be a positive even number, got {block_size}"):
            lora.quantize_4bit(lora.inject(tiny(), r=2), block_size)


def test_nf4_linear_matches_a_linear_layer_on_the_dequantised_weight_forward_and_backward():
    torch.manual_seed(0)
    parent = nn.ModuleDict({"wq": nn.Linear(96, 40)})        # with bias, and 96*40 not a multiple of 64
    lora.quantize_4bit(lora.inject(parent, targets=("q",), r=2, alpha=2.0))
    layer = parent["wq"]
    assert layer.weight is None and "wq.weight" not in parent.state_dict()
    w = lora.dequantize_nf4(layer.weight_nf4, layer.weight_absmax, (40, 96), torch.float32)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    y_ref = F.linear(x_ref, w, layer.bias) + F.linear(F.linear(x_ref, layer.lora_A), layer.lora_B)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    with pytest.raises(ValueError, match="4-bit base"):
        lora.merge(parent)


def test_quantized_base_is_about_4x_smaller_than_bf16_and_its_lora_model_trains():
    model = lora.quantize_4bit(lora.inject(tiny(), r=8, alpha=16.0))
    mods = lora.lora_modules(model).values()
    bf16_bytes = sum(m.out_features * m.in_features * 2 for m in mods)
    nf4_bytes = sum(m.weight_nf4.nbytes + m.weight_absmax.nbytes for m in mods)
    assert 3.7 < bf16_bytes / nf4_bytes <= 16 / 4.25             # 4 bits + a bf16 scale per 64 weights
    losses = train(model, steps=12)
    assert losses[-1] < losses[0] - 0.5, losses                  # nats; starts at ln(vocab_size)


def test_qwen2_biases_on_q_k_v_survive_inject_merge_and_nf4():
    # Qwen2's wq, wk, wv carry a bias: LoRA adapts the weight only, the bias stays frozen and in every path
    def biased():
        m = tiny(qkv_bias=True)
        with torch.no_grad():  # biases start at zero, which would hide a dropped one
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
        return m
    x, base = tokens(), biased()
    with torch.no_grad():
        want = base(x)
        model = lora.inject(biased(), targets=("q", "k", "v"), r=4, alpha=8.0)
        assert torch.equal(model(x), want)
        randomize_adapters(model)
        adapted = model(x)
        assert not torch.allclose(adapted, want, atol=1e-3)
        torch.testing.assert_close(lora.merge(model)(x), adapted, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.layers[1].attention.wk.bias, base.layers[1].attention.wk.bias)
        lora.unmerge(model)
        quantized = lora.quantize_4bit(model)
        for i, layer in enumerate(base.layers):  # the reference: the base with its weights rounded to NF4
            for w in ("wq", "wk", "wv"):
                q = getattr(quantized.layers[i].attention, w)
                getattr(layer.attention, w).weight.copy_(
                    lora.dequantize_nf4(q.weight_nf4, q.weight_absmax, (q.out_features, q.in_features), torch.float32))
        with lora.disabled(quantized):
            torch.testing.assert_close(quantized(x), base(x), rtol=1e-5, atol=1e-5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wk", "wv") for ab in "AB"}
    assert "layers.0.attention.wq.bias" in quantized.state_dict()


class HostToDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that reads a CPU tensor into a tensor on another device: a host -> device copy."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in inputs) and any(t.device.type != "cpu" for t in outputs):
            self.copies.append(str(func))
        return out


def test_nf4_lookup_table_moves_with_the_model_and_no_forward_or_backward_copies_from_the_host():
    # the meta device stands in for a GPU: a CPU tensor read into a meta one is what a host -> device copy is
    model = lora.quantize_4bit(lora.inject(tiny(), r=2)).to("meta")
    layer = model.layers[0].attention.wq
    assert layer.nf4_pairs.device.type == "meta" and "nf4_pairs" not in str(list(model.state_dict()))
    x = tokens().to("meta")
    with HostToDevice() as spy:
        model(x).sum().backward()
    assert layer.lora_A.grad is not None and spy.copies == []


# ----------------------------------------------------------------------------- QLoRA at load time

# six blocks of a small vocabulary: the blocks are most of the model, as in a 7B, so holding them whole in
# 16 bits and holding them as NF4 plus one block in flight differ by more than a block
QARGS = dataclasses.replace(ARGS, n_layers=6, vocab_size=128, qkv_bias=True)


@pytest.mark.parametrize("init", ["checkpoint", "preset"])
def test_qlora_quantises_each_weight_as_it_arrives_into_the_model_that_loading_then_quantising_gives(tmp_path, init):
    if init == "checkpoint":  # float32 in the file, loaded as bf16: every tensor is copied, as onto a GPU
        save_hf(tiny(**dataclasses.asdict(QARGS)), tmp_path)

        def make(prepare=None):
            torch.manual_seed(1)  # train.py's load_base: the seed, then the base, then LoRA's draws
            return load(tmp_path, dtype=torch.bfloat16, prepare=prepare)
        old = make
    else:
        def make(prepare=None):
            torch.manual_seed(1)
            return build(QARGS, dtype=torch.bfloat16, prepare=prepare)

        def old():  # what train.py did: the whole preset in float32 on the device, then cast
            torch.manual_seed(1)
            return Transformer(QARGS).to(torch.bfloat16)
    with LiveBytes() as before:
        want = lora.quantize_4bit(lora.inject(old(), r=4, alpha=8.0))
    with LiveBytes() as after:
        got = make(lora.qlora(r=4, alpha=8.0))
        held = after.now()  # the NF4 model as loaded: codes, scales, adapters, the unquantised tensors
    assert got.state_dict().keys() == want.state_dict().keys()
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert got.layers[0].attention.wq.weight is None and got.layers[0].attention.wq.nf4_pairs is not None
    assert {n for n, p in got.named_parameters() if p.requires_grad} == \
        {n for n, p in want.named_parameters() if p.requires_grad}
    x = tokens(T=8) % QARGS.vocab_size
    with torch.no_grad():
        assert torch.equal(got(x), want(x))
    with torch.device("meta"):
        block = sum(p.numel() for p in Transformer(QARGS).layers[0].parameters()) * 4  # in float32
    assert after.peak <= held + block, (after.peak, held, block)
    assert before.peak > held + block  # the bound can fail: the whole 16-bit base, then quantised, exceeds it


def test_merging_on_load_refuses_adapters_that_match_no_weight_of_the_model():
    adapters = lora.adapter_state(lora.inject(tiny(), targets=("q",), r=2).state_dict())
    with pytest.raises(ValueError, match=r"layers.0.attention.wq \[64, 64\] match no weight of the model \(\[32, 32\]\)"):
        build(dataclasses.replace(ARGS, dim=32), prepare=lora.merging(adapters, 1.0))
