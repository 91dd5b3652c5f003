"""Synthetic contextual bandits where the likelihood-decrease picture can be checked exactly.

    python toy/bandit.py            # = curves: chosen / rejected log-ratio per step, ~15 s on 2 CPU cores
    python toy/bandit.py optimum    # tabular policy, many samples: r_theta against the paper's optima
    python toy/bandit.py tradeoff   # effect of K and alpha on expected reward and KL(pi || mu)

A context x is a prompt, an action a is a "response": a sequence of L tokens from a vocabulary of
V (V**L actions, so responses share tokens). Everything is known in closed form:
    mu(a|x)      factorised over positions, like an LM whose tokens ignore each other
    r(x, a)      = psi(x)^T M phi(a), smooth (bilinear) in the action's one-hot token features phi(a)
    pi*(a|x)     ∝ mu(a|x) exp(r(x, a) / alpha)               (Chen et al. 2024, Sec. 2-3; nca.py)
The dataset draws K actions per context from mu with their rewards (plus optional noise), and the
pairs the paper's baselines use. Every loss is the one in nca.py, fed [B, K] log-prob tensors.

Policies all read log pi(a|x) = log_softmax_a( log mu(a|x) + psi(x)^T W phi(a) ), W = 0 at the start,
so pi = mu and r_theta = beta * log(pi / mu) = 0 exactly; they differ only in the fixed features:
    tabular  psi = one-hot context, phi = one-hot action: nothing shared
    tokens   psi = one-hot context, phi = one-hot tokens: responses of one prompt share tokens
    shared   psi = rank-m context features, phi = tokens: prompts share parameters, as in an LM
"""
import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: import nca, data
import numpy as np
import torch
import torch.nn.functional as F

import data
import nca


@dataclass
class Config:
    contexts: int = 32      # X prompts
    vocab: int = 6          # V tokens per position
    length: int = 3         # L tokens per response: V**L actions
    rank: int = 4           # m, context features of the reward and of the "shared" policy
    mu_peak: float = 1.0    # scale of mu's token logits: larger = more peaked reference
    noise: float = 0.0      # std of the noise added to the observed rewards
    K: int = 4              # responses sampled from mu per prompt
    n: int = 1              # K-tuples per prompt (the optimum experiment needs many)
    alpha: float = 1.0      # reward temperature
    beta: float = 0.1       # r_theta = beta * log(pi / mu)
    pairs: str = "dpo"      # how DPO / NCA-pair see the K responses: dpo | dpo_x3 | dpo_all
    lr: float = 0.05
    steps: int = 300
    seeds: int = 5
    dtype: torch.dtype = torch.float32


PRESETS = {
    "curves": Config(),
    # tabular, 16 actions, 4096 samples per prompt: close to the population optimum; beta = 1 and the
    # K sweep are explained in optimum() below
    "optimum": Config(contexts=4, vocab=4, length=2, alpha=1.0, beta=1.0, lr=0.1, steps=300, seeds=1,
                      dtype=torch.float64),
    "tradeoff": Config(seeds=3),
}
POLICIES = ("tabular", "tokens", "shared")


# ----------------------------------------------------------------------------- the bandit and its data

