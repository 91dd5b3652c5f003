import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import model
from model import PRESETS, ModelArgs, Transformer, generate
from conftest import tiny

FIXTURES = Path(__file__).parent / "fixtures" / "model"  # written by tests/make_model_fixtures.py (transformers)


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("case, layout", [("mistral", "hf"), ("mistral", "original"), ("llama", "hf"),
                                          ("llama", "original"), ("llama31", "hf"), ("qwen2", "hf")])
def test_logits_match_transformers_within_1e_4(case, layout):
    # mistral: GQA 4:2, untied head, sliding window 4 < 12 tokens, sharded safetensors / .pth;
    # llama: MQA, head_dim != dim / n_heads, theta 5e5, tied head, single safetensors;
    # llama31: Llama 3.1's RoPE scaling (original context 4 < 12 tokens), untied head;
    # qwen2: q, k, v biases, tied head, sharded safetensors
    expected = torch.load(FIXTURES / case / "expected.pt", weights_only=True)
    m = model.load(FIXTURES / case / layout)
    with torch.no_grad():
        logits = m(expected["tokens"])
    assert (logits - expected["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["mistral", "llama"])
def test_original_and_hf_layouts_load_identical_weights(case):
    hf, orig = model.load(FIXTURES / case / "hf"), model.load(FIXTURES / case / "original")
    assert hf.args == dataclasses.replace(orig.args, max_seq_len=hf.args.max_seq_len)  # params.json lacks it
    for (name, a), (_, b) in zip(hf.state_dict().items(), orig.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.load(FIXTURES / case / "expected.pt", weights_only=True)["tokens"]
    with torch.no_grad():
        assert torch.equal(hf(tokens), orig(tokens))


LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8)


@pytest.mark.parametrize("arch, extra", [
    ("Mistral", dict(sliding_window=5, tie_word_embeddings=False)),
    ("Llama", dict(rope_scaling=LLAMA31_ROPE, tie_word_embeddings=False)),
    ("Llama", dict(rope_scaling={**LLAMA31_ROPE, "factor": 32.0}, tie_word_embeddings=True)),  # Llama 3.2's
    ("Qwen2", dict(tie_word_embeddings=True)),
    ("Qwen2", dict(tie_word_embeddings=False)),
])
def test_live_transformers_parity_both_directions(tmp_path, arch, extra):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=80, hidden_size=48, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                                 rope_theta=1e6, rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    ref = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.3)
    ref.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 80, (2, 16))
    ours = model.load(tmp_path / "hf")
    model.save_hf(ours, tmp_path / "ours", max_shard_bytes=50_000)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        expected = ref(tokens).logits
        assert (ours(tokens) - expected).abs().max() < 1e-4
        assert (back(tokens).logits - expected).abs().max() < 1e-4


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("changes", [dict(sliding_window=8), dict(tie_embeddings=True, head_dim=32),
                                     dict(qkv_bias=True, rope_scaling=model.PRESETS["llama-3.1-8b"].rope_scaling)])
def test_save_hf_then_load_round_trips_exactly(tmp_path, changes):
    m = tiny(**changes)
    with torch.no_grad():  # biases start at zero: random ones show that their RoPE reordering round-trips
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.save_hf(m, tmp_path, max_shard_bytes=100_000, config={"nca_tokenizer": "byte"})
    assert (tmp_path / "model.safetensors.index.json").exists()  # sharded: the index path is exercised
    assert json.loads((tmp_path / "config.json").read_text())["nca_tokenizer"] == "byte"
    back = model.load(tmp_path)
    assert back.args == m.args
    assert back.state_dict().keys() == m.state_dict().keys()
    for name, t in m.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert (back.output.weight is back.tok_embeddings.weight) == m.args.tie_embeddings


