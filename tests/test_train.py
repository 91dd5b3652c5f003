"""train.py end to end on a tiny model (preset "tiny", byte tokenizer) and a few lines of jsonl in tmp_path."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.optim.optimizer as optimizer_hooks

import data
import lora
import model as model_lib
import nca
import train
from conftest import LiveBytes, tiny

ROOT = Path(__file__).resolve().parent.parent


def write_reward_data(path, n=8, K=4):
    """n prompts 'a+b=' with K responses, the right sum scored highest."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7, (3 * i) % 5
            responses = [str(a + b), str(a + b + 1), str(a * b + 7), "no idea"][:K]
            f.write(json.dumps({"prompt": f"{a}+{b}=", "responses": responses, "rewards": [9, 5, 3, 1][:K]}) + "\n")
    return str(path)


def run(tmp_path, *extra, out="out", data_file=None):
    data_file = data_file or write_reward_data(tmp_path / "data.jsonl")
    argv = ["--data", data_file, "--out", str(tmp_path / out), "--max-length", "24", "--max-prompt-length", "8",
            "--batch-size", "4", "--lr", "3e-3", "--warmup", "0", "--steps", "4", "--beta", "0.1", *extra]
    result = train.main(argv)
    return result, [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")]


def losses(rows):
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("loss, extra", [("sft", []), ("dpo", ["--pairs", "dpo"]), ("infonca", []),
                                         ("nca", []), ("nca_pair", ["--pairs", "dpo_x3"])])
def test_a_few_steps_of_each_loss_reduce_it(tmp_path, loss, extra):
    # 8 prompts, 4 per step: steps 1 and 3 see the same 4 prompts (one epoch = 2 steps, reshuffled)
    _, rows = run(tmp_path, "--loss", loss, *extra, "--batch-size", "8", "--no-export")
    first, *_, last = losses(rows)
    assert last < first - 1e-3, losses(rows)


def test_lora_trains_only_adapters_and_exports_merged_hf_checkpoint(tmp_path):
    result, rows = run(tmp_path, "--loss", "nca", "--lora-rank", "4", "--lora-targets", "q,v", "--lr", "1e-2")
    assert losses(rows)[-1] < losses(rows)[0]
    base = tiny().state_dict()
    final = model_lib.load(tmp_path / "out" / "final").state_dict()
    changed = {k for k in base if not torch.equal(base[k], final[k])}
    assert changed == {f"layers.{i}.attention.{w}.weight" for i in range(2) for w in ("wq", "wv")}
    cfg = json.loads((tmp_path / "out" / "final" / "config.json").read_text())
    assert cfg["nca_tokenizer"] == "byte" and cfg["nca_template"] == "none"
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_qlora_exports_the_adapters_merged_into_the_16_bit_base(tmp_path):
    run(tmp_path, "--loss", "nca", "--lora-rank", "4", "--quantize", "4bit", "--lr", "1e-2", "--steps", "2")
    base = tiny().state_dict()
    final = model_lib.load(tmp_path / "out" / "final").state_dict()
    w = "layers.0.attention.wq.weight"
    assert 0 < (final[w] - base[w]).abs().max() < 0.1  # base + small update, not requantised
    assert torch.equal(final["tok_embeddings.weight"], base["tok_embeddings.weight"])


def test_qlora_export_merges_into_the_16_bit_base_read_again_one_weight_at_a_time(tmp_path):
    path = write_reward_data(tmp_path / "data.jsonl")
    args = train.parse_args(["--data", path, "--lora-rank", "4", "--quantize", "4bit", "--dtype", "bfloat16"])
    run = train.configure(args, train.prepare_examples(path, args, "--data"), 0, 1, torch.device("cpu"))
    model, _ = train.build_model(run, data.load_tokenizer("byte"))
    with torch.no_grad():  # trained adapters: the merge must show
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
    with LiveBytes() as new:
        final = train.final_model(run, model)
        held = new.now()  # the merged model itself
    with LiveBytes() as old:  # as before: the whole base (built in float32, then cast), every merge beside it
        torch.manual_seed(run.seed)
        base = model_lib.Transformer(model.args).to(torch.bfloat16).state_dict()
        want = lora.merged_state({**base, **lora.adapter_state(model.state_dict())}, run.lora_alpha / run.lora_rank)
    assert final.state_dict().keys() == want.keys()
    for k, v in want.items():
        assert v.dtype == torch.bfloat16 and torch.equal(final.state_dict()[k], v), k
    with torch.device("meta"):
        block = sum(p.numel() for p in model_lib.Transformer(model.args).layers[0].parameters()) * 4  # float32
    assert new.peak <= held + block, (new.peak, held, block)
    assert old.peak > held + block


def test_full_finetuning_exports_in_the_training_dtype_not_the_float32_master_weights(tmp_path):
    run(tmp_path, "--loss", "infonca", "--steps", "2", "--save-every", "2", "--dtype", "bfloat16")
    master = torch.load(tmp_path / "out" / "ckpt" / "state.pt", weights_only=True)["model"]  # float32, last step
    final = model_lib.load(tmp_path / "out" / "final").state_dict()
    assert json.loads((tmp_path / "out" / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for k, v in master.items():
        assert v.dtype == torch.float32 and torch.equal(final[k], v.to(torch.bfloat16)), k


def test_full_finetuning_changes_every_weight_and_the_final_model_reloads_as_init(tmp_path):
    run(tmp_path, "--loss", "infonca", "--steps", "2")
    base = tiny().state_dict()
    final = model_lib.load(tmp_path / "out" / "final").state_dict()
    assert all(not torch.equal(base[k], final[k]) for k in base if "norm" not in k)
    # OUT of a run is a valid --init: the next stage starts from its final model and tokenizer
    result, _ = run(tmp_path, "--init", str(tmp_path / "out"), "--loss", "sft", "--steps", "1", out="out2")
    assert "loss" in result


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-dropout", "0.5", "--lr", "1e-2"]])
def test_resume_after_a_crash_matches_the_uninterrupted_run_step_for_step(tmp_path, monkeypatch, extra):
    # packed rows (the default); with LoRA dropout the masks come from the RNG: resuming must restore it, not only
    # the weights
    args = ["--save-every", "2", "--batch-size", "2", "--steps", "5", "--no-export", *extra]
    _, whole = run(tmp_path, *args, out="whole")
    append = data.append_jsonl

    def crash_after_step_3(path, record):
        append(path, record)
        if record["step"] == 3:
            with open(path, "a") as f:  # killed in the middle of writing step 4's line
                f.write('{"step": 4, "split": "tr')
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(data, "append_jsonl", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, *args, out="cut")
    monkeypatch.setattr(data, "append_jsonl", append)
    _, resumed = run(tmp_path, *args, "--resume", out="cut")
    timing = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in timing} for r in whole]  # exactly, on CPU: loss, lr, grad norm
    a, b = (torch.load(tmp_path / n / "ckpt" / "state.pt", weights_only=True) for n in ("whole", "cut"))
    assert a["step"] == b["step"] == 5 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),  # what a plain write raises
                                   RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")])
