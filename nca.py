"""Noise Contrastive Alignment: the losses, the reward parameterisation and sequence log-probs.

Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards" (NeurIPS 2024),
with DPO (Rafailov et al., 2023) as a special case. Every formula is in METHOD.md; the section
numbers below are the paper's.

Everything a loss sees is three [B, K] tensors: for each of B prompts x, K responses y_1..y_K with
    policy_logps = log pi_theta(y_i|x)   (sum over response tokens, see sequence_logps below)
    ref_logps    = log mu(y_i|x)         (the frozen reference / SFT policy)
    rewards      = r(x, y_i)             (explicit scalar rewards, e.g. UltraFeedback's 1..10)
so the losses are independent of the model that produced the log-probs.
"""
import math

import torch
import torch.nn.functional as F


def _check(policy_logps, ref_logps, rewards, alpha, beta):
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, K], got shape {tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape or rewards.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and rewards must share one [B, K] shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    if policy_logps.shape[1] < 2:
        raise ValueError(f"need K >= 2 responses per prompt to contrast, got K = {policy_logps.shape[1]}")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha (reward temperature) must be a finite number >= 0, got {alpha}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards[~torch.isfinite(rewards)].tolist()[:4]}")


# ----------------------------------------------------------------------------- reward and labels

def reward_theta(policy_logps, ref_logps, beta):
    """r_theta(x, y) = beta * [log pi_theta(y|x) - log mu(y|x)]  (METHOD.md, shared by every loss)."""
    return beta * (policy_logps - ref_logps)  # [B, K]


def soft_labels(rewards, alpha):
    """w_i = softmax(r / alpha)_i, the weight of y_i under pi* ∝ mu exp(r / alpha) among the K samples.

    alpha = 0 is the limit alpha -> 0: one-hot on the best response, ties sharing the weight equally
    (exactly what the softmax tends to), so preference data is the case K = 2, alpha = 0.
    """
    if alpha == 0:
        best = (rewards == rewards.max(dim=-1, keepdim=True).values).float()
        return best / best.sum(dim=-1, keepdim=True)  # [B, K]
    return torch.softmax(rewards.float() / alpha, dim=-1)  # [B, K]


# ----------------------------------------------------------------------------- the losses

def infonca_loss(policy_logps, ref_logps, rewards, *, alpha, beta):
    """InfoNCA (Sec. 3): L = - sum_i w_i log softmax(r_theta)_i.

    Cross-entropy between the reward labels and the model's softmax over the K responses: a K-way
    classification of which response was drawn from pi*. Optimum r_theta* = r / alpha + C(x): only
    *relative* rewards are learned.
    """
    _check(policy_logps, ref_logps, rewards, alpha, beta)
    r_theta = reward_theta(policy_logps, ref_logps, beta)
    w = soft_labels(rewards, alpha)
    return -(w * F.log_softmax(r_theta, dim=-1)).sum(dim=-1)  # [B]


def nca_loss(policy_logps, ref_logps, rewards, *, alpha, beta):
    """NCA (Sec. 4): L = - sum_i [ w_i log sigmoid(r_theta_i) + (1/K) log sigmoid(-r_theta_i) ].

    K binary classifications, each response "from pi*" (weight w_i) against "from mu" (weight 1/K).
    Optimum r_theta* = r / alpha - log E_mu exp(r / alpha): an *absolute* value, so the best
    response's r_theta ends >= 0 and its likelihood cannot fall below the reference's.
    """
    _check(policy_logps, ref_logps, rewards, alpha, beta)
    K = policy_logps.shape[1]
    r_theta = reward_theta(policy_logps, ref_logps, beta)
    w = soft_labels(rewards, alpha)
    return -(w * F.logsigmoid(r_theta) + F.logsigmoid(-r_theta) / K).sum(dim=-1)  # [B]