@pytest.mark.parametrize("changes", [{}, dict(tie_embeddings=True, qkv_bias=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_build_draws_the_same_random_model_as_transformer_one_module_at_a_time(changes, dtype):
    args = dataclasses.replace(PRESETS["tiny"], **changes)
    want = tiny(seed=3, **changes).to(dtype)  # train.py's presets until now: the whole model, then cast
    next_draw = torch.rand(4)
    torch.manual_seed(3)
    got = model.build(args, dtype=dtype)
    assert torch.equal(torch.rand(4), next_draw)  # the generator is left where Transformer leaves it: LoRA's init next
    assert got.state_dict().keys() == want.state_dict().keys()
    for name, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name
    assert (got.output.weight is got.tok_embeddings.weight) == args.tie_embeddings
    assert all(p.requires_grad for p in got.parameters())


def test_load_casts_to_the_requested_dtype():
    m = model.load(FIXTURES / "llama" / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def n_params_by_hand(a: ModelArgs):
    hd = a.head_dim or a.dim // a.n_heads
    attn = a.dim * hd * (2 * a.n_heads + 2 * a.n_kv_heads)  # wq, wo: H heads; wk, wv: KV heads
    attn += a.qkv_bias * hd * (a.n_heads + 2 * a.n_kv_heads)  # Qwen2's biases on wq, wk, wv
    block = attn + 3 * a.dim * a.hidden_dim + 2 * a.dim  # + SwiGLU w1 w2 w3 + two RMSNorm weights
    return a.n_layers * block + a.dim + a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)


@pytest.mark.parametrize("name, count", [("mistral-7b", 7_241_732_096), ("mistral-7b-v0.1", 7_241_732_096),
                                         ("mistral-7b-v0.3", 7_248_023_552), ("llama-3-8b", 8_030_261_248),
                                         ("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
                                         ("qwen2.5-7b", 7_615_616_512), ("qwen2.5-0.5b", 494_032_768)])
def test_presets_on_meta_have_the_real_models_parameter_counts(name, count):
    with torch.device("meta"):
        m = Transformer(PRESETS[name])
    assert sum(p.numel() for p in m.parameters()) == n_params_by_hand(PRESETS[name]) == count


# The published config.json of each new preset (meta-llama/Llama-3.1-8B, meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-7B,
# Qwen/Qwen2.5-0.5B on the Hugging Face hub), less the keys that do not shape the network (token ids, dtype, ...)
_LLAMA31 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-05,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
_QWEN25 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "rope_scaling": None, "use_sliding_window": False}
PUBLISHED = {
    "llama-3.1-8b": _LLAMA31,
    "llama-3.2-1b": {**_LLAMA31, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "head_dim": 64, "tie_word_embeddings": True, "rope_scaling": {**_LLAMA31["rope_scaling"],
                                                                                    "factor": 32.0}},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 28,
                   "tie_word_embeddings": False},
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "sliding_window": 32768, "max_window_layers": 24,
                     "tie_word_embeddings": True},
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_give_the_presets(name):
    assert model._args_from_hf(PUBLISHED[name], "config.json") == PRESETS[name]


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_count_what_transformers_counts_for_the_published_config(name):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**PUBLISHED[name])
    with torch.device("meta"):
        ref, ours = transformers.AutoModelForCausalLM.from_config(cfg), Transformer(PRESETS[name])
    # parameters() yields a tied weight once, in both
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


# ----------------------------------------------------------------------------- forward

def test_hidden_is_causal_so_right_padding_cannot_change_earlier_positions():
    m, x = tiny(), torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(m.hidden(x)[:, :7], m.hidden(x[:, :7]), rtol=0, atol=1e-5)


def test_sliding_window_changes_only_positions_beyond_the_window():
    windowed, full, x = tiny(sliding_window=4), tiny(), torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        a, b = windowed(x), full(x)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-5)
    assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).min() > 1e-3


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    x = torch.randint(0, 512, (2, 10))
    losses, grads = [], []
    for flag in (False, True):
        m = tiny().train()
        m.checkpoint_activations = flag
        loss = m(x).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- generation

def greedy_by_full_recompute(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            seq.append(m(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


@pytest.mark.parametrize("window", [None, 5])
def test_greedy_kv_cache_generation_equals_full_recompute_on_a_ragged_batch(window):
    m = tiny(seed=1, sliding_window=window)
    with torch.no_grad():  # sharper logits, so no argmax is a near-tie that float noise could flip
        m.output.weight.mul_(20)
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4], [11, 12, 13]]
    out = generate(m, prompts, max_new_tokens=8)
    assert out == [greedy_by_full_recompute(m, p, 8) for p in prompts]


def test_generation_stops_each_row_at_its_own_eos():
    m = tiny(seed=1)
    prompts = [[5, 9, 3], [4, 6]]
    free = generate(m, prompts, max_new_tokens=6)
    eos = free[0][2]  # row 0 produces it at step 3; row 1 may or may not
    out = generate(m, prompts, max_new_tokens=6, eos_id=[eos, 10_000])
    for row, full in zip(out, free):
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:stop]
    assert out[0][-1] == eos and len(out[0]) <= 3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws = model.sample(logits, temperature=1.0, top_p=0.7, generator=g)
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2:].sum() == 0  # 0.5 < 0.7 <= 0.5 + 0.3: tokens 2, 3 are cut
    assert abs(counts[0] - 0.5 / 0.8) < 0.03
    assert torch.equal(model.sample(logits[:2], temperature=1.0, top_p=1e-6, generator=g), torch.zeros(2).long())