def test_a_failed_checkpoint_write_leaves_the_previous_one_whole_and_resume_matches(tmp_path, monkeypatch, capsys,
                                                                                   error):
    args = ["--save-every", "1", "--steps", "3", "--no-export"]
    _, whole = run(tmp_path, *args, out="whole")
    save = torch.save

    def disk_full_at_step_2(obj, f):
        if isinstance(obj, dict) and obj.get("step") == 2:  # half the bytes reach the file, then the write fails
            buf = io.BytesIO()
            save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            raise error
        save(obj, f)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(tmp_path, *args)
    err = capsys.readouterr().err
    state = tmp_path / "out" / "ckpt" / "state.pt"
    assert err.count("\n") == 1 and f"error: {state}: write failed" in err, err
    assert list(state.parent.iterdir()) == [state]  # no state.pt.tmp left behind
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(state, weights_only=True)["step"] == 1
    _, resumed = run(tmp_path, *args, "--resume")
    assert losses(resumed) == losses(whole) and [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in whole]


def test_logged_lr_is_the_rate_each_step_used_linear_warmup_then_cosine(tmp_path):
    _, rows = run(tmp_path, "--lr", "1e-3", "--warmup", "2", "--steps", "4", "--no-export")
    # warmup (s + 1) / 2 for s = 0, 1; then 0.5 (1 + cos(pi (s - 2) / 2)) for s = 2, 3
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4], rel=1e-12)


def test_grad_clip_zero_turns_clipping_off(tmp_path):
    _, off = run(tmp_path, "--grad-clip", "0", "--steps", "3", "--no-export", out="off")
    _, huge = run(tmp_path, "--grad-clip", "1e9", "--steps", "3", "--no-export", out="huge")
    assert losses(off) == losses(huge) and losses(off)[-1] < losses(off)[0]


