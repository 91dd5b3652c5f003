"""A synthetic reasoning task with an exact reward: short chains of 2-digit additions/subtractions.

    prompt    "47+38-19="
    response  "47+38=85;85-19=66;#66"        (one worked step per operation, then "#answer")

Like the paper's math benchmarks (UltraInteract, GSM8K-style), a response is a chain of steps and
only the final answer is checked strictly; the reward also gives partial credit per correct step,
so K sampled responses usually carry *different* rewards (what InfoNCA / NCA's soft labels use).
Everything is generated from a seed: no files, no downloads.
"""
import random
import re
import zlib

HELD_OUT_EVERY = 8  # one prompt in 8 (by a hash of its text) is held out: never trained on


def is_held_out(prompt):
    # a hash of the text, not of the generation order, so every split and seed agrees on it
    return zlib.crc32(prompt.encode()) % HELD_OUT_EVERY == 0


def make_prompt(rng, n_ops=2, max_operand=99):
    """One prompt: n_ops + 1 operands in [0, max_operand], '+' or '-', no intermediate below 0."""
    while True:
        xs = [rng.randint(0, max_operand) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-") for _ in range(n_ops)]
        if all(v >= 0 for v in _running(xs, ops)):
            return str(xs[0]) + "".join(o + str(x) for o, x in zip(ops, xs[1:])) + "="


def prompts(n, *, split, seed, n_ops=2, max_operand=99):
    """n distinct prompts of the given split ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng, out, seen, tries = random.Random(f"{split}-{seed}"), [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:  # asking for more prompts than exist must fail, not hang
            raise ValueError(f"found only {len(out)} of {n} distinct {split} prompts with {n_ops} ops and "
                             f"operands <= {max_operand}")
        p = make_prompt(rng, n_ops, max_operand)
        if p not in seen and is_held_out(p) == (split == "test"):
            seen.add(p)
            out.append(p)
    return out


def _parse_prompt(prompt):
    m = re.fullmatch(r"(\d+)((?:[+-]\d+)+)=", prompt)
    if m is None:
        raise ValueError(f"not a task prompt (expected like '47+38-19='): {prompt!r}")
    xs = [int(m.group(1))] + [int(x) for x in re.findall(r"\d+", m.group(2))]
    ops = re.findall(r"[+-]", m.group(2))
    return xs, ops


def _running(xs, ops):
    acc, out = xs[0], []
    for o, x in zip(ops, xs[1:]):
        acc = acc + x if o == "+" else acc - x
        out.append(acc)
    return out


def steps(prompt):
    """The correct worked steps, e.g. ["47+38=85", "85-19=66"]."""
    xs, ops = _parse_prompt(prompt)
    lhs = [xs[0]] + _running(xs, ops)[:-1]
    return [f"{a}{o}{x}={a + x if o == '+' else a - x}" for a, o, x in zip(lhs, ops, xs[1:])]


def answer(prompt):
    xs, ops = _parse_prompt(prompt)
    return _running(xs, ops)[-1]


def solve(prompt):
    """The correct response: the steps joined by ';', then '#answer'."""
    return ";".join(steps(prompt)) + f";#{answer(prompt)}"


def carries(acc, op, x):
    """Does acc op x carry (a sum's units reach 10) or borrow (a difference's units go below 0)?"""
    return acc % 10 + x % 10 >= 10 if op == "+" else acc % 10 < x % 10


def demonstration(prompt, rng, p_error, p_carry=0.0):
    """An SFT demonstration with two kinds of human mistakes, each carried through the later steps:
    with probability p_error one step's result is off by a few (a random slip), and every step that
    carries or borrows drops the carry with probability p_carry (a systematic slip: off by exactly 10).
    Random slips never make a wrong answer the most likely one, so a policy that imitates them well
    ends correct; p_carry > 0.5 makes the dropped carry the demonstrator's habit, so imitation
    (SFT) settles on a wrong answer wherever a carry occurs and only the reward can teach it back."""
    xs, ops = _parse_prompt(prompt)
    bad = rng.randrange(len(ops)) if rng.random() < p_error else -1
    acc, parts = xs[0], []
    for i, (o, x) in enumerate(zip(ops, xs[1:])):
        new = acc + x if o == "+" else acc - x
        if carries(acc, o, x) and rng.random() < p_carry:
            new += -10 if o == "+" else 10  # 7+5=2, 15-7=18
        if i == bad:
            new += rng.choice([-10, -2, -1, 1, 2, 10])  # the slips a person makes: a digit or a carry
        parts.append(f"{acc}{o}{x}={new}")
        acc = new
    return ";".join(parts) + f";#{acc}"


_ANSWER = re.compile(r"#(-?\d+)")


def reward(prompt, response):
    """r(x, y) in [0, 1]: 1 if the final answer is right; otherwise partial credit,
    0.4 * (share of the steps written exactly right, in place) + 0.1 if a '#<integer>' answer parses.

    Partial credit is at most 0.5, so any correct answer outranks every wrong one.
    """
    want, parts = steps(prompt), response.strip().split(";")
    got = [s for s in parts if not s.startswith("#")]
    m = _ANSWER.fullmatch(parts[-1])
    if m is not None and int(m.group(1)) == answer(prompt):
        return 1.0
    right = sum(g == w for g, w in zip(got, want))
    return round(0.4 * right / len(want) + (0.1 if m is not None else 0.0), 4)


def is_correct(prompt, response):
    return reward(prompt, response) == 1.0
