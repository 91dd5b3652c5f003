"""toy/arith.py (the task and its reward) and toy/pipeline.py (SFT -> sample K -> align -> evaluate)."""
import dataclasses
import json
import random
import re

import pytest
import torch

import data
import model as model_lib
from toy import arith, pipeline

P = "47+38-19="  # 47+38=85, 85-19=66


@pytest.mark.parametrize("response, expected", [
    ("47+38=85;85-19=66;#66", 1.0),  # the worked answer
    ("47+38=85;85-19=66;#66\n", 1.0),  # trailing whitespace is not an error
    ("47+38=86;86-19=66;#66", 1.0),  # the final answer alone decides correctness (outcome reward)
    ("47+38=85;85-19=67;#67", 0.4 * 1 / 2 + 0.1),  # first step right, last step wrong
    ("47+38=84;84-19=65;#65", 0.1),  # a slip carried through: no step as expected, but an answer
    ("47+38=85;85-19=66", 0.4),  # both steps right but no '#answer'
    ("#65", 0.1),
    ("66", 0.0),  # no '#': not an answer
    ("garbage", 0.0),
    ("47+38=85;85-19=66;#6 6", 0.4),  # the answer does not parse
])
def test_reward_grades_hand_written_responses(response, expected):
    assert arith.reward(P, response) == pytest.approx(expected)


def test_any_correct_answer_outranks_every_wrong_one():
    wrong = ["47+38=85;85-19=65;#65", "47+38=85;85-19=66;#67", "47+38=85;85-19=66"]
    assert max(arith.reward(P, y) for y in wrong) < arith.reward(P, "47+38=1;1-19=0;#66") == 1.0


def test_solve_works_the_chain_left_to_right():
    assert arith.solve(P) == "47+38=85;85-19=66;#66"
    assert arith.solve("5-5+0=") == "5-5=0;0+0=0;#0"
    with pytest.raises(ValueError, match="not a task prompt"):
        arith.steps("47+38")


def test_held_out_prompts_never_appear_in_the_train_split():
    train = arith.prompts(2000, split="train", seed=0, max_operand=20)
    test = arith.prompts(300, split="test", seed=0, max_operand=20)
    assert len(set(train)) == 2000 and len(set(test)) == 300
    assert not set(train) & set(test)
    assert all(arith.answer(p) >= 0 for p in train + test)


def test_demonstrations_are_wrong_at_the_requested_rate():
    rng = random.Random(0)
    ps = arith.prompts(2000, split="train", seed=1)
    assert all(arith.is_correct(p, arith.demonstration(p, rng, 0.0)) for p in ps[:200])
    wrong = sum(not arith.is_correct(p, arith.demonstration(p, rng, 0.3)) for p in ps)
    assert abs(wrong / len(ps) - 0.3) < 0.04  # binomial sd is 0.01


def test_dropped_carries_follow_the_demonstrators_habit():
    # 7+15 carries (7+5=12): dropped, 7+15=12; 12-3 borrows (2<3): dropped, 12-3=19, which is 22-3's answer
    assert arith.demonstration("7+15-3=", random.Random(0), 0.0, p_carry=1.0) == "7+15=12;12-3=19;#19"
    assert arith.demonstration("7+15-3=", random.Random(0), 0.0, p_carry=0.0) == "7+15=22;22-3=19;#19"
    assert arith.demonstration("11+2-1=", random.Random(0), 0.0, p_carry=1.0) == "11+2=13;13-1=12;#12"  # no carry
    ps = arith.prompts(2000, split="train", seed=2, n_ops=1, max_operand=99)  # "a+b=" or "a-b=": one step
    carry = [p for p in ps if arith.carries(int(p[:-1].replace("-", "+").split("+")[0]), "-" if "-" in p else "+",
                                            int(p[:-1].replace("-", "+").split("+")[1]))]
    rng = random.Random(0)
    dropped = sum(not arith.is_correct(p, arith.demonstration(p, rng, 0.0, p_carry=0.6)) for p in carry)
    assert len(carry) > 500 and abs(dropped / len(carry) - 0.6) < 0.07  # binomial sd <= 0.022