def dpo_loss(policy_logps, ref_logps, rewards, *, beta, alpha=0.0):
    """DPO = InfoNCA with K = 2 and alpha -> 0: -log sigmoid(r_theta(y_w) - r_theta(y_l)).

    alpha is ignored: preference data only orders the pair, which is the alpha -> 0 limit.
    """
    if policy_logps.dim() == 2 and policy_logps.shape[1] != 2:
        raise ValueError(f"dpo_loss takes pairs (K = 2), got K = {policy_logps.shape[1]}; use infonca_loss")
    return infonca_loss(policy_logps, ref_logps, rewards, alpha=0.0, beta=beta)


def nca_pair_loss(policy_logps, ref_logps, rewards, *, beta, alpha=0.0):
    """Pairwise NCA = NCA with K = 2 and alpha -> 0:
    -log sigmoid(r_theta(y_w)) - 1/2 sum_{y in {y_w, y_l}} log sigmoid(-r_theta(y)).
    """
    if policy_logps.dim() == 2 and policy_logps.shape[1] != 2:
        raise ValueError(f"nca_pair_loss takes pairs (K = 2), got K = {policy_logps.shape[1]}; use nca_loss")
    return nca_loss(policy_logps, ref_logps, rewards, alpha=0.0, beta=beta)


LOSSES = {"dpo": dpo_loss, "infonca": infonca_loss, "nca": nca_loss, "nca_pair": nca_pair_loss}


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def metrics(policy_logps, ref_logps, rewards, *, beta):
    """TRL-named metrics from the same [B, K] tensors, as 0-dim float tensors (reducible across ranks).

    "Chosen" is each prompt's best-rewarded response, "rejected" the mean of the others. The
    log-ratios log pi - log mu are the likelihood-decrease signal: DPO and InfoNCA tend to push the
    chosen one below zero, NCA keeps it above (METHOD.md, "Why NCA fixes the likelihood decrease").
    """
    B, K = policy_logps.shape
    r_theta = reward_theta(policy_logps, ref_logps, beta).float()
    logratio = (policy_logps - ref_logps).float()
    chosen = F.one_hot(rewards.argmax(dim=-1), K).bool()  # [B, K]

    def split(x):  # -> (chosen mean, rejected mean) over the batch
        return x[chosen].mean(), x[~chosen].view(B, K - 1).mean()

    # accuracy over every pair the data orders strictly: r_i > r_j should give r_theta_i > r_theta_j
    ordered = rewards.unsqueeze(2) > rewards.unsqueeze(1)  # [B, K, K]
    correct = (r_theta.unsqueeze(2) > r_theta.unsqueeze(1)) & ordered
    accuracy = correct.sum() / ordered.sum().clamp(min=1)

    (rc, rr), (lc, lr), (qc, qr) = split(r_theta), split(policy_logps.float()), split(logratio)
    return {
        "rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
        "rewards/accuracies": accuracy.float(),
        "logps/chosen": lc, "logps/rejected": lr,
        "logratio/chosen": qc, "logratio/rejected": qr,
    }


# ----------------------------------------------------------------------------- sequence log-probs

def sequence_logps_reference(h, W, targets, mask):
    """log pi(y|x) = sum over masked positions t of log softmax(h_t W^T)[target_t].

    h [B, T, d] final hidden states, W [V, d] LM head, targets [B, T] (targets[:, t] is the token
    position t predicts), mask [B, T] bool (response tokens only). Builds the full [B, T, V]
    logits: the readable version, and the one the fused kernel below is tested against.
    """
    logits = (h @ W.T).float()  # [B, T, V]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return (logp * mask).sum(dim=-1)  # [B]


def sequence_logps(h, W, targets, mask, impl="reference"):
    """Per-sequence log-probs; impl selects the kernel ("reference" until the fused one lands)."""
    if impl == "reference":
        return sequence_logps_reference(h, W, targets, mask)
    raise ValueError(f"unknown sequence_logps impl {impl!r}")