def test_evaluation_does_not_change_training_no_dropout_no_rng_drawn(tmp_path):
    held_out = write_reward_data(tmp_path / "eval.jsonl", n=3)
    args = ["--lora-rank", "4", "--lora-dropout", "0.5", "--lr", "1e-2", "--steps", "3", "--eval-data", held_out,
            "--no-export"]
    _, often = run(tmp_path, *args, "--eval-every", "1", out="often")
    _, once = run(tmp_path, *args, out="once")
    assert losses(often) == losses(once)
    evals = [[r for r in rows if r["split"] == "eval"] for rows in (often, once)]
    assert len(evals[0]) == 3 and evals[0][-1] == evals[1][-1]


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-dropout", "0.5", "--lr", "1e-2"]])
def test_activation_checkpointing_gives_the_same_losses_gradients_and_weights(tmp_path, monkeypatch, extra):
    calls = []
    checkpoint = model_lib.checkpoint
    monkeypatch.setattr(model_lib, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    _, plain = run(tmp_path, "--steps", "3", "--no-export", *extra, out="plain")
    assert not calls
    _, ckpt = run(tmp_path, "--steps", "3", "--no-export", "--checkpointing", *extra, out="ckpt")
    assert len(calls) == 3 * 2  # 3 steps x 2 blocks, in training only (not the reference, not generation)
    for k in ("loss", "grad_norm"):
        assert [r[k] for r in ckpt] == pytest.approx([r[k] for r in plain], rel=1e-6, abs=0)
    a, b = (torch.load(tmp_path / n / "ckpt" / "state.pt", weights_only=True)["model"] for n in ("plain", "ckpt"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_losses_as_eager(tmp_path):
    # needs a C++ compiler on CPU (inductor); about 15 s cold on 2 cores
    _, eager = run(tmp_path, "--steps", "2", "--no-export", out="eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, compiled = run(tmp_path, "--steps", "2", "--no-export", "--compile", out="compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks did go through dynamo
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5, abs=0)
    assert [r["grad_norm"] for r in compiled] == pytest.approx([r["grad_norm"] for r in eager], rel=1e-4, abs=0)


def test_precomputed_reference_equals_on_the_fly_and_is_recomputed_only_when_its_inputs_change(tmp_path, monkeypatch,
                                                                                                 capsys):
    path = write_reward_data(tmp_path / "data.jsonl", n=5, K=3)
    args = train.parse_args(["--data", path, "--max-length", "24", "--max-prompt-length", "8", "--batch-size", "2"])
    examples = train.prepare_examples(path, args, "--data")
    run = train.configure(args, examples, 0, 1, torch.device("cpu"))
    tok = data.load_tokenizer("byte")
    model = tiny()
    calls = []
    log_probs = train.log_probs
    monkeypatch.setattr(train, "log_probs", lambda *a: calls.append(1) or log_probs(*a))

    def cache(examples, key="key"):
        calls.clear()
        return train.reference_cache(run, model, tok, examples, path, [key]), len(calls)

    ref, computed = cache(examples)
    assert computed == 3  # 5 examples in batches of 2
    with torch.no_grad():  # on the fly, padded: one prompt at a time, not the cached packed batches of 2
        for i, e in enumerate(examples):
            b = data.collate([e], tok, max_length=24, max_prompt_length=8)
            torch.testing.assert_close(ref[i], nca.batch_logps(model, b["tokens"], b["loss_mask"]), rtol=0, atol=1e-5)
    again, computed = cache(examples)
    assert computed == 0 and torch.equal(again, ref)  # read from the file
    (file,) = tmp_path.glob("data.jsonl.ref-*.pt")
    for damage in (lambda: file.write_bytes(file.read_bytes()[:100]),  # cut short
                   lambda: torch.save(torch.zeros(5, 3), file),  # a tensor, not what the name promises
                   lambda: torch.save({"key": "another", "logps": ref}, file)):  # renamed from other inputs
        damage()
        capsys.readouterr()
        again, computed = cache(examples)
        assert computed == 3 and torch.equal(again, ref)
        assert f"reference cache {file} ignored" in capsys.readouterr().out
        assert cache(examples)[1] == 0  # and written back whole
    assert cache(examples, "other weights")[1] == 3 and cache(examples[1:])[1] == 2  # other inputs, other files


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    _, accum = run(tmp_path, "--batch-size", "2", "--grad-accum", "2", "--steps", "3", "--no-export", out="accum")
    _, whole = run(tmp_path, "--batch-size", "4", "--steps", "3", "--no-export", out="whole")
    for k in ("loss", "grad_norm", "logratio/chosen", "rewards/accuracies"):
        # at step 1 the policy is the reference: every margin is a tie, 0 up to the float32 rounding of rows
        # packed two prompts vs four at a time, and the accuracy of a tie is the sign of that rounding
        first = 1 if k == "rewards/accuracies" else 0
        assert [r[k] for r in accum][first:] == pytest.approx([r[k] for r in whole][first:], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("extra, pack", [(["--loss", "nca"], []), (["--loss", "dpo", "--pairs", "dpo"], []),
                                         (["--loss", "sft"], []),
                                         (["--loss", "nca", "--lora-rank", "4", "--lr", "1e-2"], ["--pack-tokens", "96"]),
                                         (["--loss", "nca", "--ref", "copy"], ["--pack-tokens", "40"])])
def test_packed_and_padded_runs_give_the_same_losses(tmp_path, extra, pack):
    # K = 4, prompts of 5 tokens, responses of 2 to 8 (a group ~16 tokens): the padded run computes each prompt 4
    # times and pads to the longest row; by default a step's 4 prompts share one row, with --pack-tokens 40 two
    # share a row, with 96 three or four. Golden: --no-pack, the readable path: each response its own row,
    # plain causal attention
    _, packed = run(tmp_path, "--steps", "3", "--no-export", *extra, *pack, out="packed")
    _, padded = run(tmp_path, "--steps", "3", "--no-export", *extra, "--no-pack", out="padded")
    assert len(packed) == len(padded) == 3
    for k in ("loss", "grad_norm") + (() if "sft" in extra else ("logratio/chosen",)):
        assert [r[k] for r in packed] == pytest.approx([r[k] for r in padded], rel=1e-5, abs=1e-6), k
    assert packed[-1]["loss"] < packed[0]["loss"] - 1e-3  # the steps did train: the losses compared moved


# train.py under torchrun, with spies: what each rank built and loaded, the parameter bytes it held when shard()
# began and after it, and (CRASH_AT=N) a kill right after the shards of step N are written
SPY = """
import atexit, json, os, sys
import torch, torch.distributed.checkpoint as dcp
import model as model_lib, train
seen = {"built_on": [], "loads": 0, "bytes": []}
init, load, shard, save = model_lib.Transformer.__init__, model_lib.load, train.shard, dcp.save

def spy_init(self, args):
    init(self, args)
    seen["built_on"].append(self.tok_embeddings.weight.device.type)

def spy_load(*a, **k):
    seen["loads"] += 1
    return load(*a, **k)

def held(model):
    return sum(getattr(t, "_local_tensor", t).nbytes for t in [*model.parameters(), *model.buffers()] if not t.is_meta)

def spy_shard(model, run):
    seen["bytes"].append(held(model))
    shard(model, run)
    seen["bytes"].append(held(model))

def crash(state, storage_writer):
    save(state, storage_writer=storage_writer)
    if str(storage_writer.path).endswith(f"step-{os.environ.get('CRASH_AT')}.tmp"):
        os._exit(3)

model_lib.Transformer.__init__, model_lib.load, train.shard, dcp.save = spy_init, spy_load, spy_shard, crash
atexit.register(lambda: open(f"{os.environ['SPY']}.{os.environ['RANK']}", "w").write(json.dumps(seen)))
train.main(sys.argv[1:])
"""


def torchrun(tmp_path, *argv, crash_at=None):
    (tmp_path / "spy.py").write_text(SPY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SPY": str(tmp_path / "spy"),
           "CRASH_AT": str(crash_at)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "spy.py"), *argv], env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("mode, init, extra", [("fsdp", "checkpoint", []),
                                               ("ddp", "tiny", ["--lora-rank", "4", "--quantize", "4bit"])])
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, capsys, mode, init, extra):
    # 2 ranks x 2 prompts vs 1 process x 4 prompts; full fine-tuning: the reference precomputed by both ranks vs
    # a frozen copy; QLoRA: the adapters switched off (a copy would be the unquantised base)
    path = write_reward_data(tmp_path / "data.jsonl")
    if init == "checkpoint":
        model_lib.save_hf(tiny(), tmp_path / "init")
        init = str(tmp_path / "init")
    common = ["--data", path, "--max-length", "24", "--max-prompt-length", "8", "--lr", "3e-3", "--warmup", "0",
              "--steps", "2", "--beta", "0.1", "--loss", "nca", "--init", init, "--sample", "1", *extra]
    two = torchrun(tmp_path, *common, "--batch-size", "2", "--dist", mode, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    capsys.readouterr()
    train.main([*common, "--batch-size", "4", "--ref", "auto" if extra else "copy", "--out", str(tmp_path / "one")])
    # the samples before (the sharded model, every rank generating) and after training are the same
    assert [l for l in two.stdout.splitlines() if l.startswith("[")] == \
           [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    rows = {n: [json.loads(line) for line in open(tmp_path / n / "metrics.jsonl")] for n in ("one", "two")}
    torch.testing.assert_close(losses(rows["two"]), losses(rows["one"]), rtol=0, atol=1e-6)
    # Adam divides by sqrt(v): float reordering of the sharded gradient sums shows at ~1e-6 in the weights
    two, one = (model_lib.load(tmp_path / n / "final").state_dict() for n in ("two", "one"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
    # only rank 0 read the weights, onto its CPU; rank 1 built on the meta device and held nothing before its
    # shards: half the float32 model under FSDP (the tiny model's dims split evenly), all of it as a DDP replica
    # (there: NF4 codes, bf16 norms and embeddings, float32 adapters, the NF4 table refilled after to_empty)
    spy = [json.loads((tmp_path / f"spy.{r}").read_text()) for r in (0, 1)]
    assert spy[0]["loads"] == (init != "tiny") and spy[1]["loads"] == 0
    assert set(spy[1]["built_on"]) == {"meta"} and spy[1]["bytes"][0] == 0
    whole = spy[0]["bytes"][0]
    assert spy[0]["bytes"][1] == spy[1]["bytes"][1] == (whole if mode == "ddp" else whole // 2)
    assert mode == "ddp" or whole == sum(t.nbytes for t in tiny().state_dict().values())


def test_two_gloo_processes_resume_from_their_shards_as_if_never_stopped(tmp_path, capsys):
    # killed after step 3's shards are written but before state.pt names them: resumes from step 2, and steps 3
    # and 4 (which needs step 2's AdamW moments) give exactly the uninterrupted run's losses and evaluations
    path, held_out = write_reward_data(tmp_path / "data.jsonl"), write_reward_data(tmp_path / "eval.jsonl", n=3)
    common = ["--data", path, "--eval-data", held_out, "--max-length", "24", "--max-prompt-length", "8", "--lr",
              "3e-3", "--warmup", "0", "--steps", "4", "--beta", "0.1", "--loss", "nca", "--batch-size", "2",
              "--save-every", "1", "--eval-every", "2", "--no-export"]
    whole = torchrun(tmp_path, *common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-4000:]
    cut = torchrun(tmp_path, *common, "--out", str(tmp_path / "cut"), crash_at=3)
    assert cut.returncode != 0 and "step 3/4" in cut.stdout and "step 4/4" not in cut.stdout
    ckpt = tmp_path / "cut" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.pt", "step-2", "step-3.tmp"]
    assert sorted(p.name for p in (ckpt / "step-2").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["shards"] == "step-2" and "model" not in state  # nothing gathered
    resumed = torchrun(tmp_path, *common, "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-4000:]
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
             for line in open(tmp_path / n / "metrics.jsonl")] for n in ("whole", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 + 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.pt", "step-4"]
    for damage, expected in ((lambda: None, "saved by 2 process(es), this run has 1"),  # global batch 4 either way
                             (lambda: shutil.rmtree(ckpt / "step-4"), f"names the shards {ckpt / 'step-4'}, which")):
        damage()
        capsys.readouterr()
        with pytest.raises(SystemExit):
            train.main([*common, "--batch-size", "4", "--out", str(tmp_path / "cut"), "--resume"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_a_preset_is_built_in_its_dtype_with_the_same_numbers_as_the_float32_init_rounded():
    model = train.load_base(SimpleNamespace(seed=3, init_dir=None, init="tiny"), "cpu", torch.bfloat16)
    torch.manual_seed(3)
    expected = model_lib.Transformer(model_lib.PRESETS["tiny"]).to(torch.bfloat16).state_dict()
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert torch.get_default_dtype() == torch.float32  # the build's default dtype was put back


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"), ("loss", "invalid choice"), ("k_mismatch", "K = 3"), ("dpo_k4", "--pairs"),
    ("too_long", "max_seq_len"), ("nan", "non-finite"), ("beta", "--beta (r_theta = beta * log pi / mu) must be"), ("steps", "--steps must be"),
    ("grad_clip", "--grad-clip must be"), ("sample", "--sample must be"), ("device", "--device foo"),
    ("resume_shape", "was saved for model {"), ("resume_loss", "--loss 'nca' (this run: 'infonca')"),
    ("resume_data", "--data examples sha256"), ("resume_lora", "--lora-rank 4 (this run: 8)"),
    ("resume_corrupt", "not a readable checkpoint"), ("no_resume", "pass --resume to continue it"),
    ("dropout_no_lora", "--lora-dropout is dropout on the LoRA"), ("out_is_file", "exists and is not a directory"),
    ("all_tied", "every response has the same reward"), ("resume_metrics", "metrics.jsonl:2: malformed JSON"),
    ("dpo_alpha_unused", None),
    ("resume_no_pack", "layout (packed, or padded: --no-pack) 'packed' (this run: 'padded')"),
    ("pack_and_no_pack", "--no-pack turns packing off"), ("pack_tokens", "--pack-tokens must be"),
    ("init_tokenizer_path", "config.json: field 'nca_tokenizer': '../x' is not a file name")])
def test_bad_input_exits_with_one_clear_line(tmp_path, capsys, case, expected):
    path = write_reward_data(tmp_path / "data.jsonl")
    args = {"missing": ["--data", str(tmp_path / "nope.jsonl")], "loss": ["--loss", "ppo"],
            "dpo_k4": ["--loss", "dpo"], "too_long": ["--max-length", "4096"], "nan": ["--lr", "1e30"],
            "beta": ["--beta", "0"], "steps": ["--steps", "0"], "grad_clip": ["--grad-clip", "-1"],
            "sample": ["--sample", "-1"], "device": ["--device", "foo"], "resume_loss": ["--loss", "infonca"],
            "resume_lora": ["--lora-rank", "8"], "dropout_no_lora": ["--lora-dropout", "0.1"],
            "resume_no_pack": ["--no-pack"], "pack_and_no_pack": ["--no-pack", "--pack-tokens", "64"],
            "pack_tokens": ["--pack-tokens", "0"],
            "out_is_file": ["--out", path], "all_tied": ["--loss", "dpo", "--pairs", "dpo"],
            "init_tokenizer_path": ["--init", str(tmp_path / "init")]}.get(case, [])
    if case == "init_tokenizer_path":  # a downloaded checkpoint's config.json must not make us read other files
        model_lib.save_hf(model_lib.Transformer(model_lib.PRESETS["tiny"]), tmp_path / "init",
                          config={"nca_tokenizer": "../x"})
        (tmp_path / "x").write_text("")
    if case == "all_tied":
        Path(path).write_text(Path(path).read_text().replace("[9, 5, 3, 1]", "[2, 2, 2, 2]"))
    if case == "k_mismatch":
        with open(path, "a") as f:
            f.write(json.dumps({"prompt": "1+1=", "responses": ["2", "3", "4"], "rewards": [3, 2, 1]}) + "\n")
    if case.startswith("resume") or case == "dpo_alpha_unused":  # a finished run in OUT, then --resume, changed
        first = {"resume_lora": ["--lora-rank", "4"], "resume_shape": ["--init", str(tmp_path / "init")],
                 "dpo_alpha_unused": ["--loss", "dpo", "--pairs", "dpo", "--steps", "5", "--alpha", "0.5"]
                 }.get(case, [])
        if case == "resume_shape":  # the --init directory will hold another model by the time of --resume
            model_lib.save_hf(tiny(), tmp_path / "init")
        run(tmp_path, "--save-every", "1", "--no-export", *first, data_file=path)
        args = ["--resume", *first, *args]  # the changed flag last: it wins
    if case == "no_resume":  # a finished run in OUT, then a fresh run that would overwrite its checkpoint
        run(tmp_path, "--save-every", "1", "--no-export", data_file=path)
    if case == "resume_shape":
        other = model_lib.Transformer(model_lib.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300,
                                                          hidden_dim=64, max_seq_len=256))
        model_lib.save_hf(other, tmp_path / "init")
    if case == "resume_data":  # one reward changed
        Path(path).write_text(Path(path).read_text().replace('"rewards": [9, 5', '"rewards": [9, 6', 1))
    if case == "resume_metrics":  # a line of the log damaged (not the cut-short last line a crash leaves)
        log = tmp_path / "out" / "metrics.jsonl"
        lines = log.read_text().splitlines(keepends=True)
        log.write_text(lines[0] + "garbage\n" + "".join(lines[2:]))
    if case == "dpo_alpha_unused":  # DPO has no reward temperature: another --alpha changes nothing, resumes
        train.main([*args[:-1], "0.1", "--data", path, "--out", str(tmp_path / "out"), "--max-length", "24",
                    "--max-prompt-length", "8", "--batch-size", "4", "--lr", "3e-3", "--warmup", "0", "--beta", "0.1",
                    "--save-every", "1", "--no-export"])
        return
    if case == "resume_corrupt":  # cut short by something other than train.py (a copy, a full disk)
        state = tmp_path / "out" / "ckpt" / "state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args, "--save-every", "1", "--no-export", data_file=path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    if case == "resume_data":  # refused before the new data's reference log-probs were computed and cached
        assert len(list(tmp_path.glob("data.jsonl.ref-*.pt"))) == 1
    if case == "nan":  # the blown-up step never reached the checkpoint: it holds step 1's finite weights
        ckpt = torch.load(tmp_path / "out" / "ckpt" / "state.pt", weights_only=True)
        assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_sample_prints_generations_before_and_after_training(tmp_path, capsys):
    run(tmp_path, "--loss", "nca", "--sample", "2", "--no-export")
    lines = capsys.readouterr().out.splitlines()
    before = [l for l in lines if l.startswith("[before]")]
    after = [l for l in lines if l.startswith("[after]")]
    assert len(before) == 2 and len(after) == 2, lines
    assert "+" in before[0] and "->" in before[0]  # the prompt and what the model said to it


def test_lora_dropout_changes_training_after_the_first_step(tmp_path):
    # at step 1 B = 0, so the adapter path (where dropout acts) adds nothing; from step 2 dropout's masks count
    args = ["--loss", "nca", "--lora-rank", "4", "--lr", "1e-2", "--no-export"]
    _, off = run(tmp_path, *args, out="off")
    _, on = run(tmp_path, *args, "--lora-dropout", "0.5", out="on")
    assert losses(on)[0] == losses(off)[0] and losses(on)[1:] != losses(off)[1:]


def test_a_run_that_fails_validation_creates_no_directories(tmp_path, capsys):
    with pytest.raises(SystemExit):  # the data is checked after the flags, before any file is written
        run(tmp_path, "--loss", "dpo", out="never")
    assert "--pairs" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_plot_names_the_file_and_line_of_a_damaged_metrics_log(tmp_path, capsys):
    run(tmp_path, "--steps", "2", "--no-export")
    log = tmp_path / "out" / "metrics.jsonl"
    log.write_text(log.read_text().replace('{"step": 2', '{"step": 2,,', 1))
    with pytest.raises(SystemExit):
        train.main(["--plot", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{log}:2: malformed JSON" in err, err


class Payload:  # unpickling this would run a shell command; weights_only=True must refuse it, not run it
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


@pytest.mark.parametrize("content", ["pickle", "cut", "text"])
@pytest.mark.parametrize("what", ["adapter", "original checkpoint", "resume"])
def test_unreadable_torch_files_give_one_line_and_never_run_a_payload(tmp_path, capsys, content, what):
    flag = tmp_path / "payload-ran"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    bad = {"pickle": lambda: __import__("pickle").dumps({"w": Payload(flag)}),
           "cut": lambda: good.read_bytes()[:200], "text": lambda: b"not a checkpoint\n"}[content]()
    if what == "adapter":
        (tmp_path / "adapter.pt").write_bytes(bad)
        with pytest.raises(ValueError) as e:
            lora.load_adapter(tiny(), tmp_path / "adapter.pt")
        err = str(e.value)
    elif what == "original checkpoint":
        (tmp_path / "orig").mkdir()
        (tmp_path / "orig" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4,
                                                                    "vocab_size": 512, "norm_eps": 1e-5}))
        (tmp_path / "orig" / "consolidated.00.pth").write_bytes(bad)
        with pytest.raises(ValueError) as e:
            model_lib.load(tmp_path / "orig")
        err = str(e.value)
    else:
        run(tmp_path, "--steps", "1", "--no-export")
        (tmp_path / "out" / "ckpt" / "state.pt").write_bytes(bad)
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run(tmp_path, "--steps", "1", "--no-export", "--resume")
        err = capsys.readouterr().err
    assert "\n" not in err.rstrip("\n") and "not a readable" in err and "weights_only" not in err, err
    assert not flag.exists()


def test_metrics_are_reduced_on_the_run_device_which_a_group_without_a_cpu_backend_accepts(monkeypatch):
    # NCCL serves CUDA tensors only. A gloo group registered for the cuda device type alone refuses CPU
    # tensors the same way; the meta device stands in for the GPU (c10d ops take meta tensors on any group).
    import dataclasses
    import torch.distributed as dist
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))  # what all_mean reduced before: a CPU tensor
        reduced, all_reduce = [], dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t: (reduced.append(t), all_reduce(t)))
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: [0.5] * len(t))  # a meta tensor has no values
        run = dataclasses.make_dataclass("R", ["device", "world"])(torch.device("meta"), 2)
        assert train.all_mean([torch.tensor(1.0, device="meta"), 2.0, 3], run) == [0.5] * 3  # tensors and numbers
        assert train.all_mean([2.0, 3], run) == [0.5] * 2  # numbers alone, e.g. evaluate's counts
        assert [t.device.type for t in reduced] == ["meta", "meta"]
    finally:
        dist.destroy_process_group()


def test_sample_with_lora_on_a_bf16_base_prints_before_and_after(tmp_path, capsys):
    # generation meets the bf16 base and the float32 adapters in one matmul: it runs under autocast
    run(tmp_path, "--loss", "nca", "--dtype", "bfloat16", "--lora-rank", "4", "--sample", "1", "--steps", "1",
        "--no-export")
    lines = capsys.readouterr().out.splitlines()
    assert [l[:8] for l in lines if l.startswith("[")] == ["[before]", "[after] "], lines


def saved_for_backward(fn, dtype, *exclude):
    """Bytes of the distinct storages autograd keeps for backward while fn() runs, those of `exclude`
    (parameters, buffers) left out: the activation memory of a forward, measured by
    torch.autograd.graph.saved_tensors_hooks (autocast's cast copies of float32 weights included)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("targets, rank, dropout, dtype, checkpointing", [
    ("", 0, 0.0, torch.float32, False), ("", 0, 0.0, torch.bfloat16, False),
    ("q,k,v,o,gate,up,down", 4, 0.0, torch.bfloat16, False), ("q,v,down", 8, 0.5, torch.float32, False),
    ("q,k,v,o,gate,up,down", 4, 0.0, torch.bfloat16, True), ("", 0, 0.0, torch.float32, True)])
def test_plan_activation_estimate_matches_the_bytes_saved_for_backward(targets, rank, dropout, dtype, checkpointing):
    a = model_lib.PRESETS["tiny"]
    torch.manual_seed(0)
    model = model_lib.Transformer(a)
    if rank:  # as build_model: the base in the compute dtype, float32 adapters
        model = model.to(dtype)
        lora.inject(model, targets, rank, 2.0 * rank, dropout)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.checkpoint_activations = checkpointing
    B, T = 16, 33
    tokens, mask = torch.randint(0, a.vocab_size, (B, T)), torch.rand(B, T) < 0.7
    weights = [*model.parameters(), *model.buffers()]
    measured = saved_for_backward(lambda: nca.batch_logps(model, tokens, mask), dtype, *weights)
    if checkpointing:  # the hooks see each block's input that checkpoint keeps; add what backward recomputes of
        # one block (block 1: no frozen embedding before it), its input excluded (counted already)
        x = torch.randn(B, T - 1, a.dim, dtype=dtype if rank else torch.float32, requires_grad=True)
        cos, sin = model_lib.rope(torch.arange(T - 1)[None], a.dim // a.n_heads, a.rope_theta)
        measured += saved_for_backward(lambda: model.layers[1](x, cos, sin, None), dtype, x, cos, sin, *weights)
    plan = train.memory_plan(a, lora_rank=rank, targets=targets or "q", dropout=dropout, quantize="none",
                             dtype=dtype, world=1, dist_mode="fsdp", ref="adapters", batch=B, K=1, length=T,
                             checkpointing=checkpointing, tile=nca.TILE["cpu"])
    estimate = train.activation_bytes(a, tokens=B * (T - 1), scored=int(mask[:, 1:].sum()), full=not rank,
                                      adapted=set(targets.split(",")) if rank else set(), rank=rank, dropout=dropout,
                                      r=dtype.itemsize if rank else 4, c=dtype.itemsize, checkpointing=checkpointing)
    assert plan["activations (--checkpointing)"] < plan["activations (no --checkpointing)"] / 1.5
    estimate += plan["weight copies (autocast / FSDP gather)"]
    assert estimate == pytest.approx(measured, rel=0.05), (estimate, measured)


def test_plan_at_the_real_7b_shapes_loads_no_weights(tmp_path, monkeypatch, capsys):
    a = model_lib.PRESETS["mistral-7b"]
    kw = dict(targets="q,k,v,o,gate,up,down", dropout=0.0, dtype=torch.bfloat16, dist_mode="fsdp", ref="adapters",
              batch=1, K=4, length=1024, checkpointing=True, tile=nca.TILE["cuda"])
    with torch.device("meta"):
        m = lora.inject(model_lib.Transformer(a), kw["targets"], 16, 32.0)
    trainable, total = lora.count_parameters(m)
    assert total - trainable == 7_241_732_096  # Mistral 7B's parameter count
    p = train.memory_plan(a, lora_rank=16, quantize="none", world=1, **kw)
    assert p["weights"] == 7_241_732_096 * 2 and p["adapters (float32)"] == trainable * 4
    assert p["gradients (float32)"] == trainable * 4 and p["AdamW states (2 x float32)"] == trainable * 8
    nf4 = train.memory_plan(a, lora_rank=16, quantize="4bit", world=1, **kw)
    linears = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # the adapted projections: 4.5 bits each
    assert nf4["weights"] == (7_241_732_096 - linears) * 2 + linears // 2 + linears // 64 * 2
    full = train.memory_plan(a, lora_rank=0, quantize="none", world=8, **kw)  # float32 master weights, sharded
    assert full["weights"] == full["gradients (float32)"] == 7_241_732_096 * 4 // 8
    # the command: nothing loaded (monkeypatched away), K from --k, and the verdict against --gpu-memory
    monkeypatch.setattr(model_lib, "load", lambda *a, **k: pytest.fail("--plan loaded weights"))
    out = tmp_path / "init"
    model_lib.save_hf(model_lib.Transformer(model_lib.PRESETS["tiny"]), out)
    for init, gib, verdict in (("mistral-7b", "24", "fits"), ("mistral-7b", "12", "does NOT fit"), (str(out), "1", "fits")):
        capsys.readouterr()
        train.main(["--plan", "--init", init, "--lora-rank", "16", "--k", "4", "--batch-size", "1", "--max-length",
                    "1024", "--checkpointing", "--gpu-memory", gib])
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"{verdict} in --gpu-memory {gib} GiB")


def test_an_out_that_cannot_be_created_is_one_line_and_a_failed_export_keeps_the_earlier_final(tmp_path, capsys,
                                                                                               monkeypatch):
    path = write_reward_data(tmp_path / "data.jsonl")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # its parent is a file: mkdir fails
        run(tmp_path, "--steps", "1", out="data.jsonl/out", data_file=path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create" in err and "data.jsonl/out" in err, err
    run(tmp_path, "--steps", "1", out="a")
    final = tmp_path / "a" / "final"
    before = {f.name: f.read_bytes() for f in final.iterdir()}

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(model_lib, "write_safetensors", disk_full)
    with pytest.raises(SystemExit):  # resuming the finished run exports again, and that export fails
        run(tmp_path, "--steps", "1", "--resume", out="a")
    assert "No space left on device" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in final.iterdir()} == before
    assert sorted(f.name for f in final.parent.iterdir()) == ["ckpt", "curves.png", "final", "metrics.jsonl"]


@pytest.mark.parametrize("loss, extra", [("sft", []), ("dpo", ["--pairs", "dpo"]), ("infonca", []), ("nca", []),
                                         ("nca_pair", ["--pairs", "dpo"]), ("nca", ["--ref", "copy"]),
                                         ("nca", ["--lora-rank", "4", "--lora-dropout", "0.1"]),
                                         ("nca", ["--checkpointing", "--dtype", "bfloat16"]),
                                         ("sft", ["--no-pack"]), ("nca", ["--no-pack", "--ref", "copy"]),
                                         ("nca", ["--no-pack", "--lora-rank", "4"])])
def test_a_micro_batch_forward_and_backward_never_wait_for_the_device(tmp_path, host_syncs, loss, extra):
    # A CPU run shows what a CUDA run would wait for (conftest.HostSyncs). Before: the scored positions were
    # found with nonzero, the target range read with min / max (policy and reference alike) and the rewards'
    # isfinite read in the loss and in the metrics: 8 waits per NCA micro-batch. Packed (the default) and padded
    # (--no-pack) batches alike: both hand over their scored positions.
    path = write_reward_data(tmp_path / "data.jsonl", n=4, K=4)
    args = train.parse_args(["--data", path, "--max-length", "24", "--max-prompt-length", "8", "--loss", loss, *extra])
    examples = train.prepare_examples(path, args, "--data")
    run = train.configure(args, examples, 0, 1, torch.device("cpu"))
    model = tiny()
    ref = {"precompute": torch.randn(len(examples), run.K) - 30, "copy": tiny(), "adapters": None, "none": None}[run.ref]
    if run.lora_rank:
        lora.inject(model, run.lora_targets, run.lora_rank, run.lora_alpha, run.lora_dropout)
    model.checkpoint_activations = run.checkpointing
    tok = data.load_tokenizer("byte")
    with host_syncs:
        loss_value, stats, n_tokens = train.forward(run, model, tok, ref, examples, [0, 1])
        loss_value.backward()
    assert host_syncs.ops == []
    # the tokens tokens/s counts, either layout: each prompt once (read off the padded rows: the columns before
    # the first scored one of the prompt's first row) plus each response token
    padded = data.collate(examples[:2], tok, max_length=24, max_prompt_length=8)
    starts = [int(m.nonzero()[0]) for m in padded["loss_mask"][::run.K]]
    assert n_tokens == sum(starts) + int(padded["loss_mask"].sum())
    assert run.K == 1 or n_tokens < padded["tokens"].numel()  # K > 1: the padded rows repeat each prompt
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert train.collate(run, tok, examples[:1]).keys() >= ({"scored", "pos"} if run.pack else {"scored"})
    with host_syncs:  # the counter does see a sync: a direct caller handing over the mask pays one nonzero
        batch = data.collate(examples[:1], tok, max_length=24, max_prompt_length=8)
        nca.batch_logps(model, batch["tokens"], batch["loss_mask"])
    assert host_syncs.ops == ["aten.nonzero.default"]


@pytest.mark.parametrize("extra", [["--lora-rank", "4"], ["--checkpointing"]])
def test_the_training_loop_waits_for_the_device_once_per_step(tmp_path, host_syncs, extra):
    # Per optimizer step the host reads the device once: all_mean's tolist of the step's metrics (and
    # grad_norm). Not counted: AdamW's own reads, of its step counts, which PyTorch keeps on the host
    # (state["step"] is a CPU tensor unless capturable or fused), so on a GPU they wait for nothing.
    in_optimizer = []
    hooks = [optimizer_hooks.register_optimizer_step_pre_hook(lambda *a: in_optimizer.append(len(host_syncs.ops))),
             optimizer_hooks.register_optimizer_step_post_hook(lambda *a: in_optimizer.append(len(host_syncs.ops)))]
    train.permutation.cache_clear()  # the shuffles below are computed, not remembered from another test
    try:
        with host_syncs:
            run(tmp_path, *extra, "--batch-size", "2", "--grad-accum", "2", "--steps", "2", "--no-export")
    finally:
        for h in hooks:
            h.remove()
    assert len(in_optimizer) == 4
    (a, b), (c, d) = in_optimizer[:2], in_optimizer[2:]
    outside = host_syncs.ops[:a] + host_syncs.ops[b:c] + host_syncs.ops[d:]
    # 2 x tolist of the seeded shuffles of the example indices (held-out split, epoch 0; host tensors) + 1 per step
    assert outside == ["tolist"] * (2 + 2), outside