def make_bandit(cfg, seed):
    """Reference mu, reward r and features, all drawn from `seed`. Returns a dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    X, V, L, m = cfg.contexts, cfg.vocab, cfg.length, cfg.rank
    actions = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [A, L]
    A = len(actions)
    tokens = F.one_hot(actions, V).view(A, L * V).to(cfg.dtype)  # [A, L*V] phi(a)
    psi = torch.randn(X, m, generator=g, dtype=cfg.dtype)  # [X, m]
    M = torch.randn(m, L * V, generator=g, dtype=cfg.dtype) / math.sqrt(m * L)
    r = psi @ M @ tokens.T  # [X, A], std ~0.7 under mu
    mu_tok = torch.log_softmax(cfg.mu_peak * torch.randn(X, L, V, generator=g, dtype=cfg.dtype), -1)
    log_mu = mu_tok[:, torch.arange(L), actions].sum(-1)  # [X, A] log mu(a|x) = sum_l log mu(a_l|x)
    return {"r": r, "log_mu": log_mu, "psi": psi, "tokens": tokens, "seed": seed}


def sample_data(bandit, cfg, g):
    """n K-tuples per prompt drawn from mu (with replacement, as sampling an LM would) and their rewards."""
    X = bandit["r"].shape[0]
    ctx = torch.arange(X).repeat_interleave(cfg.n)  # [B]
    idx = torch.multinomial(bandit["log_mu"].exp()[ctx], cfg.K, replacement=True, generator=g)  # [B, K]
    rewards = bandit["r"][ctx.unsqueeze(1), idx]
    rewards = rewards + cfg.noise * torch.randn(rewards.shape, generator=g, dtype=rewards.dtype)
    return ctx, idx, rewards


def make_pairs(rewards, mode, rng):
    """[P] row and [P, 2] (chosen, rejected) columns into the K responses: data.pair_indices (the
    paper's baselines, ties dropped) on each row of rewards [B, K], drawing with the numpy Generator rng."""
    rows, cols = [], []
    for b, r in enumerate(rewards.tolist()):
        pairs, _ = data.pair_indices(r, mode, rng)
        rows += [b] * len(pairs)
        cols += pairs
    # dtype: with every pair tied the lists are empty, and torch.tensor([]) would be float (no index)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long).view(-1, 2)


# ----------------------------------------------------------------------------- policies and training

def features(bandit, policy):
    """(psi [X, m], phi [A, d]) of log pi = log_softmax(log mu + psi W phi^T)."""
    X, A = bandit["r"].shape
    eye = lambda n: torch.eye(n, dtype=bandit["r"].dtype)
    if policy == "tabular":
        return eye(X), eye(A)
    if policy == "tokens":
        return eye(X), bandit["tokens"]
    if policy == "shared":
        return bandit["psi"], bandit["tokens"]
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def train(bandit, loss, policy, cfg, seed):
    """Adam on the full dataset (every step sees every prompt, like several epochs of fine-tuning).
    Returns the [steps + 1, 3] history of (chosen, rejected) mean log pi - log mu and
    KL(pi* || pi_theta), and the final log pi table [X, A]."""
    g = torch.Generator().manual_seed(seed + 1000)  # data drawn apart from the bandit itself
    ctx, idx, rewards = sample_data(bandit, cfg, g)
    psi, phi = features(bandit, policy)
    W = torch.zeros(psi.shape[1], phi.shape[1], dtype=psi.dtype, requires_grad=True)
    opt = torch.optim.Adam([W], lr=cfg.lr)
    log_mu = bandit["log_mu"]
    ref_logps = log_mu[ctx.unsqueeze(1), idx]  # [B, K]
    if loss in nca.PAIR_LOSSES:
        rows, cols = make_pairs(rewards, cfg.pairs, np.random.default_rng(seed))
        prow, pidx, prew = ctx[rows].unsqueeze(1), idx[rows.unsqueeze(1), cols], rewards[rows.unsqueeze(1), cols]
    log_target = target(bandit, cfg.alpha)
    history = []
    for step in range(cfg.steps + 1):
        log_pi = torch.log_softmax(log_mu + psi @ W @ phi.T, dim=-1)  # [X, A]
        policy_logps = log_pi[ctx.unsqueeze(1), idx]  # [B, K]
        # chosen = best of the K, as metrics() defines it, whichever responses the loss sees
        m = nca.metrics(policy_logps, ref_logps, rewards, beta=cfg.beta)
        kl = (log_target.exp() * (log_target - log_pi)).sum(-1).mean()
        history.append((m["logratio/chosen"].item(), m["logratio/rejected"].item(), kl.item()))
        if step == cfg.steps:
            break
        if loss in nca.PAIR_LOSSES:  # [P, 2] pairs (chosen, rejected)
            L = nca.LOSSES[loss](log_pi[prow, pidx], log_mu[prow, pidx], prew, beta=cfg.beta)
        else:
            L = nca.LOSSES[loss](policy_logps, ref_logps, rewards, alpha=cfg.alpha, beta=cfg.beta)
        opt.zero_grad()
        L.mean().backward()
        opt.step()
    return torch.tensor(history), log_pi.detach()


def evaluate(bandit, log_pi):
    """Exact expected reward E_pi[r] and KL(pi || mu), averaged over prompts."""
    pi = log_pi.exp()
    return (pi * bandit["r"]).sum(-1).mean().item(), (pi * (log_pi - bandit["log_mu"])).sum(-1).mean().item()


def target(bandit, alpha):
    """log pi*(a|x) = log mu + r / alpha - log E_mu exp(r / alpha)   [X, A]."""
    return torch.log_softmax(bandit["log_mu"] + bandit["r"] / alpha, dim=-1)


# ----------------------------------------------------------------------------- experiments

def curves(cfg, out):
    """Chosen / rejected log-ratio per step, every loss, each policy; mean ± std over seeds."""
    import matplotlib.pyplot as plt
    losses = list(nca.LOSSES)
    fig, axes = plt.subplots(len(POLICIES), 2, figsize=(10, 3.2 * len(POLICIES)), sharex=True)
    print(f"{'policy':8} {'loss':9} {'chosen':>14} {'rejected':>15} {'E_pi[r]':>8} {'KL(pi||mu)':>10}")
    bandits = [make_bandit(cfg, s) for s in range(cfg.seeds)]  # train() only reads them: one per seed serves all
    for i, policy in enumerate(POLICIES):
        for loss in losses:
            runs = [train(b, loss, policy, cfg, s) for s, b in enumerate(bandits)]
            h = torch.stack([hist for hist, _ in runs])  # [seeds, steps + 1, 3]: chosen, rejected, KL
            ev = torch.tensor([evaluate(b, lp) for b, (_, lp) in zip(bandits, runs)])  # [seeds, 2]
            mean, std = h.mean(0), h.std(0)
            for j in range(2):
                line, = axes[i, j].plot(mean[:, j], label=loss)
                axes[i, j].fill_between(range(len(mean)), mean[:, j] - std[:, j], mean[:, j] + std[:, j],
                                        color=line.get_color(), alpha=0.2)
            print(f"{policy:8} {loss:9} {mean[-1, 0]:7.2f} ± {std[-1, 0]:4.2f} {mean[-1, 1]:8.2f} ± {std[-1, 1]:4.2f}"
                  f" {ev[:, 0].mean():8.3f} {ev[:, 1].mean():10.2f}")
        for j, name in enumerate(("chosen", "rejected")):
            axes[i, j].axhline(0, color="k", lw=0.5)
            axes[i, j].set_title(f"{policy} policy: {name} log pi - log mu")
    axes[0, 0].legend()
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{cfg.seeds} seeds, K={cfg.K}, alpha={cfg.alpha}, beta={cfg.beta}, pairs={cfg.pairs}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)


