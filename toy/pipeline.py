"""The paper's pipeline in miniature, on a CPU: SFT -> sample K and score -> align -> evaluate.

    python train.py                        # demo(): SFT seed 0, DPO and NCA on one reward file, out/pipeline/demo.png
    python toy/pipeline.py                 # the full table: 6 methods x 3 SFT seeds x 3 seeds -> toy/figures/pipeline_t1_avx512.*
    ATEN_CPU_CAPABILITY=avx2 python toy/pipeline.py   # the same on ATen's AVX2 kernels (an AVX2-only CPU's rounding)
    python toy/pipeline.py --threads 2     # the same on 2 torch threads (its own runs; bit-identical on our CPU)

The task is toy/arith.py: chains of additions with a worked answer ("7+15-3=" -> "7+15=22;22-3=19;#19")
and an exact reward (1 for the right answer, partial credit per correct step). The demonstrations
drop a carry more often than not, a habit SFT learns and only the reward can unlearn. The reward data
are K responses per prompt sampled from the SFT policy mu (on-policy) and scored, and every alignment
method trains from mu on the same file. The paper's are not on-policy: UltraFeedback's K = 4 responses
per prompt come from 4 other models, none of them the SFT model (Sec. 5); Config.responses = "others"
builds such a file from 4 other demonstrators of the task (OTHERS), and README reports what it changes.
    stage 1  SFT a tiny model on the demonstrations, in segments: its learning curve   train.py --loss sft
    stage 2  K responses per train prompt, sampled from mu (KV-cache generate), scored -> reward JSON Lines
    stage 3  DPO (best vs random), DPO x3, DPO on all pairs, InfoNCA, NCA, pairwise NCA, one budget
    stage 4  held-out greedy accuracy and reward, chosen log-ratio log pi - log mu, KL(pi || mu)
Everything goes to --out (default out/pipeline, ignored by git); each stage's result is kept under a
name hashed from the settings it depends on, so a rerun only redoes what changed.
"""
import argparse
import dataclasses
import hashlib
import json
import random
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__":  # `python toy/pipeline.py` puts toy/ on the path; the modules live one level up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import data
import model as model_lib
import nca
from toy import arith

ROOT = Path(__file__).resolve().parent.parent

# name -> (train.py --loss, --pairs): the paper's comparisons on K = 4 reward data (Chen et al. 2024, Sec. 5)
METHODS = {
    "dpo": ("dpo", "dpo"),  # best vs one random other (Zephyr-beta recipe)
    "dpo_x3": ("dpo", "dpo_x3"),  # best vs each of the other K - 1
    "dpo_all": ("dpo", "dpo_all"),  # every pair the rewards order, C(K, 2)
    "infonca": ("infonca", "none"),
    "nca": ("nca", "none"),
    "nca_pair": ("nca_pair", "dpo"),  # NCA's pairwise loss on DPO's pairs
}
MAX_NEW = 32  # the longest answer ("99+99=198;198+99=297;#297") is 25 bytes + EOS
MAX_PROMPT = 16  # BOS + "99+99+99=" is 10 tokens


