"""bench.py gpu: the FLOP count behind its MFU, and that every part runs (at toy sizes, on the CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import model as model_lib
import train

ROOT = Path(__file__).resolve().parent.parent


def test_step_flops_are_the_matmul_flops_torch_counts_in_a_lora_nca_step(tmp_path):
    # golden: torch's FlopCounterMode over train.forward + backward of one micro-batch (LoRA r = 4 on all seven
    # projections, reference = adapters off). It does not count the CPU's attention kernel, so the formula's
    # attention term is left out (length 0); every other matmul must match exactly.
    T, P, K, r = 24, 8, 4, 4
    path = tmp_path / "data.jsonl"  # byte tokens: BOS + 7 prompt bytes, responses cut at T
    path.write_text(json.dumps({"prompt": "q" * (P - 1), "responses": [c * T for c in "abcd"], "rewards": [4, 3, 2, 1]}))
    args = train.parse_args(["--data", str(path), "--lora-rank", str(r), "--max-length", str(T),
                             "--max-prompt-length", str(P), "--batch-size", "1", "--no-pack"])  # the formula's rows
    examples = train.prepare_examples(path, args, "--data")
    run = train.configure(args, examples, 0, 1, torch.device("cpu"))
    tok = data.load_tokenizer("byte")
    model, _ = train.build_model(run, tok)
    with FlopCounterMode(display=False) as counter:
        loss, _, n = train.forward(run, model, tok, None, examples, [0])
        loss.backward()
    assert n == P + K * (T - P) and set(map(str, counter.get_flop_counts()["Global"])) == {"aten.mm"}
    expected = bench.step_flops(model_lib.PRESETS["tiny"], tokens=K * (T - 1), length=0, scored=K * (T - P), r=r,
                                targets=run.lora_targets.split(","))
    assert counter.get_total_flops() == expected


def test_gpu_bench_runs_each_part_in_a_process_of_its_own_and_a_failed_part_does_not_stop_the_next(capsys):
    results = bench.run_gpu_parts(["no-such-part", "generate"], ["--device", "cpu", "--smoke"], budget=300)
    lines = capsys.readouterr().out.splitlines()
    error = json.loads(lines[0])
    assert error["part"] == "no-such-part" and "KeyError" in error["error"]
    assert results["no-such-part"] == (False, []) and results["generate"][0]
    figures = results["generate"][1]
    assert [f["batch"] for f in figures] == [1, 16] and all(f["value"] > 0 for f in figures)
    assert all(f["device"] == "cpu (host CPU)" and f["smoke"] for f in figures)


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_part_on_the_cpu():
    p = subprocess.run([sys.executable, "bench.py", "gpu", "--smoke", "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    figures = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert not [f for f in figures if "error" in f], p.stdout
    assert {f["part"] for f in figures} == set(bench.GPU_PARTS) | {"summary"}
    assert all(f["value"] for f in figures if f["figure"] in ("train.py run", "round trip exact")), p.stdout
    assert all(f["smoke"] for f in figures)