def optimum(cfg, out):
    """Tabular softmax policy on many samples against the paper's optima (Chen et al. 2024, Sec. 3-4; nca.py):
        InfoNCA  r_theta* = r / alpha + C(x)          NCA  r_theta* = r / alpha - log E_mu exp(r / alpha)
    A normalised policy has sum_a mu exp(r_theta / beta) = 1, which fixes InfoNCA's C(x); at beta = 1
    it is -log E_mu exp(r / alpha), so both land on pi*. At other beta the NCA optimum is no policy at
    all (pi = mu (pi*/mu)^(1/beta) does not sum to 1), hence beta = 1 here.
    NCA's labels w = softmax(r / alpha) over the K samples estimate E_mu exp(r / alpha) from K draws,
    so its optimum is exact only as K -> inf; InfoNCA's is exact for every K. Hence the sweep over K
    at a fixed number n * K = 4096 of samples per context."""
    import matplotlib.pyplot as plt
    bandit = make_bandit(cfg, 0)
    r_alpha = bandit["r"] / cfg.alpha  # [X, A]
    opt_nca = r_alpha - torch.logsumexp(bandit["log_mu"] + r_alpha, -1, keepdim=True)
    common = bandit["log_mu"].exp() >= 0.02  # rarer actions are seen too seldom to be estimated
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    print(f"{'loss':8} {'K':>3} {'KL(pi*||pi)':>11} {'spread of r_theta - r/alpha':>27} {'max|r_theta - NCA opt|':>23}")
    for loss in ("infonca", "nca"):
        for K in (4, 16, 64):
            hist, log_pi = train(bandit, loss, "tabular", replace(cfg, K=K, n=4096 // K), 0)
            r_theta = nca.reward_theta(log_pi, bandit["log_mu"], cfg.beta)  # [X, A]
            offset = r_theta - r_alpha  # InfoNCA: C(x) for every a
            # max - min over the common actions of each context: -inf / +inf take the rare ones out
            hi, lo = offset.masked_fill(~common, -math.inf).amax(-1), offset.masked_fill(~common, math.inf).amin(-1)
            spread = (hi - lo).max()
            absolute = (r_theta - opt_nca)[common].abs().max()
            print(f"{loss:8} {K:3} {hist[-1, 2]:11.2e} {spread:27.3f} {absolute:23.3f}")
            axes[0].semilogy(hist[:, 2], label=f"{loss} K={K}", ls="-" if loss == "nca" else ":")
            if loss == "nca" and K in (4, 64):
                axes[1].scatter(opt_nca[common], r_theta[common], s=12, label=f"K={K}")
            if loss == "infonca" and K == 4:
                for x in range(len(r_theta)):
                    axes[2].scatter(r_alpha[x][common[x]], r_theta[x][common[x]], s=12, label=f"context {x}")
    lim = [opt_nca[common].min().item(), opt_nca[common].max().item()]
    axes[1].plot(lim, lim, "k", lw=0.5)
    axes[0].set(title="KL(pi* || pi_theta)", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].set(title="NCA: learned vs optimum (bias ~1/K)", xlabel="r/alpha - log E_mu exp(r/alpha)", ylabel="r_theta")
    axes[1].legend()
    axes[2].set(title="InfoNCA K=4: r/alpha + C(x), one line per context", xlabel="r/alpha", ylabel="r_theta")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"tabular softmax, {cfg.contexts} contexts x {cfg.vocab ** cfg.length} actions, "
                 f"4096 samples per context, alpha={cfg.alpha}, beta={cfg.beta}; actions with mu >= 0.02")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "optimum.png"), dpi=80)


