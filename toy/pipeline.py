"""The paper's pipeline in miniature, on a CPU: SFT -> sample K and score -> align -> evaluate.

    python toy/pipeline.py            # the full table: every method x 3 seeds (~7 min on 2 cores)
    python train.py                   # demo(): one seed, NCA against the SFT model (~1.5 min)

The task is toy/arith.py: chains of additions with a worked answer ("7+15-3=" -> "7+15=22;22-3=19;#19")
and an exact reward (1 for the right answer, partial credit per correct step). As in the paper
(Sec. 5, UltraInteract / UltraFeedback), the reward data are K responses per prompt sampled from the
SFT policy mu and scored, and every alignment method trains from mu on the same file:
    stage 1  SFT a tiny model on imperfect demonstrations          train.py --loss sft
    stage 2  K samples per train prompt from mu (KV-cache generate), scored -> reward JSON Lines
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
import time
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
    seeds: tuple = (0, 1, 2)
    methods: tuple = tuple(METHODS)
    # the task (toy/arith.py)
    n_ops: int = 2
    max_operand: int = 20
    p_error: float = 0.2  # share of demonstrations with a wrong step: SFT is good, not perfect
    n_demos: int = 8000
    n_prompts: int = 4096  # stage 2: train prompts that get K samples each (few prompts = many epochs = overfitting)
    n_test: int = 256  # held-out prompts for stage 4
    K: int = 4
    temperature: float = 1.0
    # the model: a decoder from model.py, byte tokenizer
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    hidden_dim: int = 192
    # stage 1
    sft_steps: int = 1200
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # stage 3: one budget for every method (steps x prompts per step; a pair counts as a prompt)
    steps: int = 200
    batch: int = 64
    lr: float = 3e-4
    beta: float = 1.0  # tiny models drift far per step: beta 0.1 let every method lose accuracy, see README
    alpha: float = 0.1  # rewards are in [0, 1]: a right answer (1.0) outweighs a near miss (0.5) by e^5
    lora_rank: int = 0  # 0 = full fine-tuning
    # Tiny matrices: a second thread gains little, and on a busy machine threads that spin-wait for each
    # other made a step 10-20x slower (measured 2.3 s vs 0.12 s), so the pipeline computes on one.
    threads: int = 1


def _key(cfg, *fields, extra=()):
    """A short hash of the settings a stage depends on: its folder name, so a change makes a new one."""
    blob = json.dumps([[getattr(cfg, f) for f in fields], list(extra)])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


TASK = ("n_ops", "max_operand")
SFT = TASK + ("p_error", "n_demos", "dim", "n_layers", "n_heads", "hidden_dim", "sft_steps", "sft_batch", "sft_lr")
SAMPLE = SFT + ("n_prompts", "K", "temperature")
ALIGN = SAMPLE + ("steps", "batch", "lr", "beta", "alpha", "lora_rank", "n_test")


def _resume(run):
    """A stage stopped part-way (its checkpoint there, its final/ not yet) continues where it stopped."""
    return ["--resume"] if (run / "ckpt" / "state.pt").is_file() else []


def _train(cfg, argv, log):
    """`python train.py ARGV` with its per-step lines sent to a log file: the pipeline prints one line per
    stage. A process of its own, on cfg.threads threads (OMP_NUM_THREADS sets torch's intra-op threads)."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(cfg.threads)})
    if done.returncode:
        tail = Path(log).read_text().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"train.py {' '.join(argv)} failed (exit {done.returncode}): {tail[0]}; see {log}")


# ----------------------------------------------------------------------------- stage 1: SFT

def stage_sft(cfg):
    """A tiny decoder trained on demonstrations, p_error of which carry a wrong step -> OUT/sft-<key>/final."""
    run = Path(cfg.out) / f"sft-{_key(cfg, *SFT)}"
    if (run / "final" / "config.json").is_file():
        return run / "final"
    run.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    demos = [{"prompt": p, "response": arith.demonstration(p, rng, cfg.p_error)}
             for p in arith.prompts(cfg.n_demos, split="train", seed=0, n_ops=cfg.n_ops, max_operand=cfg.max_operand)]
    data.write_jsonl(run / "demos.jsonl", demos)
    # train.py builds presets only; an explicit small config is a checkpoint directory to --init from
    tok = data.load_tokenizer("byte")
    args = model_lib.ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                               vocab_size=tok.vocab_size, hidden_dim=cfg.hidden_dim, max_seq_len=MAX_PROMPT + MAX_NEW + 1)
    torch.manual_seed(0)
    model_lib.save_hf(model_lib.Transformer(args), run / "init", config={"nca_tokenizer": "byte", "nca_template": "none"})
    t0 = time.time()
    _train(cfg, ["--loss", "sft", "--data", str(run / "demos.jsonl"), "--init", str(run / "init"), "--out", str(run),
            "--steps", str(cfg.sft_steps), "--batch-size", str(cfg.sft_batch), "--lr", str(cfg.sft_lr),
            "--warmup", "50", "--max-length", str(MAX_PROMPT + MAX_NEW), "--max-prompt-length", str(MAX_PROMPT),
            "--save-every", str(cfg.sft_steps), "--eval-every", str(cfg.sft_steps), *_resume(run)], run / "log.txt")
    print(f"stage 1 SFT: {cfg.sft_steps} steps x {cfg.sft_batch} demonstrations in {time.time() - t0:.0f}s -> {run}")
    return run / "final"