def test_top_p_stops_at_the_token_whose_mass_reaches_p_exactly():
    # HF's TopPLogitsWarper: token 0 alone holds 0.5 = top_p, so token 1 is cut (mass before it reaches p)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(200, 3)
    draws = model.sample(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert (draws == 0).all()


def test_negative_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1.0"):
        model.sample(torch.zeros(1, 4), temperature=-1.0)


def test_sampled_generation_is_reproducible_with_a_generator():
    m = tiny()
    runs = [generate(m, [[1, 2], [3]], max_new_tokens=5, temperature=1.0, top_p=0.9,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 5 for r in runs[0])


def test_hidden_with_a_cache_and_no_mask_is_refused():
    m = tiny()
    cache = [model.KVCache(4) for _ in m.layers]
    with pytest.raises(ValueError, match="with a cache, pass the mask"):
        m.hidden(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_generate_refuses_a_token_id_outside_the_vocabulary():
    for bad in (512, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range .*0 .. 511"):
            generate(tiny(), [[1, 2], [3, bad]], max_new_tokens=2)


# ----------------------------------------------------------------------------- corrupt files

def st(header, data=b"", n=None):
    """The bytes of a safetensors file: header length (n, or the true one), JSON header, data."""
    blob = json.dumps(header).encode() if isinstance(header, dict) else header
    return (len(blob) if n is None else n).to_bytes(8, "little") + blob + data


F32x6 = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}


@pytest.mark.parametrize("raw, message", [
    (b"\x05\0\0", "truncated"),  # shorter than the 8-byte header length itself
    (st(F32x6, b"\0" * 10), r"tensor 'a': data_offsets \[0, 24\] out of range: the data section has 10 bytes"),
    (st(F32x6, b"\0" * 24, n=10_000), "header length 10000 runs past the end"),
    (st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "'a' .* and 'b' .* overlap"),
    (st({"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a': unknown dtype 'F7'"),
    (st({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a': .* needs 16 bytes"),
    (st({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a': expected {dtype"),
    (st({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a': expected {dtype"),
    (st(b"{not json"), "not valid JSON"),
    pytest.param(st(b"[" * 100_000 + b"]" * 100_000), "not valid JSON", id="nesting too deep for the parser"),
    # the official reader's rule: the tensors tile the data section exactly
    (st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "'a' .* and 'b' .* leave a gap"),
    (st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
     r"cover bytes \[4, 8\] of a data section of 8 bytes"),
    (st(F32x6, b"\0" * 28), r"cover bytes \[0, 24\] of a data section of 28 bytes"),  # bytes appended
])
def test_corrupt_safetensors_give_a_clear_error_naming_file_and_tensor(tmp_path, raw, message):
    (tmp_path / "x.safetensors").write_bytes(raw)
    with pytest.raises(ValueError, match=message) as e:
        model.read_safetensors(tmp_path / "x.safetensors")
    assert str(tmp_path / "x.safetensors") in str(e.value)


def test_safetensors_header_length_over_the_format_limit_is_refused_before_reading_it(tmp_path):
    with open(tmp_path / "x.safetensors", "wb") as f:  # sparse: 200 MB on paper, nothing written
        f.write((150_000_000).to_bytes(8, "little"))
        f.truncate(200_000_000)
    with pytest.raises(ValueError, match="x.safetensors: header length 150000000 is over the format's limit"):
        model.read_safetensors(tmp_path / "x.safetensors")


def test_writing_a_dtype_safetensors_cannot_hold_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match="tensor 'c' has dtype torch.complex64, which this writer does not support"):
        model.write_safetensors(tmp_path / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_overwriting_a_safetensors_file_with_tensors_read_from_it(tmp_path):
    # the tensors read are views of an mmap of the file: truncating it in place would kill the process (SIGBUS)
    model.write_safetensors(tmp_path / "x.safetensors", {"a": torch.arange(6.0), "b": torch.ones(2, 3)})
    tensors = model.read_safetensors(tmp_path / "x.safetensors")
    model.write_safetensors(tmp_path / "x.safetensors", {"b": tensors["b"], "a": tensors["a"] * 2})
    back = model.read_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], torch.arange(6.0) * 2) and torch.equal(back["b"], torch.ones(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_valid_safetensors_read_back_exactly(tmp_path):
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).bfloat16(), "i": torch.arange(3), "s": torch.tensor(2.0)}
    model.write_safetensors(tmp_path / "x.safetensors", tensors)
    back = model.read_safetensors(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())


def edit_checkpoint(tmp_path, edit):
    d = shutil.copytree(FIXTURES / "llama" / "hf", tmp_path / "ckpt")
    tensors = {k: v.clone() for k, v in model.read_safetensors(d / "model.safetensors").items()}
    edit(tensors)
    model.write_safetensors(d / "model.safetensors", tensors)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing 1 tensor.*model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}),
     r"model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}),
     r"model.safetensors: tensor 'model.norm.weight' is torch.float32 \[31\], the config needs .* \[32\]"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)}), "needs a floating point"),
])
def test_checkpoint_that_disagrees_with_its_config_is_refused_by_name(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        model.load(edit_checkpoint(tmp_path, edit))


def test_tied_checkpoint_that_also_stores_the_head_loads_if_it_is_the_embedding(tmp_path):
    # some HF checkpoints with tie_word_embeddings keep a copy of the embedding as lm_head.weight
    d = edit_checkpoint(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    m = model.load(d)
    assert m.output.weight is m.tok_embeddings.weight
    assert torch.equal(m.output.weight, model.load(FIXTURES / "llama" / "hf").tok_embeddings.weight)
    d = edit_checkpoint(tmp_path / "other", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'.*ties them"):
        model.load(d)


@pytest.mark.parametrize("field, value, ours", [("num_attention_heads", 0, "n_heads"), ("vocab_size", -1, "vocab_size"),
                                               ("num_hidden_layers", 0, "n_layers")])
def test_non_positive_sizes_in_a_config_name_the_file_and_the_field(tmp_path, field, value, ours):
    d = shutil.copytree(FIXTURES / "llama" / "hf", tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=f"config.json: ModelArgs: {ours} must be a positive integer, got {value}"):
        model.load(d)
    with pytest.raises(ValueError, match="ModelArgs: n_heads must be a positive integer, got 0"):
        ModelArgs(n_heads=0)


def test_bad_config_and_index_give_clear_errors(tmp_path):
    d = shutil.copytree(FIXTURES / "mistral" / "hf", tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "2"}))
    with pytest.raises(ValueError, match=r"config.json: field 'num_hidden_layers' must be int, got '2'"):
        model.load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"index.json: lists shard 'model-00002-of-00003.safetensors'"):
        model.load(d)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        model.load(tmp_path)


def test_truncated_real_shard_names_the_tensor_that_runs_past_the_end(tmp_path):
    d = shutil.copytree(FIXTURES / "llama" / "hf", tmp_path / "ckpt")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*': data_offsets .* out of range.*truncated"):
        model.load(d)


def edit_json(tmp_path, case, layout, file, edit):
    d = shutil.copytree(FIXTURES / case / layout, tmp_path / "ckpt")
    (d / file).write_text(json.dumps(edit(json.loads((d / file).read_text()))))
    return d


def without(cfg, *keys):
    return {k: v for k, v in cfg.items() if k not in keys}


@pytest.mark.parametrize("case, layout, file, edit, message", [
    ("llama", "hf", "config.json", lambda c: [c], "config.json: expected a JSON object, got list"),
    ("llama31", "hf", "config.json", lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "rope_type": "yarn"}},
     "config.json: RoPE type 'yarn' is not supported"),
    ("llama31", "hf", "config.json", lambda c: {**c, "rope_parameters": without(c["rope_parameters"], "factor")},
     "config.json: rope_scaling: field 'factor' must be int or float, but it is missing"),
    ("llama31", "hf", "config.json",
     lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "rope_scaling must hold numbers > 0 .* with low_freq_factor < high_freq_factor"),
    ("qwen2", "hf", "config.json", lambda c: {**c, "use_sliding_window": True}, "use_sliding_window .* not supported"),
    ("llama", "hf", "config.json", lambda c: {**c, "model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
    ("llama", "hf", "config.json", lambda c: without(c, "hidden_size"), "'hidden_size' must be int, but it is missing"),
    ("llama", "hf", "config.json", lambda c: {**c, "rope_scaling": "linear"}, "'rope_scaling' .* must be an object"),
    ("llama", "hf", "config.json", lambda c: {**c, "rms_norm_eps": -1e-5}, "norm_eps must be a finite number > 0"),
    ("llama", "hf", "config.json", lambda c: {**c, "rope_theta": 0}, "rope_theta must be a finite number > 0, got 0"),
    ("mistral", "hf", "model.safetensors.index.json", lambda c: [c], "index.json: expected a JSON object"),
    ("mistral", "hf", "model.safetensors.index.json", lambda c: {"weight_map": dict.fromkeys(c["weight_map"], 1)},
     "index.json: expected a 'weight_map' object of tensor name -> shard file name"),
    ("mistral", "hf", "model.safetensors.index.json",
     lambda c: {"weight_map": dict.fromkeys(c["weight_map"], "../elsewhere/model.safetensors")},
     "shard name '../elsewhere/model.safetensors' is a path"),
    ("mistral", "original", "params.json", lambda c: [c], "params.json: expected a JSON object"),
    ("mistral", "original", "params.json", lambda c: {**without(c, "hidden_dim"), "ffn_dim_multiplier": "1.3"},
     "params.json: field 'ffn_dim_multiplier' must be int or float, got '1.3'"),
    ("mistral", "original", "params.json", lambda c: {**without(c, "hidden_dim"), "multiple_of": 0},
     "params.json: field 'multiple_of' must be a positive integer, got 0"),
])
def test_malformed_config_fields_name_the_file_and_the_field(tmp_path, case, layout, file, edit, message):
    with pytest.raises(ValueError, match=message):
        model.load(edit_json(tmp_path, case, layout, file, edit))


def test_original_checkpoint_with_a_scalar_embedding_and_no_vocab_size_is_refused_clearly(tmp_path):
    # Llama 2's vocab_size -1 means "ask the embedding"; a 0-d embedding cannot answer
    d = edit_json(tmp_path, "llama", "original", "params.json", lambda c: {**c, "vocab_size": -1})
    tensors = {k: v.clone() for k, v in model.read_safetensors(d / "consolidated.safetensors").items()}
    tensors["tok_embeddings.weight"] = torch.tensor(1.0)
    model.write_safetensors(d / "consolidated.safetensors", tensors)
    with pytest.raises(ValueError, match="params.json: ModelArgs: vocab_size must be a positive integer, got -1"):
        model.load(d)


def test_hf_checkpoint_with_the_rope_table_of_older_transformers_loads(tmp_path):
    # older transformers saved each layer's rotary_emb.inv_freq; it is derived from rope_theta, not a weight
    d = edit_checkpoint(tmp_path, lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8)
                                                      for i in range(2)}))
    m, want = model.load(d), model.load(FIXTURES / "llama" / "hf")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), want.state_dict().values()))