def tradeoff(cfg, out):
    """Expected reward against KL(pi || mu) for InfoNCA and NCA over K and alpha, the pair baselines
    at K = 4, and the frontier the targets pi_T ∝ mu exp(r / T) trace as T varies."""
    import matplotlib.pyplot as plt
    alphas, Ks = (0.25, 0.5, 1.0, 2.0, 4.0), (2, 3, 4, 8)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    bandits = [make_bandit(cfg, s) for s in range(cfg.seeds)]
    frontier = []
    for T in torch.logspace(-2, 1, 30).tolist():
        frontier.append(torch.tensor([evaluate(b, target(b, T)) for b in bandits]).mean(0))
    frontier = torch.stack(frontier)  # [30, (E r, KL)]

    def run(loss, c):  # mean over seeds of (E_pi[r], KL(pi || mu), final chosen log-ratio)
        runs = [train(b, loss, "shared", c, s) for s, b in enumerate(bandits)]
        return torch.tensor([(*evaluate(b, lp), h[-1, 0]) for b, (h, lp) in zip(bandits, runs)]).mean(0)

    print(f"{'loss':9} {'K':>2} {'alpha':>5} {'E_pi[r]':>8} {'KL(pi||mu)':>10} {'chosen':>7}")
    for ax, loss in zip(axes, ("infonca", "nca")):
        for K in Ks:
            res = torch.stack([run(loss, replace(cfg, K=K, alpha=a)) for a in alphas])  # [alphas, 3]
            ax.plot(res[:, 1], res[:, 0], "o-", label=f"K={K}")
            for a, (er, kl, ch) in zip(alphas, res.tolist()):
                print(f"{loss:9} {K:2} {a:5} {er:8.3f} {kl:10.2f} {ch:7.2f}")
        ax.annotate(f"alpha={alphas[0]}", (res[0, 1], res[0, 0]), fontsize=7)
        ax.annotate(f"alpha={alphas[-1]}", (res[-1, 1], res[-1, 0]), fontsize=7)
    for mode, marker in (("dpo", "s"), ("dpo_x3", "^"), ("dpo_all", "v")):
        for loss in nca.PAIR_LOSSES:
            er, kl, ch = run(loss, replace(cfg, K=4, pairs=mode)).tolist()
            print(f"{loss + ' ' + mode:17} {er:8.3f} {kl:10.2f} {ch:7.2f}")
            axes[0 if loss == "dpo" else 1].plot(kl, er, marker, color="k", mfc="none", label=f"{loss} {mode} K=4")
    for ax, loss in zip(axes, ("InfoNCA (+ DPO pairs)", "NCA (+ NCA-pair)")):
        ax.plot(frontier[:, 1], frontier[:, 0], "k--", lw=0.8, label="pi_T ∝ mu exp(r/T)")
        ax.set(title=f"{loss}, shared policy, {cfg.steps} steps", xlabel="KL(pi || mu)", ylabel="E_pi[r]",
               xlim=(0, frontier[:, 1].max().item()))
        ax.legend(fontsize=7)
    fig.suptitle(f"reward vs KL over K and alpha ({alphas}), beta={cfg.beta}, {cfg.seeds} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=80)


EXPERIMENTS = {"curves": curves, "optimum": optimum, "tradeoff": tradeoff}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", default="curves", choices=list(EXPERIMENTS))
    p.add_argument("--seeds", type=int, help="override the preset's number of seeds")
    p.add_argument("--steps", type=int, help="override the preset's number of steps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures"))
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    cfg = PRESETS[args.experiment]
    cfg = replace(cfg, **{k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v is not None})
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    EXPERIMENTS[args.experiment](cfg, args.out)
    print(f"wrote {os.path.join(args.out, args.experiment + '.png')} in {time.time() - t0:.1f} s")
