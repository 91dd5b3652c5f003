"""Oracle for tests/test_model.py: tiny random MistralForCausalLM / LlamaForCausalLM / Qwen2ForCausalLM
checkpoints and the logits Hugging Face `transformers` computes for fixed tokens. Run once, output committed:

    pip install transformers safetensors      # oracle only; not a project dependency
    python tests/make_model_fixtures.py       # writes tests/fixtures/model/{mistral,llama,llama31,qwen2}/

Each fixture directory holds
    hf/        config.json + safetensors written by transformers' save_pretrained (mistral: sharded + index)
    original/  (mistral, llama) the same weights in Meta's layout: params.json + consolidated.00.pth (mistral)
               or consolidated.safetensors written by the safetensors library (llama). Meta's layout has no
               q, k, v biases, and its scaled RoPE is not read (model.py), so llama31 and qwen2 have none.
    expected.pt  {"tokens": [B, T] long, "logits": [B, T, V] float32} from the transformers model.
Nothing here imports model.py: the checkpoints, the layout conversion and the logits are independent of it.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = Path(__file__).parent / "fixtures" / "model"
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             rms_norm_eps=1e-5, max_position_embeddings=64, attn_implementation="eager")
LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=4)
CASES = {
    # GQA 4:2, untied head, theta 1e4, sliding window 4 on 12 tokens (so the window cuts), sharded save
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, num_key_value_heads=2, rope_theta=10000.0,
                                                  sliding_window=4, tie_word_embeddings=False), "40KB"),
    # multi-query 4:1, head_dim 16 != hidden/heads, theta 5e5, tied head, one file
    "llama": (LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=1, head_dim=16, rope_theta=500000.0,
                                            tie_word_embeddings=True), "5GB"),
    # Llama 3.1's scaled RoPE ("llama3"; original context 4, so the scaling changes the 12 positions), GQA 4:2,
    # untied head
    "llama31": (LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=500000.0,
                                              tie_word_embeddings=False, rope_scaling=LLAMA31_ROPE), "5GB"),
    # Qwen2: biases on q, k, v, theta 1e6, GQA 4:2, tied head, sharded save
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**{**SMALL, "rms_norm_eps": 1e-6}, num_key_value_heads=2,
                                            rope_theta=1e6, tie_word_embeddings=True), "40KB"),
}
HF_TO_META = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
              "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
              "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def unpermute(w, n_heads):
    """Inverse of `permute` in HF's convert_llama_weights_to_hf.py:
    w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_state(model, cfg):
    out = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        module, param = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, i, sub = module.split(".", 3)
            key = f"layers.{i}.{HF_TO_META[sub]}.{param}"
        else:
            key = f"{HF_TO_META[module]}.{param}"
        if "q_proj" in name:
            t = unpermute(t, cfg.num_attention_heads)
        if "k_proj" in name:
            t = unpermute(t, cfg.num_key_value_heads)
        out[key] = t.contiguous().clone()
    return out


def main():
    for name, (cls, cfg, shard) in CASES.items():
        torch.manual_seed(0)
        model = cls(cfg).float().eval()
        with torch.no_grad():  # O(1) activations and visibly non-uniform attention (HF's 0.02 init is ~uniform)
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif pname.endswith("bias"):
                    p.normal_(std=0.5)
                elif "embed" in pname:
                    p.normal_()
                else:
                    p.normal_(std=p.shape[1] ** -0.5)
        tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(tokens).logits.float()
        if name == "mistral":  # the window must matter, or the fixture would not test it
            cfg.sliding_window = None
            with torch.no_grad():
                full = model(tokens).logits
            assert (full - logits).abs().max() > 1e-2, "sliding window made no difference"
            cfg.sliding_window = 4
        if name == "llama31":  # the scaling must matter too: the same weights with plain RoPE differ
            plain = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=500000.0,
                                                 tie_word_embeddings=False)).eval()
            plain.load_state_dict(model.state_dict())
            with torch.no_grad():
                assert (plain(tokens).logits - logits).abs().max() > 1e-2, "RoPE scaling made no difference"
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d / "hf", max_shard_size=shard)
        (d / "hf" / "generation_config.json").unlink(missing_ok=True)
        torch.save({"tokens": tokens, "logits": logits}, d / "expected.pt")
        print(name, sorted(p.name for p in (d / "hf").iterdir()), f"logit range {logits.min():.2f}..{logits.max():.2f}")
        if name in ("llama31", "qwen2"):
            continue
        (d / "original").mkdir(parents=True)
        params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
                  "n_kv_heads": cfg.num_key_value_heads, "hidden_dim": cfg.intermediate_size,
                  "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
                  "rope_theta": cfg.rope_parameters["rope_theta"], "head_dim": cfg.head_dim}
        state = meta_state(model, cfg)
        if name == "mistral":
            params["sliding_window"] = cfg.sliding_window
            torch.save(state, d / "original" / "consolidated.00.pth")
        else:
            params["tied_embeddings"] = True
            save_file(state, d / "original" / "consolidated.safetensors")
        (d / "original" / "params.json").write_text(json.dumps(params, indent=2))


if __name__ == "__main__":
    main()