@dataclasses.dataclass(frozen=True)
class Config:
    out: str = "out/pipeline"
    sft_seeds: tuple = (0, 1, 2)  # SFT: the model's init and batch order
    seeds: tuple = (0, 1, 2)  # per SFT model: the reward data's sampling and the alignment run's batch order
    methods: tuple = tuple(METHODS)
    # the task (toy/arith.py)
    n_ops: int = 2
    max_operand: int = 20
    p_error: float = 0.2  # share of demonstrations with a random slip (never the most likely answer)
    p_carry: float = 0.75  # a carry is dropped this often: SFT's greedy answer drops every carry, which is right
    # on 51% of the held-out prompts (those without a carry, or whose dropped carries cancel): room to help and hurt
    n_demos: int = 8000
    n_prompts: int = 1024  # stage 2: train prompts that get K samples each: one epoch of stage 3 (steps x batch)
    n_test: int = 512  # held-out prompts for stage 4 (and the SFT curve): one prompt is 0.2 points
    K: int = 4
    # where the K responses per prompt come from: "mu" samples them from the SFT model (on-policy), "others"
    # takes one from each of the K policies in OTHERS (off-policy, as UltraFeedback's come from other models)
    responses: str = "mu"
    temperature: float = 1.0  # sampling from mu (reward data, held-out KL)
    # the model: a decoder from model.py, byte tokenizer
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 192
    # stage 1: sft_segments train.py runs of sft_steps / sft_segments steps, each from the last
    sft_steps: int = 3200  # the curve is flat over the last quarter on every SFT seed (README)
    sft_segments: int = 4
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # stage 3: one budget for every method (steps x prompts per step; a pair counts as a prompt)
    steps: int = 32
    batch: int = 32
    lr: float = 3e-4
    beta: float = 1.0  # tiny models drift far per step: beta 0.1 let every method lose accuracy, see README
    alpha: float = 0.1  # rewards are in [0, 1]: a right answer (1.0) outweighs a near miss (0.5) by e^5
    lora_rank: int = 0  # 0 = full fine-tuning
    # torch's intra-op threads in every train.py and here. Part of every stage's key: another thread count
    # sums in another order, a float rounding change like another machine's, so it gets its own runs.
    # One by default: tiny matrices gain little from a second thread, and on a busy machine threads that
    # spin-wait for each other made a step 10-20x slower (measured 2.3 s vs 0.12 s).
    threads: int = 1
    # ATen's vectorised CPU kernels (attention, softmax, SiLU, ...) here and in every train.py run. torch picks
    # the CPU's widest at import, unless ATEN_CPU_CAPABILITY (avx512, avx2, default) names a narrower one; another
    # CPU family runs other kernels that round differently, so `ATEN_CPU_CAPABILITY=avx2` makes an AVX-512
    # machine round as an AVX2-only one does (a second thread does not: tiny matrices stay on one thread).
    # Read from torch, so it is what really ran; part of every stage's key.
    cpu_capability: str = torch.backends.cpu.get_cpu_capability().lower()
    jobs: int = 1  # alignment runs at once (of one reward file): up to cores // threads; no effect on the results


def _key(cfg, *fields, extra=()):
    """A short hash of the settings a stage depends on: its folder name, so a change makes a new one."""
    blob = json.dumps([[getattr(cfg, f) for f in fields], list(extra)])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


TASK = ("n_ops", "max_operand")
SFT = TASK + ("threads", "cpu_capability", "p_error", "p_carry", "n_demos", "dim", "n_layers", "n_heads", "hidden_dim", "sft_steps",
              "sft_segments", "sft_batch", "sft_lr", "n_test")
SAMPLE = SFT + ("n_prompts", "K", "responses", "temperature")
ALIGN = SAMPLE + ("steps", "batch", "lr", "beta", "alpha", "lora_rank")


def _resume(run):
    """A stage stopped part-way (its checkpoint there, its final/ not yet) continues where it stopped."""
    return ["--resume"] if (run / "ckpt" / "state.pt").is_file() else []