def test_paired_interval_matches_hand_worked_numbers():
    sft = {0: 0.5, 1: 0.6, 2: 0.4}
    method = {0: [0.6, 0.7, 0.8], 1: [0.6, 0.6, 0.9], 2: [0.7, 0.7, 0.7]}  # differences: means 0.2, 0.1, 0.3
    runs = lambda f: [{"sft_seed": s, "seed": a, "greedy_acc": f(s, a)} for s in range(3) for a in range(3)]
    mean, half = pipeline.paired(runs(lambda s, a: method[s][a]), runs(lambda s, a: sft[s]))
    # the 3 per-SFT-seed means have mean 0.2 and standard deviation 0.1: 0.2 ± t(0.975, 2) * 0.1 / sqrt(3)
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-6)
    # 9 independent-looking differences would give the narrower t(0.975, 8) * sd / 3 = 0.0876: not what we want
    assert half == pytest.approx(0.2484, abs=1e-4)
    with pytest.raises(ValueError, match="unpaired runs"):
        pipeline.paired(runs(lambda s, a: 0.0), runs(lambda s, a: 0.0)[::-1])


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is the oracle for Student's t quantiles")
    for df, t in pipeline.T975.items():
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4), df


def test_reading_says_what_the_numbers_say():
    logs = {"dpo": [{"logratio/chosen": c, "logratio/rejected": -2 * i} for i, c in enumerate([0.0] * 9 + [-1.5])],
            "nca": [{"logratio/chosen": c, "logratio/rejected": -1.0} for c in [0.0] * 9 + [0.25]]}
    line = pipeline.reading(logs, {"sft": 0.5, "dpo": 0.6, "nca": 0.7})
    assert "DPO's chosen log pi/mu falls to -1.50 (rejected -18.00)" in line
    assert "NCA's chosen log pi/mu rises to +0.25 (rejected -1.00)" in line
    assert line.endswith("SFT 0.500, DPO 0.600, NCA 0.700: NCA is highest")


def test_cpu_capability_reaches_every_train_run_and_every_stage_key(tmp_path, monkeypatch):
    # a stand-in train.py that reports the kernels torch chose in it: the variable must reach a real child process
    (tmp_path / "train.py").write_text("import torch; print(torch.backends.cpu.get_cpu_capability())")
    monkeypatch.setattr(pipeline, "ROOT", tmp_path)
    here = pipeline.Config()
    assert here.cpu_capability == torch.backends.cpu.get_cpu_capability().lower()
    other = dataclasses.replace(here, cpu_capability="default")  # no vector kernels: valid on every CPU
    pipeline._train(other, [], tmp_path / "log.txt")
    assert (tmp_path / "log.txt").read_text().split() == ["DEFAULT"]
    for stage in (pipeline.SFT, pipeline.SAMPLE, pipeline.ALIGN):  # another rounding: every stage runs again
        assert pipeline._key(here, *stage) != pipeline._key(other, *stage)
    if here.cpu_capability != "default":  # this process imported torch with its own kernels: refused, one line
        with pytest.raises(ValueError, match="this process runs .* start Python with ATEN_CPU_CAPABILITY=default"):
            pipeline.run(dataclasses.replace(other, out=str(tmp_path)))


def test_reduced_pipeline_runs_end_to_end_and_writes_data_that_data_py_reads(tmp_path):
    cfg = dataclasses.replace(
        pipeline.Config(), out=str(tmp_path), sft_seeds=(0, 1), seeds=(0,), methods=("dpo", "nca"), n_demos=400,
        sft_steps=150, sft_segments=2, sft_batch=32, n_prompts=32, n_test=12, steps=4, batch=4, dim=32, n_layers=1,
        n_heads=2, hidden_dim=64, jobs=2)  # SFT just learns the format
    results, curves = pipeline.run(cfg)
    assert list(results) == ["sft", "dpo", "nca"]
    for method, runs in results.items():
        assert [(r["sft_seed"], r["seed"]) for r in runs] == [(0, 0), (1, 0)], method
        assert all(torch.isfinite(torch.tensor(r[k])) for r in runs for k in pipeline.COLUMNS), method
    # pi = mu: the KL estimate and the chosen log-ratio are exactly 0
    assert all(r["kl"] == 0 and r["chosen_logratio"] == 0 for r in results["sft"])
    # the curve's last point is the SFT model the table starts from
    assert [c["step"] for c in curves[0]] == [75, 150]
    assert curves[1][-1]["greedy_acc"] == results["sft"][1]["greedy_acc"]
    md = pipeline.report(cfg, results, curves, "t")
    assert all(f"| {m} |" in md for m in results) and "NCA minus DPO" in md
    assert (tmp_path / "t.png").stat().st_size > 0 and (tmp_path / "t_sft.png").stat().st_size > 0

    # stage 2's file is reward-format JSON Lines; its rewards are the task's reward of each response
    (path,) = tmp_path.glob("data-*-s0-0.jsonl")
    examples = data.load_examples(path)
    assert len(examples) > 0 and all(len(e.responses) == cfg.K for e in examples)
    for e in examples:
        assert e.rewards == [arith.reward(e.prompt, y) for y in e.responses]

    # a rerun finds every stage in --out and trains nothing; so does the demo on SFT seed 0's runs
    assert json.dumps(pipeline.run(cfg)) == json.dumps([results, curves])
    demo_results, line = pipeline.demo(dataclasses.replace(cfg, sft_seeds=(0,)))
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert f"SFT {results['sft'][0]['greedy_acc']:.3f}, DPO {results['dpo'][0]['greedy_acc']:.3f}" in line