# ----------------------------------------------------------------------------- stage 2: sample K, score

def sample(model, tok, prompts, n, *, temperature, seed):
    """n responses per prompt as token ids (EOS included if produced): [len(prompts)][n]."""
    ids = data.prompt_ids(prompts, tok, max_length=MAX_PROMPT + MAX_NEW, max_prompt_length=MAX_PROMPT)
    g = torch.Generator().manual_seed(seed)
    outs = model_lib.generate(model, [p for p in ids for _ in range(n)], max_new_tokens=MAX_NEW,
                              temperature=temperature, eos_id=tok.eos_id, generator=g)
    return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]


def text(tok, ids):
    return tok.decode([i for i in ids if i < 256])  # bytes only: EOS (and any stray special) is not text


def stage_sample(cfg, mu, tok, seed):
    """K samples per train prompt from mu, scored by arith.reward -> reward-format JSON Lines
    {prompt, responses, rewards}: the UltraFeedback-style file train.py reads."""
    path = Path(cfg.out) / f"data-{_key(cfg, *SAMPLE)}-s{seed}.jsonl"
    if path.is_file():
        return path
    t0 = time.time()
    prompts = arith.prompts(cfg.n_prompts, split="train", seed=1000 + seed, n_ops=cfg.n_ops, max_operand=cfg.max_operand)
    rows, dropped = [], 0
    for p, ys in zip(prompts, sample(mu, tok, prompts, cfg.K, temperature=cfg.temperature, seed=seed)):
        ys = [text(tok, y) for y in ys]
        if not all(y.strip() for y in ys):  # data.py rejects empty responses (an immediate EOS): skip the prompt
            dropped += 1
            continue
        rows.append({"prompt": p, "responses": ys, "rewards": [arith.reward(p, y) for y in ys]})
    data.write_jsonl(path, rows)
    r = torch.tensor([row["rewards"] for row in rows])
    print(f"stage 2 data (seed {seed}): {len(rows)} prompts x K = {cfg.K} in {time.time() - t0:.0f}s, mean reward "
          f"{r.mean():.3f}, correct {(r == 1).float().mean():.3f}, prompts with all K tied {(r == r[:, :1]).all(1).float().mean():.2f}"
          f"{f', {dropped} dropped (an empty response)' if dropped else ''} -> {path}")
    return path


# ----------------------------------------------------------------------------- stage 3: align