def _train(cfg, argv, log):
    """`python train.py ARGV` with its per-step lines sent to a log file: the pipeline prints one line per
    stage. A process of its own, on cfg.threads threads (OMP_NUM_THREADS sets torch's intra-op threads) and
    cfg.cpu_capability's kernels."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], stdout=f,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads),
                                   "ATEN_CPU_CAPABILITY": cfg.cpu_capability})
    if done.returncode:
        tail = Path(log).read_text().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"train.py {' '.join(argv)} failed (exit {done.returncode}): {tail[0]}; see {log}")


# ----------------------------------------------------------------------------- stage 1: SFT

INIT_LOCK = threading.Lock()


def stage_sft(cfg, seed, tok, test):
    """A tiny decoder trained on imperfect demonstrations -> (OUT/sft-<key>-s<seed>/seg<last>/final, curve).

    train.py checkpoints one model per run, so SFT is sft_segments runs, each from the last one's model
    (a cosine schedule with warm restarts, Loshchilov & Hutter 2017): each segment's end is a model whose
    held-out greedy accuracy is a point of the learning curve [{"step", "greedy_acc", "greedy_reward"}]."""
    run = Path(cfg.out) / f"sft-{_key(cfg, *SFT)}-s{seed}"
    final = run / f"seg{cfg.sft_segments - 1}" / "final"
    if (run / "curve.json").is_file():
        return final, json.loads((run / "curve.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)  # the demonstrations are the task's: the same for every seed
    demos = [{"prompt": p, "response": arith.demonstration(p, rng, cfg.p_error, cfg.p_carry)}
             for p in arith.prompts(cfg.n_demos, split="train", seed=0, n_ops=cfg.n_ops, max_operand=cfg.max_operand)]
    data.write_jsonl(run / "demos.jsonl", demos)
    # train.py builds presets only; an explicit small config is a checkpoint directory to --init from
    args = model_lib.ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                               vocab_size=tok.vocab_size, hidden_dim=cfg.hidden_dim, max_seq_len=MAX_PROMPT + MAX_NEW + 1)
    with INIT_LOCK:  # SFT seeds may run in threads (run()); torch's global RNG must give each its own init
        torch.manual_seed(seed)
        model_lib.save_hf(model_lib.Transformer(args), run / "init", config={"nca_tokenizer": "byte", "nca_template": "none"})
    t0, init, curve, n = time.time(), run / "init", [], cfg.sft_steps // cfg.sft_segments
    for i in range(cfg.sft_segments):
        seg = run / f"seg{i}"
        if not (seg / "final" / "config.json").is_file():
            seg.mkdir(exist_ok=True)
            _train(cfg, ["--loss", "sft", "--data", str(run / "demos.jsonl"), "--init", str(init), "--out", str(seg),
                    "--steps", str(n), "--batch-size", str(cfg.sft_batch), "--lr", str(cfg.sft_lr), "--seed", str(seed),
                    "--warmup", "50", "--max-length", str(MAX_PROMPT + MAX_NEW), "--max-prompt-length", str(MAX_PROMPT),
                    "--save-every", str(n), "--eval-every", str(n), *_resume(seg)], seg / "log.txt")
        init = seg / "final"
        acc, reward = greedy(model_lib.load(init), tok, test)
        curve.append({"step": (i + 1) * n, "greedy_acc": acc, "greedy_reward": reward})
    (run / "curve.json").write_text(json.dumps(curve))
    print(f"stage 1 SFT (seed {seed}): {cfg.sft_steps} steps x {cfg.sft_batch} demonstrations in {time.time() - t0:.0f}s, "
          f"held-out greedy accuracy " + " -> ".join(f"{c['greedy_acc']:.3f}" for c in curve) + f" -> {run}")
    return final, curve


# ----------------------------------------------------------------------------- stage 2: sample K, score

# The other policies of responses="others", one response each: the task's demonstrator with its random slips
# (p_error) and the carry habit at four strengths, from one that never drops a carry (0) through mu's own
# teacher (0.75) to one that drops every carry (1). UltraFeedback's K = 4 responses per prompt likewise come from 4 other
# models of mixed quality, none of them the SFT model being aligned (Cui et al. 2023; Chen et al. 2024, Sec. 5).
OTHERS = (0.0, 0.5, 0.75, 1.0)  # p_carry of each; fixed before any run, not tuned


def sample(model, tok, prompts, n, *, temperature, seed):
    """n responses per prompt as token ids (EOS included if produced): [len(prompts)][n]."""
    ids = data.prompt_ids(prompts, tok, max_length=MAX_PROMPT + MAX_NEW, max_prompt_length=MAX_PROMPT)
    g = torch.Generator().manual_seed(seed)
    outs = model_lib.generate(model, [p for p in ids for _ in range(n)], max_new_tokens=MAX_NEW,
                              temperature=temperature, eos_id=tok.eos_id, generator=g)
    return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]


def text(tok, ids):
    return tok.decode([i for i in ids if i < 256])  # bytes only: EOS (and any stray special) is not text


def responses(cfg, mu, tok, prompts, seed):
    """K responses per prompt as token ids with EOS, [len(prompts)][K]: sampled from mu, or one from each
    of the OTHERS demonstrators (cfg.responses)."""
    if cfg.responses == "mu":
        return sample(mu, tok, prompts, cfg.K, temperature=cfg.temperature, seed=seed)
    rng = random.Random(seed)
    return [[tok.encode(arith.demonstration(p, rng, cfg.p_error, q)) + [tok.eos_id] for q in OTHERS] for p in prompts]


def reward_rows(tok, prompts, ys_all):
    """Token-id responses [len(prompts)][K], scored by arith.reward -> (reward-format rows {prompt, responses,
    rewards}, prompts dropped): data.py rejects an empty response (an immediate EOS), so its prompt is skipped."""
    rows = []
    for p, ys in zip(prompts, ys_all):
        ys = [text(tok, y) for y in ys]
        if all(y.strip() for y in ys):
            rows.append({"prompt": p, "responses": ys, "rewards": [arith.reward(p, y) for y in ys]})
    return rows, len(prompts) - len(rows)


def stage_sample(cfg, mu, tok, sft_seed, seed):
    """K responses per train prompt (responses()), scored by arith.reward -> reward-format JSON Lines
    {prompt, responses, rewards}: the UltraFeedback-style file train.py reads."""
    path = Path(cfg.out) / f"data-{_key(cfg, *SAMPLE)}-s{sft_seed}-{seed}.jsonl"
    if path.is_file():
        return path
    t0 = time.time()
    prompts = arith.prompts(cfg.n_prompts, split="train", seed=1000 + seed, n_ops=cfg.n_ops, max_operand=cfg.max_operand)
    rows, dropped = reward_rows(tok, prompts, responses(cfg, mu, tok, prompts, 100 * sft_seed + seed))
    data.write_jsonl(path, rows)
    r = torch.tensor([row["rewards"] for row in rows])
    print(f"stage 2 data (SFT seed {sft_seed}, seed {seed}): {len(rows)} prompts x K = {cfg.K} in {time.time() - t0:.0f}s, mean reward "
          f"{r.mean():.3f}, correct {(r == 1).float().mean():.3f}, prompts with all K tied {(r == r[:, :1]).all(1).float().mean():.2f}"
          f"{f', {dropped} dropped (an empty response)' if dropped else ''} -> {path}")
    return path


# ----------------------------------------------------------------------------- stage 3: align

def align_dir(cfg, method, sft_seed, seed):  # extra: every run evaluates on the test prompts' file (stage_align)
    return Path(cfg.out) / f"{method}-{_key(cfg, *ALIGN, extra=['--eval-data test'])}-s{sft_seed}-{seed}"


def stage_align(cfg, sft, data_path, test_path, method, sft_seed, seed):
    """train.py from mu on the reward file with one method's loss and pairing -> OUT/<method>-<key>-s<sft seed>-<seed>.
    It trains on every prompt of the file and evaluates 8 times on the held-out prompts' file test_path (their
    K responses from the same source, as stage 4 scores them): the curves of the demo's figure."""
    run = align_dir(cfg, method, sft_seed, seed)
    if (run / "final" / "config.json").is_file():
        return run
    loss, pairs = METHODS[method]
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _train(cfg, ["--loss", loss, "--pairs", pairs, "--data", str(data_path), "--eval-data", str(test_path),
            "--init", str(sft), "--out", str(run),
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch), "--lr", str(cfg.lr), "--beta", str(cfg.beta),
            "--alpha", str(cfg.alpha), "--lora-rank", str(cfg.lora_rank), "--seed", str(seed),
            "--max-length", str(MAX_PROMPT + MAX_NEW), "--max-prompt-length", str(MAX_PROMPT),
            "--save-every", str(cfg.steps), "--eval-every", str(max(1, cfg.steps // 8)), *_resume(run)], run / "log.txt")
    print(f"stage 3 {method} (SFT seed {sft_seed}, seed {seed}): {cfg.steps} steps in {time.time() - t0:.0f}s")
    return run


# ----------------------------------------------------------------------------- stage 4: evaluate

@torch.no_grad()
def logps(model, prompts, responses):
    """log pi(y|x) [N] of token-id responses (as sampled, EOS included) after token-id prompts."""
    rows = [p + r for p, r in zip(prompts, responses)]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # [N, T]: padding is never scored, and causal
    mask = torch.zeros_like(tokens, dtype=torch.bool)  # [N, T] True on the response tokens
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = True
    return nca.batch_logps(model, tokens, mask)


@torch.no_grad()
def greedy(model, tok, test):
    """Held-out greedy (argmax) decoding: (accuracy, mean reward)."""
    ids = data.prompt_ids(test, tok, max_length=MAX_PROMPT + MAX_NEW, max_prompt_length=MAX_PROMPT)
    ys = model_lib.generate(model, ids, max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
    r = torch.tensor([arith.reward(p, text(tok, y)) for p, y in zip(test, ys)])
    return (r == 1).float().mean().item(), r.mean().item()


@torch.no_grad()
def evaluate(pi, mu, tok, test, test_data, seed, cfg):
    """Held-out metrics of a policy pi against the reference mu.

    test_data: K responses per held-out prompt (token ids, as the reward data's) with their rewards, so the chosen
    log-ratio log pi(y_best) - log mu(y_best) is measured on responses pi never trained on."""
    acc, reward = greedy(pi, tok, test)
    ids = data.prompt_ids(test, tok, max_length=MAX_PROMPT + MAX_NEW, max_prompt_length=MAX_PROMPT)
    # KL(pi || mu) = E_{y ~ pi} [log pi(y|x) - log mu(y|x)], one sample per prompt
    ys = [y[0] for y in sample(pi, tok, test, 1, temperature=cfg.temperature, seed=10_000 + seed)]
    r_sample = torch.tensor([arith.reward(p, text(tok, y)) for p, y in zip(test, ys)])
    kl = logps(pi, ids, ys) - logps(mu, ids, ys)
    best = [max(zip(rs, yss), key=lambda t: t[0])[1] for yss, rs in test_data]
    chosen = logps(pi, ids, best) - logps(mu, ids, best)
    return {"greedy_acc": acc, "greedy_reward": reward, "sample_acc": (r_sample == 1).float().mean().item(),
            "chosen_logratio": chosen.mean().item(), "kl": kl.mean().item()}


# Student's t 0.975 quantiles by degrees of freedom (any statistics table, e.g. NIST/SEMATECH e-Handbook of
# Statistical Methods, 1.3.6.7.2): a two-sided 95% interval from n - 1 = df estimates
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(a, b, key="greedy_acc"):
    """Mean and 95% half-width of a - b over runs paired by (SFT seed, alignment seed): same SFT model,
    same reward data. The runs of one SFT model share it, so they are not independent draws: the
    differences are averaged per SFT seed and the interval is Student's t over those S means
    (S - 1 degrees of freedom). With the same number of alignment seeds per SFT seed this is the exact
    interval for the grand mean of a two-level normal model (the variance of an SFT seed's mean holds
    both the between-SFT and the within-SFT variance), where a t over all S x A differences would
    count the A runs of one SFT model as independent and come out too narrow."""
    per_sft = {}
    for x, y in zip(a, b, strict=True):
        if (x["sft_seed"], x["seed"]) != (y["sft_seed"], y["seed"]):
            raise ValueError(f"unpaired runs: SFT seed/seed {x['sft_seed']}/{x['seed']} vs {y['sft_seed']}/{y['seed']}")
        per_sft.setdefault(x["sft_seed"], []).append(x[key] - y[key])
    if len({len(d) for d in per_sft.values()}) != 1 or len(per_sft) < 2:
        raise ValueError(f"paired() needs >= 2 SFT seeds with the same number of runs each, got {per_sft}")
    means = torch.tensor([sum(d) / len(d) for d in per_sft.values()], dtype=torch.float64)
    return means.mean().item(), T975[len(means) - 1] * means.std().item() / len(means) ** 0.5


COLUMNS = {"greedy_acc": "greedy accuracy", "greedy_reward": "greedy reward", "sample_acc": "sampled accuracy",
           "chosen_logratio": "chosen log pi/mu", "kl": "KL(pi‖mu)"}  # ‖, not ||: a pipe splits a Markdown cell


def _interval(m, h):
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"


def table(results):
    """Markdown: one row per method, mean ± standard deviation over its runs, and its greedy accuracy's
    change from its own SFT model (paired, 95% interval); then NCA minus DPO the same way."""
    head = ["method", "runs", COLUMNS["greedy_acc"], "change from SFT [95% interval]",
            *[v for k, v in COLUMNS.items() if k != "greedy_acc"]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, runs in results.items():
        cells = []
        for k in COLUMNS:
            v = torch.tensor([r[k] for r in runs], dtype=torch.float64)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        change = "0" if method == "sft" else _interval(*paired(runs, results["sft"]))
        lines.append(f"| {method} | {len(runs)} | {cells[0]} | {change} | " + " | ".join(cells[1:]) + " |")
    if "nca" in results and "dpo" in results:
        lines.append(f"\nNCA minus DPO, greedy accuracy (paired) [95% interval]: {_interval(*paired(results['nca'], results['dpo']))}")
    return "\n".join(lines)


def figure(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["greedy_acc", "sample_acc", "chosen_logratio", "kl"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    names = list(results)
    for ax, k in zip(axes, keys):
        for x, m in enumerate(names):  # mean ± std over runs, and each run as a dot
            v = torch.tensor([r[k] for r in results[m]], dtype=torch.float64)
            color = "gray" if m == "sft" else "tab:red" if m.startswith("nca") else "tab:blue"
            ax.errorbar(x, v.mean(), yerr=v.std() if len(v) > 1 else 0, fmt="s", color=color, capsize=4)
            ax.plot([x] * len(v), v, ".", color=color, alpha=0.4)
        ax.set_xticks(range(len(names)), names, rotation=60)
        ax.set_title(COLUMNS[k])
        ax.grid(axis="y", alpha=0.3)
    for k in ("chosen_logratio", "kl"):
        axes[keys.index(k)].axhline(0, color="black", lw=0.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_figure(curves, path, title):
    """The SFT learning curve: held-out greedy accuracy at the end of each segment, one line per SFT seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for seed, curve in curves.items():
        ax.plot([0] + [c["step"] for c in curve], [0] + [c["greedy_acc"] for c in curve], "o-", label=f"SFT seed {seed}")
    last = curves[next(iter(curves))][-1]["step"]
    ax.axvspan(last * 3 / 4, last, color="gray", alpha=0.15, lw=0, label="last quarter")
    ax.set(xlabel="SFT steps", ylabel="held-out greedy accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the whole pipeline

def run(cfg):
    """Every stage for every SFT seed, seed and method -> (results, curves): results {method: [metrics per
    (SFT seed, seed)]} with "sft" first, curves {SFT seed: SFT learning curve}."""
    if cfg.cpu_capability != (here := torch.backends.cpu.get_cpu_capability().lower()):  # torch reads it at import only
        raise ValueError(f"cpu_capability {cfg.cpu_capability!r}, but this process runs {here!r}: "
                         f"start Python with ATEN_CPU_CAPABILITY={cfg.cpu_capability}")
    if cfg.responses not in ("mu", "others") or cfg.responses == "others" and cfg.K != len(OTHERS):
        raise ValueError(f"responses {cfg.responses!r} with K = {cfg.K}: expected 'mu', or 'others' with K = {len(OTHERS)}")
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tok = data.load_tokenizer("byte")
    test = arith.prompts(cfg.n_test, split="test", seed=0, n_ops=cfg.n_ops, max_operand=cfg.max_operand)
    results, curves = {"sft": [], **{m: [] for m in cfg.methods}}, {}
    with ThreadPoolExecutor(cfg.jobs) as pool:  # each SFT model is train.py processes of its own, as below
        sfts = dict(zip(cfg.sft_seeds, pool.map(lambda s: stage_sft(cfg, s, tok, test), cfg.sft_seeds)))
    for s, (sft, curves[s]) in sfts.items():
        mu = model_lib.load(sft)
        test_y = responses(cfg, mu, tok, test, 20_000 + s)
        test_data = [(ys, [arith.reward(p, text(tok, y)) for y in ys]) for p, ys in zip(test, test_y)]
        test_path = Path(cfg.out) / f"test-{_key(cfg, *SAMPLE)}-s{s}.jsonl"  # the same, for train.py's evaluation
        data.write_jsonl(test_path, reward_rows(tok, test, test_y)[0])
        for seed in cfg.seeds:
            ids = {"sft_seed": s, "seed": seed}
            results["sft"].append({**ids, **evaluate(mu, mu, tok, test, test_data, 100 * s + seed, cfg)})
            data_path = stage_sample(cfg, mu, tok, s, seed)
            with ThreadPoolExecutor(cfg.jobs) as pool:  # each a train.py process of its own on cfg.threads threads
                run_dirs = list(pool.map(lambda m: stage_align(cfg, sft, data_path, test_path, m, s, seed), cfg.methods))
            for method, run_dir in zip(cfg.methods, run_dirs):
                if not (run_dir / "eval.json").is_file():
                    m = evaluate(model_lib.load(run_dir / "final"), mu, tok, test, test_data, 100 * s + seed, cfg)
                    (run_dir / "eval.json").write_text(json.dumps(m))
                results[method].append({**ids, **json.loads((run_dir / "eval.json").read_text())})
                print(f"  {method} SFT seed {s} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                      results[method][-1].items() if k in COLUMNS))
    print(f"pipeline: {time.time() - t0:.0f}s")
    return results, curves


def report(cfg, results, curves, name):
    """Write OUT/<name>.md (the table and the settings), OUT/<name>.json, OUT/<name>.png (the table's
    figure) and OUT/<name>_sft.png (the SFT learning curves)."""
    out = Path(cfg.out)
    md = table(results)
    (out / f"{name}.md").write_text(md + f"\n\nsettings: {json.dumps(dataclasses.asdict(cfg))}\n")
    (out / f"{name}.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "sft_curves": curves,
                                                  "results": results}, indent=1))
    figure(results, out / f"{name}.png", f"{cfg.n_test} held-out prompts, {len(cfg.sft_seeds)} SFT x {len(cfg.seeds)} "
           f"seeds, {cfg.steps} steps x {cfg.batch} prompts, {'LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else 'full FT'}, "
           f"beta {cfg.beta}, alpha {cfg.alpha}, {cfg.threads} thread(s), {cfg.cpu_capability}. Blue: relative (DPO, InfoNCA), red: absolute (NCA)")
    curve_figure(curves, out / f"{name}_sft.png", f"SFT, {cfg.threads} thread(s), {cfg.cpu_capability}")
    print(md)
    print(f"written {out / name}.md, .json, .png, _sft.png")
    return md


# ----------------------------------------------------------------------------- the demo: python train.py

def reading(logs, acc):
    """One line from the measured numbers: where each method's chosen and rejected log pi/mu end (the mean
    over the last tenth of its rows) and the held-out greedy accuracy of SFT and of each method."""
    parts = []
    for method, rows in logs.items():
        tail = rows[-max(1, len(rows) // 10):]
        c, r = (sum(x[k] for x in tail) / len(tail) for k in ("logratio/chosen", "logratio/rejected"))
        parts.append(f"{method.upper()}'s chosen log pi/mu {'falls' if c < 0 else 'rises'} to {c:+.2f} "
                     f"(rejected {r:+.2f})")
    best = max(logs, key=lambda m: acc[m])
    return ("; ".join(parts) + f"; held-out greedy accuracy SFT {acc['sft']:.3f}, "
            + ", ".join(f"{m.upper()} {acc[m]:.3f}" for m in logs) + f": {best.upper()} "
            + ("is highest" if acc[best] > max(acc[m] for m in acc if m != best) else "ties"))


def demo(cfg=Config(sft_seeds=(0,), seeds=(0,), methods=("dpo", "nca"), steps=128, threads=min(2, os.cpu_count() or 1),
                    jobs=1)):
    """`python train.py` with no arguments: one SFT model (cached), one reward file, DPO and NCA on it for 4 epochs
    (128 steps: at the tables' one epoch the held-out likelihoods have not yet parted, README); a figure of their
    chosen and rejected log pi/mu on the held-out prompts over training, beside their greedy accuracy -> OUT/demo.png, and a line that reads it. Both cores go to one process
    at a time (SFT is most of the time, and one process). Returns (results, that line)."""
    results, _ = run(cfg)
    # pi = mu before the first step: every log-ratio is exactly 0 there
    logs = {m: [{"step": 0, "logratio/chosen": 0.0, "logratio/rejected": 0.0}] +
            [r for r in data.read_jsonl(align_dir(cfg, m, 0, 0) / "metrics.jsonl") if r["split"] == "eval"]
            for m in cfg.methods}
    acc = {m: runs[0]["greedy_acc"] for m, runs in results.items()}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    for m, color in zip(logs, ("tab:blue", "tab:red")):
        steps = [r["step"] for r in logs[m]]
        ax.plot(steps, [r["logratio/chosen"] for r in logs[m]], "o-", color=color, label=f"{m.upper()} chosen")
        ax.plot(steps, [r["logratio/rejected"] for r in logs[m]], "o--", color=color, label=f"{m.upper()} rejected")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="alignment step", ylabel="log pi/mu (held-out prompts)", title="likelihood of the chosen and rejected responses")
    ax.legend(fontsize=8)
    bx.bar(list(acc), list(acc.values()), color=["gray", "tab:blue", "tab:red"])
    for x, v in enumerate(acc.values()):
        bx.text(x, v, f"{v:.3f}", ha="center", va="bottom")
    bx.set(ylim=(0, 1), title="held-out greedy accuracy", xlabel=f"{cfg.n_test} prompts")
    fig.tight_layout()
    fig.savefig(Path(cfg.out) / "demo.png", dpi=110)
    plt.close(fig)
    line = reading({m: rows[-1:] for m, rows in logs.items()}, acc)  # where each ends
    print(f"figure: {Path(cfg.out) / 'demo.png'}\n{line}")
    return results, line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--out", default=d.out)
    p.add_argument("--sft-seeds", type=int, default=len(d.sft_seeds), help="SFT seeds 0 .. N-1 (init, batch order)")
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="seeds 0 .. N-1 per SFT model (reward data, alignment)")
    p.add_argument("--methods", default=",".join(d.methods), help="comma list of %s" % ", ".join(METHODS))
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (another count rounds differently)")
    p.add_argument("--jobs", type=int, help="alignment runs at once; default cores // threads")
    p.add_argument("--responses", choices=("mu", "others"), default=d.responses,
                   help="reward data: K samples from the SFT model, or one from each of K other policies (OTHERS)")
    p.add_argument("--steps", type=int, default=d.steps, help="alignment steps, the same for every method")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = full fine-tuning (LoRA wants a larger --lr)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--name", help="file name of the table and figures in --out; default pipeline_t<threads>_<ATen "
                   "CPU capability>, then _others for --responses others")
    p.add_argument("--figures", default="toy/figures", help="also copy the table and figures here ('' = don't)")
    a = p.parse_args(argv)
    if a.sft_seeds < 2:  # table() reports paired intervals over SFT seeds
        p.error(f"--sft-seeds {a.sft_seeds}: the intervals need >= 2 SFT seeds (one SFT model: python train.py, the demo)")
    methods = tuple(a.methods.split(","))
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    cfg = dataclasses.replace(d, out=a.out, sft_seeds=tuple(range(a.sft_seeds)), seeds=tuple(range(a.seeds)),
                              methods=methods, threads=a.threads, responses=a.responses,
                              jobs=a.jobs or max(1, (os.cpu_count() or 1) // a.threads), steps=a.steps, lora_rank=a.lora_rank, lr=a.lr,
                              beta=a.beta, alpha=a.alpha)
    name = a.name or f"pipeline_t{a.threads}_{cfg.cpu_capability}" + ("_others" if a.responses == "others" else "")
    report(cfg, *run(cfg), name)
    if a.figures:  # the small files README shows; the data and checkpoints stay in --out
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".json", ".png", "_sft.png"):
            shutil.copy(Path(cfg.out) / f"{name}{suffix}", Path(a.figures) / f"{name}{suffix}")


if __name__ == "__main__":
    main()