def test_sequence_logps_match_a_full_softmax_by_hand():
    torch.manual_seed(0)
    mu = model_lib.Transformer(model_lib.ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=259,
                                                   hidden_dim=64))
    prompts, responses = [[256, 49, 43], [256, 50]], [[61, 52, 257], [61, 257]]
    got = pipeline.logps(mu, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        logp = torch.log_softmax(mu(torch.tensor([p + r])).double(), -1)[0]  # [T, V]
        want = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(r))
        assert got[i].item() == pytest.approx(want.item(), abs=1e-4)


def test_off_policy_reward_data_come_from_the_stated_demonstrators(tmp_path):
    # no slips, one operation: each response is right unless its demonstrator dropped the prompt's carry
    cfg = dataclasses.replace(pipeline.Config(), out=str(tmp_path), responses="others", p_error=0.0, n_ops=1,
                              max_operand=99, n_prompts=2000)
    path = pipeline.stage_sample(cfg, None, data.load_tokenizer("byte"), 0, 0)  # mu=None: nothing is sampled from mu
    rows = data.read_jsonl(path)
    assert len(rows) == 2000 and all(r["rewards"] == [arith.reward(r["prompt"], y) for y in r["responses"]] for r in rows)
    for r in rows:
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", r["prompt"]).groups()
        dropped = f"{a}{op}{b}={int(a) + int(b) - 10 if op == '+' else int(a) - int(b) + 10}"
        has = (int(a) % 10 + int(b) % 10 >= 10) if op == "+" else int(a) % 10 < int(b) % 10  # by hand, not arith.carries
        assert r["responses"][0] == arith.solve(r["prompt"])  # p_carry 0: always right
        assert r["responses"][3] == (f"{dropped};#{dropped.split('=')[1]}" if has else arith.solve(r["prompt"]))
    # p_carry 0.5 and 0.75 drop the carry at their rates where there is one, and are right where there is none
    carry = [r["responses"][3] != r["responses"][0] for r in rows]
    for i, p_carry in ((1, 0.5), (2, 0.75)):
        wrong = [r["responses"][i] != r["responses"][0] for r in rows]
        assert not any(w and not c for w, c in zip(wrong, carry))
        share = sum(wrong) / sum(carry)
        assert sum(carry) > 700 and abs(share - p_carry) < 0.06, (i, share)  # binomial sd <= 0.019
    # another source of responses is another file and every later stage reruns; SFT's model is kept
    mu = dataclasses.replace(cfg, responses="mu")
    assert pipeline._key(cfg, *pipeline.SFT) == pipeline._key(mu, *pipeline.SFT)
    for stage in (pipeline.SAMPLE, pipeline.ALIGN):
        assert pipeline._key(cfg, *stage) != pipeline._key(mu, *stage)
    with pytest.raises(ValueError, match="responses 'others' with K = 3: expected 'mu', or 'others' with K = 4"):
        pipeline.run(dataclasses.replace(cfg, K=3))


def test_a_table_of_one_sft_seed_is_refused_at_once(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--sft-seeds", "1", "--out", "unused"])
    assert "--sft-seeds 1: the intervals need >= 2 SFT seeds" in capsys.readouterr().err