def stage_align(cfg, sft, data_path, method, seed):
    """train.py from mu on the reward file with one method's loss and pairing -> OUT/<method>-<key>-s<seed>."""
    run = Path(cfg.out) / f"{method}-{_key(cfg, *ALIGN)}-s{seed}"
    if (run / "final" / "config.json").is_file():
        return run
    loss, pairs = METHODS[method]
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _train(cfg, ["--loss", loss, "--pairs", pairs, "--data", str(data_path), "--init", str(sft), "--out", str(run),
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch), "--lr", str(cfg.lr), "--beta", str(cfg.beta),
            "--alpha", str(cfg.alpha), "--lora-rank", str(cfg.lora_rank), "--seed", str(seed),
            "--max-length", str(MAX_PROMPT + MAX_NEW), "--max-prompt-length", str(MAX_PROMPT),
            "--save-every", str(cfg.steps), "--eval-every", str(cfg.steps), *_resume(run)], run / "log.txt")
    print(f"stage 3 {method} (seed {seed}): {cfg.steps} steps in {time.time() - t0:.0f}s")
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
def evaluate(pi, mu, tok, test, test_data, seed, cfg):
    """Held-out metrics of a policy pi against the reference mu.

    test_data: K samples of mu per held-out prompt (token ids) with their rewards, so the chosen
    log-ratio log pi(y_best) - log mu(y_best) is measured on responses pi never trained on."""
    ids = data.prompt_ids(test, tok, max_length=MAX_PROMPT + MAX_NEW, max_prompt_length=MAX_PROMPT)
    greedy = model_lib.generate(pi, ids, max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
    r = torch.tensor([arith.reward(p, text(tok, y)) for p, y in zip(test, greedy)])
    # KL(pi || mu) = E_{y ~ pi} [log pi(y|x) - log mu(y|x)], one sample per prompt
    ys = [y[0] for y in sample(pi, tok, test, 1, temperature=cfg.temperature, seed=10_000 + seed)]
    r_sample = torch.tensor([arith.reward(p, text(tok, y)) for p, y in zip(test, ys)])
    kl = logps(pi, ids, ys) - logps(mu, ids, ys)
    best = [max(zip(rs, yss), key=lambda t: t[0])[1] for yss, rs in test_data]
    chosen = logps(pi, ids, best) - logps(mu, ids, best)
    return {"greedy_acc": (r == 1).float().mean().item(), "greedy_reward": r.mean().item(),
            "sample_acc": (r_sample == 1).float().mean().item(), "chosen_logratio": chosen.mean().item(),
            "kl": kl.mean().item()}


COLUMNS = {"greedy_acc": "greedy accuracy", "greedy_reward": "greedy reward", "sample_acc": "sampled accuracy",
           "chosen_logratio": "chosen log pi/mu", "kl": "KL(pi||mu)"}


def table(results):
    """Markdown: one row per method, mean ± standard deviation over seeds."""
    lines = ["| method | seeds | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for method, runs in results.items():
        cells = []
        for k in COLUMNS:
            v = torch.tensor([r[k] for r in runs], dtype=torch.float64)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["greedy_acc", "sample_acc", "chosen_logratio", "kl"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    names = list(results)
    for ax, k in zip(axes, keys):
        for x, m in enumerate(names):  # mean ± std over seeds, and each seed as a dot
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


# ----------------------------------------------------------------------------- the whole pipeline

def run(cfg):
    """Every stage for every seed and method; returns {method: [metrics per seed]} with "sft" first."""
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    tok = data.load_tokenizer("byte")
    sft = stage_sft(cfg)
    mu = model_lib.load(sft)
    test = arith.prompts(cfg.n_test, split="test", seed=0, n_ops=cfg.n_ops, max_operand=cfg.max_operand)
    test_y = sample(mu, tok, test, cfg.K, temperature=cfg.temperature, seed=20_000)
    test_data = [(ys, [arith.reward(p, text(tok, y)) for y in ys]) for p, ys in zip(test, test_y)]
    results = {"sft": [], **{m: [] for m in cfg.methods}}
    for seed in cfg.seeds:
        results["sft"].append(evaluate(mu, mu, tok, test, test_data, seed, cfg))
        data_path = stage_sample(cfg, mu, tok, seed)
        for method in cfg.methods:
            run_dir = stage_align(cfg, sft, data_path, method, seed)
            if not (run_dir / "eval.json").is_file():
                m = evaluate(model_lib.load(run_dir / "final"), mu, tok, test, test_data, seed, cfg)
                (run_dir / "eval.json").write_text(json.dumps(m))
            results[method].append(json.loads((run_dir / "eval.json").read_text()))
            print(f"  {method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[method][-1].items()))
    print(f"pipeline: {time.time() - t0:.0f}s")
    return results


def report(cfg, results, name):
    """Write OUT/<name>.md (the table and the settings), OUT/<name>.json and OUT/<name>.png."""
    out = Path(cfg.out)
    md = table(results)
    (out / f"{name}.md").write_text(md + f"\n\nsettings: {json.dumps(dataclasses.asdict(cfg))}\n")
    (out / f"{name}.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=1))
    figure(results, out / f"{name}.png", f"{cfg.n_test} held-out prompts, {len(cfg.seeds)} seed(s), {cfg.steps} steps x "
           f"{cfg.batch} prompts, {'LoRA r=%d' % cfg.lora_rank if cfg.lora_rank else 'full FT'}, beta {cfg.beta}, alpha "
           f"{cfg.alpha}. Blue: relative (DPO, InfoNCA), red: absolute (NCA)")
    print(md)
    print(f"written {out / name}.md, .json, .png")
    return md


def demo(out=Config.out):
    """`python train.py` with no arguments: SFT (cached), one seed of reward data, NCA; before/after table."""
    cfg = Config(out=out, seeds=(0,), methods=("nca",))
    results = run(cfg)
    report(cfg, results, "demo")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--out", default=d.out)
    p.add_argument("--seeds", type=int, default=len(d.seeds), help="seeds 0 .. N-1 (reward data and alignment)")
    p.add_argument("--methods", default=",".join(d.methods), help="comma list of %s" % ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=d.steps, help="alignment steps, the same for every method")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = full fine-tuning (LoRA wants a larger --lr)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--name", default="pipeline", help="file name of the table and figure in --out")
    p.add_argument("--figures", default="toy/figures", help="also copy the table and figure here ('' = don't)")
    a = p.parse_args(argv)
    methods = tuple(a.methods.split(","))
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    cfg = dataclasses.replace(d, out=a.out, seeds=tuple(range(a.seeds)), methods=methods, steps=a.steps,
                              lora_rank=a.lora_rank, lr=a.lr, beta=a.beta, alpha=a.alpha)
    report(cfg, run(cfg), a.name)
    if a.figures:  # the small files README shows; the data and checkpoints stay in --out
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        for ext in (".md", ".json", ".png"):
            shutil.copy(Path(cfg.out) / f"{a.name}{ext}", Path(a.figures) / f"{a.name}{ext}")


if __name__ == "__main__":
    main()
