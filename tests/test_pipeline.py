"""toy/arith.py (the task and its reward) and toy/pipeline.py (SFT -> sample K -> align -> evaluate)."""
import dataclasses
import json
import random

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


def test_reduced_pipeline_runs_end_to_end_and_writes_data_that_data_py_reads(tmp_path):
    cfg = dataclasses.replace(
        pipeline.Config(), out=str(tmp_path), seeds=(0,), n_demos=400, sft_steps=150, sft_batch=32, n_prompts=32,
        n_test=12, steps=4, batch=4, dim=32, n_layers=1, n_heads=2, hidden_dim=64)  # SFT just learns the format
    results = pipeline.run(cfg)
    assert list(results) == ["sft", *pipeline.METHODS]
    for method, runs in results.items():
        assert len(runs) == 1 and all(torch.isfinite(torch.tensor(v)) for v in runs[0].values()), method
    # pi = mu: the KL estimate and the chosen log-ratio are exactly 0
    assert results["sft"][0]["kl"] == 0 and results["sft"][0]["chosen_logratio"] == 0
    md = pipeline.report(cfg, results, "t")
    assert all(f"| {m} |" in md for m in results) and (tmp_path / "t.png").stat().st_size > 0

    # stage 2's file is reward-format JSON Lines; its rewards are the task's reward of each response
    (path,) = tmp_path.glob("data-*-s0.jsonl")
    examples = data.load_examples(path)
    assert len(examples) > 0 and all(len(e.responses) == cfg.K for e in examples)
    for e in examples:
        assert e.rewards == [arith.reward(e.prompt, y) for y in e.responses]

    # a rerun finds every stage in --out and trains nothing
    assert json.dumps(pipeline.run(cfg)) == json.dumps(results)


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