def test_llama31_config_in_the_published_rope_scaling_form_loads_the_same_model(tmp_path):
    # the fixture's config.json is transformers 5's (rope_parameters); the hub's holds rope_scaling + rope_theta
    d = edit_json(tmp_path, "llama31", "hf", "config.json",
                  lambda c: {**without(c, "rope_parameters"), "rope_theta": c["rope_parameters"]["rope_theta"],
                             "rope_scaling": without(c["rope_parameters"], "rope_theta")})
    a, b = model.load(d), model.load(FIXTURES / "llama31" / "hf")
    assert a.args == b.args and a.args.rope_scaling["original_max_position_embeddings"] == 4
    tokens = torch.load(FIXTURES / "llama31" / "expected.pt", weights_only=True)["tokens"]
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_meta_params_json_of_llama_3_8b_gives_the_preset():
    # Meta's released params.json: the FFN width comes from multiple_of and ffn_dim_multiplier
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
    args = model._args_from_params(params, "params.json")
    assert args.hidden_dim == 14336
    assert args == dataclasses.replace(PRESETS["llama-3-8b"], max_seq_len=args.max_seq_len)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.0, top_p=0.9)])
def test_decoding_waits_for_the_device_once_per_16_tokens_not_per_token(host_syncs, sampling):
    # whether every row is done is asked every 16 tokens; the answer is read (tolist) once, at the end
    m, prompts = tiny(sliding_window=5), [[5, 9, 3, 7, 1, 2, 8], [4]]
    for n in (16, 48):
        with host_syncs:
            out = generate(m, prompts, max_new_tokens=n, eos_id=[10_000], generator=torch.Generator().manual_seed(0),
                           **sampling)
        assert [len(o) for o in out] == [n, n]
        assert host_syncs.ops == ["aten._local_scalar_dense.default"] * (n // 16) + ["tolist"] * 3, host_syncs.ops
