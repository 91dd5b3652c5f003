"""Noise Contrastive Alignment: the losses, the reward parameterisation and sequence log-probs.

Chen, He, Yuan, Cui, Su, Zhu, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
(NeurIPS 2024, arXiv:2402.05369; "Sec." below is this paper's), with DPO (Rafailov et al., "Direct
Preference Optimization", NeurIPS 2023, arXiv:2305.18290) as a special case.

Setting. A prompt x, a frozen reference policy mu(y|x) (the SFT model) and K >= 2 responses y_1..y_K
drawn from it, each with an explicit scalar reward r_i = r(x, y_i). The target is the policy that
maximises E[r] - alpha KL(pi || mu) (Rafailov et al. Eq. 4, their beta being alpha here; Sec. 2):
    pi*(y|x) = mu(y|x) exp(r(x, y) / alpha) / Z(x),    Z(x) = E_mu exp(r / alpha),
alpha > 0 the reward temperature. Preference data y_w > y_l is the case K = 2 with alpha -> 0: only the
order of the two rewards matters (Sec. 3).

Reward parameterisation, shared by every loss (Rafailov et al. Eq. 5; Sec. 3):
    r_theta(x, y) = beta * [log pi_theta(y|x) - log mu(y|x)]
so a loss sees only K numbers r_theta(x, y_i) and K rewards per prompt, three [B, K] tensors:
    policy_logps = log pi_theta(y_i|x)   (sum over response tokens, see sequence_logps below)
    ref_logps    = log mu(y_i|x)
    rewards      = r(x, y_i)             (e.g. UltraFeedback's 1..10)
and is independent of the model that produced them.

Both losses learn to tell which samples come from pi* rather than mu. As the y_i came from mu and
pi*/mu ∝ exp(r / alpha), pi*'s share of sample i is the soft label w_i = softmax(r / alpha)_i (Sec. 3).
  - InfoNCA (Sec. 3) asks one K-way question, "which of the K is pi*'s?": a cross-entropy, fixed only
    up to a constant per prompt, so it learns *relative* rewards, r_theta* = r / alpha + C(x). DPO is
    its K = 2, alpha -> 0 case (dpo_loss).
  - NCA (Sec. 4) asks K yes/no questions, "is y_i pi*'s or mu's?": it learns *absolute* rewards,
    r_theta* = r / alpha - log Z(x), which fixes C(x) and with it the likelihood of each response.
Why that matters (Sec. 4): DPO and InfoNCA only push margins r_theta(y_w) - r_theta(y_l). A model
whose parameters are shared across responses and prompts can widen a margin by lowering both, moving
the mass to responses never sampled, so the chosen response's likelihood falls below mu's. NCA's
optimum keeps the best sample at r_theta >= 0 (nca_loss), i.e. log pi_theta(y_best) >= log mu(y_best).
"""
import math

import torch
import torch.nn.functional as F


def check_alpha_beta(alpha, beta):
    """Raise ValueError unless alpha (reward temperature) is finite and >= 0 and beta is finite and > 0."""
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha (reward temperature) must be a finite number >= 0, got {alpha}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta (r_theta = beta * log pi / mu) must be a finite number > 0, got {beta}")


def require(cond, message):
    """Raise ValueError(message) unless the one-element tensor `cond` is true, without making the host wait.

    The rule for checks on tensor values: `if not cond` reads the value, and on a GPU reading waits for all
    queued work (a host sync), every micro-batch. torch._assert_async checks on the tensor's own device: on
    the CPU it raises at once (turned into ValueError here), on a GPU the check is queued like any kernel and
    a failure surfaces as a device-side assert (which ends the process). train.py's data never fails it:
    data.py validates rewards and token ids when it loads and collates them."""
    try:
        torch._assert_async(cond, message)
    except RuntimeError:
        raise ValueError(message) from None


def _check(policy_logps, ref_logps, rewards, alpha, beta):
    check_alpha_beta(alpha, beta)
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, K], got shape {tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape or rewards.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and rewards must share one [B, K] shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    if policy_logps.shape[1] < 2:
        raise ValueError(f"need K >= 2 responses per prompt to contrast, got K = {policy_logps.shape[1]}")
    require(torch.isfinite(rewards).all(), "rewards must be finite")


# ----------------------------------------------------------------------------- reward and labels

def reward_theta(policy_logps, ref_logps, beta):
    """r_theta(x, y) = beta * [log pi_theta(y|x) - log mu(y|x)], the reward every loss learns (Sec. 3)."""
    return beta * (policy_logps - ref_logps)  # [B, K]


def soft_labels(rewards, alpha):
    """w_i = softmax(r / alpha)_i, the weight of y_i under pi* ∝ mu exp(r / alpha) among the K samples.

    alpha = 0 is the limit alpha -> 0: one-hot on the best response, ties sharing the weight equally
    (exactly what the softmax tends to), so preference data is the case K = 2, alpha = 0. The labels
    keep a floating rewards' dtype (float64 in, float64 out); integer rewards give float32.
    """
    if alpha == 0:
        best = rewards == rewards.max(dim=-1, keepdim=True).values
        best = best.to(torch.promote_types(rewards.dtype, torch.float32))
        return best / best.sum(dim=-1, keepdim=True)  # [B, K]
    # shift by the max first: for tiny alpha, r / alpha alone overflows to inf and the softmax to NaN
    return torch.softmax((rewards - rewards.max(dim=-1, keepdim=True).values) / alpha, dim=-1)  # [B, K]


# ----------------------------------------------------------------------------- the losses

def infonca_loss(policy_logps, ref_logps, rewards, *, alpha, beta):
    """InfoNCA (Sec. 3): L = - sum_i w_i log softmax(r_theta)_i,  w = softmax(r / alpha).  [B]

    The cross-entropy between the soft labels and the model's softmax over the K responses (InfoNCE
    with soft labels). It is smallest where softmax(r_theta) = w, i.e. r_theta_i = log w_i + C =
    r_i / alpha + C(x) for any C(x): softmax ignores a shift, so only *relative* rewards are learned.
    """
    _check(policy_logps, ref_logps, rewards, alpha, beta)
    r_theta = reward_theta(policy_logps, ref_logps, beta)
    w = soft_labels(rewards, alpha)
    return -(w * F.log_softmax(r_theta, dim=-1)).sum(dim=-1)  # [B]


def nca_loss(policy_logps, ref_logps, rewards, *, alpha, beta):
    """NCA (Sec. 4): L = - sum_i [ w_i log sigmoid(r_theta_i) + (1/K) log sigmoid(-r_theta_i) ].  [B]

    K binary classifications (NCE): y_i "from pi*" with weight w_i against "from mu" with weight 1/K.
    Each term is smallest where its derivative in r is 0, w_i sigmoid(-r) = sigmoid(r) / K, i.e. e^r = K w_i:
        r_theta_i = log(K w_i) = r_i / alpha - log( (1/K) sum_j exp(r_j / alpha) ),
    the K-sample estimate of r / alpha - log E_mu exp(r / alpha) = r / alpha - log Z(x): an *absolute*
    value. The best sample has w_best >= 1/K (the largest of K weights summing to 1), so its r_theta* =
    log(K w_best) >= 0: its likelihood ends at or above the reference's.
    """
    _check(policy_logps, ref_logps, rewards, alpha, beta)
    K = policy_logps.shape[1]
    r_theta = reward_theta(policy_logps, ref_logps, beta)
    w = soft_labels(rewards, alpha)
    return -(w * F.logsigmoid(r_theta) + F.logsigmoid(-r_theta) / K).sum(dim=-1)  # [B]


def dpo_loss(policy_logps, ref_logps, rewards, *, beta):
    """DPO (Rafailov et al. Eq. 7): L = -log sigmoid(r_theta(y_w) - r_theta(y_l)).  [B]

    It is InfoNCA with K = 2 and alpha -> 0 (Sec. 3): the labels become one-hot on the winner y_w, and
    -log softmax(r_theta)_w = -log e^{r_w} / (e^{r_w} + e^{r_l}) = -log sigmoid(r_w - r_l).
    """
    if policy_logps.dim() == 2 and policy_logps.shape[1] != 2:
        raise ValueError(f"dpo_loss takes pairs (K = 2), got K = {policy_logps.shape[1]}; use infonca_loss")
    return infonca_loss(policy_logps, ref_logps, rewards, alpha=0.0, beta=beta)


def nca_pair_loss(policy_logps, ref_logps, rewards, *, beta):
    """Pairwise NCA (Sec. 4), NCA with K = 2 and alpha -> 0 (labels one-hot on y_w):  [B]
        L = -log sigmoid(r_theta(y_w)) - 1/2 sum_{y in {y_w, y_l}} log sigmoid(-r_theta(y)).
    """
    if policy_logps.dim() == 2 and policy_logps.shape[1] != 2:
        raise ValueError(f"nca_pair_loss takes pairs (K = 2), got K = {policy_logps.shape[1]}; use nca_loss")
    return nca_loss(policy_logps, ref_logps, rewards, alpha=0.0, beta=beta)


# name -> loss. The pair losses take preference data (K = 2) and no alpha, being its alpha -> 0 limit:
# call them with beta only, the others with alpha and beta.
LOSSES = {"dpo": dpo_loss, "infonca": infonca_loss, "nca": nca_loss, "nca_pair": nca_pair_loss}
PAIR_LOSSES = ("dpo", "nca_pair")


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def metrics(policy_logps, ref_logps, rewards, *, beta):
    """TRL-named metrics from the same [B, K] tensors, as 0-dim float32 tensors (reducible across ranks).

    "Chosen" is each prompt's best-rewarded response and "rejected" the mean of its others; each is
    averaged over the B prompts. Ties follow the labels at alpha -> 0 (soft_labels): every response
    sharing the top reward is chosen, with equal weight, so the metrics do not depend on the order of
    the K responses. A prompt whose K rewards all tie has nothing rejected: its rejected value is its
    chosen one (margin 0), so a batch of ties logs no NaN. The log-ratios log pi - log mu are the
    likelihood-decrease signal: DPO and InfoNCA tend to push the chosen one below zero, NCA keeps it
    above (Sec. 4; this module's docstring).
    """
    _check(policy_logps, ref_logps, rewards, 0.0, beta)
    r_theta = reward_theta(policy_logps, ref_logps, beta).float()
    logratio = (policy_logps - ref_logps).float()
    best = rewards == rewards.max(dim=-1, keepdim=True).values  # [B, K]
    rest = torch.where(best.all(dim=-1, keepdim=True), best, ~best)  # all tied: rejected = chosen
    w_chosen, w_rejected = (m.float() / m.sum(dim=-1, keepdim=True) for m in (best, rest))  # [B, K], rows sum to 1

    def split(x):  # -> (chosen mean, rejected mean) over the batch
        return (w_chosen * x).sum(dim=-1).mean(), (w_rejected * x).sum(dim=-1).mean()

    # accuracy over every pair the data orders strictly: r_i > r_j should give r_theta_i > r_theta_j
    ordered = rewards.unsqueeze(2) > rewards.unsqueeze(1)  # [B, K, K]
    correct = (r_theta.unsqueeze(2) > r_theta.unsqueeze(1)) & ordered
    accuracy = correct.sum() / ordered.sum().clamp(min=1)

    reward_chosen, reward_rejected = split(r_theta)
    logp_chosen, logp_rejected = split(policy_logps.float())
    logratio_chosen, logratio_rejected = split(logratio)
    return {
        "rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected, "rewards/accuracies": accuracy.float(),
        "logps/chosen": logp_chosen, "logps/rejected": logp_rejected,
        "logratio/chosen": logratio_chosen, "logratio/rejected": logratio_rejected,
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
    return torch.where(mask, logp, 0.0).sum(dim=-1)  # [B]


# The fused kernel. For one row h_n [d] with target t: logits z = W h_n [V], p = softmax(z), and
#     log p_t         = z_t - logsumexp(z)
#     d log p_t / d z = onehot(t) - p                           # [V]
#     d log p_t / d h = W^T (onehot(t) - p) = W[t] - p @ W      # [d]
#     d log p_t / d W = (onehot(t) - p) h_n^T                   # [V, d], an outer product
# and backward multiplies row n by g_n = d loss / d log p_n (one value per sequence in training,
# different between sequences, so it is never assumed to be 1). The logits exist one tile at a time
# ([rows, cols] of [N, V], one reused float32 buffer), never whole. Over the vocabulary tiles of a row
# block, logsumexp(z) and p @ W are built online, as flash attention builds softmax(QK^T) V: keep the
# running max m (exp overflows float32 past ~88, so every exponent is taken relative to it), the sum
# S = sum_v exp(z_v - m) and acc = sum_v exp(z_v - m) W_v, and when a tile raises m to m', rescale both
# by exp(m - m') (on the first tile m = -inf, so the empty sums are multiplied by 0). At the end
# logsumexp(z) = m + log S and p @ W = acc / S, so
#   - log p_t = z_t - logsumexp(z), with z_t read from the tile it lies in: the same rounded logit
#     enters both terms (as in the reference), and p_t may underflow float32 without harm;
#   - d log p / d h [N, d] is formed in forward: backward only scales it by g (two matmuls in all
#     when W is frozen, the LoRA case).
# W trained: d W needs g_n inside the sum over n, unknown in forward, so backward recomputes each tile
# as p = exp(z - logsumexp(z)) with the forward's final logsumexp, and adds -p^T (g h) into its rows
# of dW: four matmuls in all, instead of storing [N, V]. The one-hot part is g_n h_n added to row t_n.
# Tiles: on 2 CPU cores, 2048 x 2048 (16 MiB) stays in cache through its exp and sum passes; the bare
# matmuls over them run 4-9% under the full [N, V] ones (`python bench.py logprob`).
# On CUDA larger tiles amortise the ~10 kernel launches per tile (chosen, not yet measured).
TILE = {"cpu": (2048, 2048), "cuda": (8192, 8192)}


def _logits(h, W, buf):
    """z = h W^T into buf (float32, or float64 for float64 inputs); bf16 logits are rounded as the reference's."""
    return torch.mm(h, W.T, out=buf) if buf.dtype == h.dtype else buf.copy_(h @ W.T)


class FusedLogp(torch.autograd.Function):
    """log p(targets_n | h_n) [N] for rows h [N, d], W [V, d] of one dtype, without the [N, V] logits."""

    @staticmethod
    def forward(ctx, h, W, targets, tile):
        (N, d), V, (rows, cols) = h.shape, W.shape[0], tile
        dtype = torch.promote_types(h.dtype, torch.float32)  # accumulate in float32
        need_grad_h = ctx.needs_input_grad[0]
        buf = h.new_empty(min(rows, N), min(cols, V), dtype=dtype)
        z_t, lse = h.new_zeros(N, dtype=dtype), h.new_empty(N, dtype=dtype)
        dlogp_dh = h.new_empty(N, d, dtype=dtype) if need_grad_h else None
        for i in range(0, N, rows):
            h_i, t_i = h[i:i + rows], targets[i:i + rows]
            m = h.new_full((len(h_i),), -math.inf, dtype=dtype)
            S = h.new_zeros(len(h_i), dtype=dtype)
            acc = h.new_zeros(len(h_i), d, dtype=dtype) if need_grad_h else None
            for j in range(0, V, cols):
                W_j = W[j:j + cols]
                e = _logits(h_i, W_j, buf[:len(h_i), :len(W_j)])
                k = t_i - j  # the target's column in this tile, where it is in it
                inside = (k >= 0) & (k < len(W_j))
                z_t[i:i + rows] += e.gather(1, k.clamp(0, len(W_j) - 1)[:, None])[:, 0].where(inside, 0)
                m_new = torch.maximum(m, e.amax(dim=1))
                e.sub_(m_new[:, None]).exp_()  # exp(z - m'), in place
                scale = (m - m_new).exp_()  # exp(m - m')
                S.mul_(scale).add_(e.sum(dim=1))
                if need_grad_h:
                    acc.mul_(scale[:, None]).add_((e.to(W.dtype) @ W_j).to(dtype))
                m = m_new
            lse[i:i + rows] = m + S.log()
            if need_grad_h:  # W[t] - p @ W
                dlogp_dh[i:i + rows] = W[t_i].to(dtype) - acc / S[:, None]
        ctx.tile = tile
        ctx.save_for_backward(h if ctx.needs_input_grad[1] else None, W, targets, lse, dlogp_dh)
        return z_t - lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # grad_h = g * (a constant of forward): no second derivative
    def backward(ctx, g):  # g [N] = d loss / d log p_n
        h, W, targets, lse, dlogp_dh = ctx.saved_tensors
        grad_h = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_h = (g[:, None] * dlogp_dh).to(W.dtype)
        if ctx.needs_input_grad[1]:
            N, V, (rows, cols), dtype = h.shape[0], W.shape[0], ctx.tile, lse.dtype
            buf = h.new_empty(min(rows, N), min(cols, V), dtype=dtype)
            gh = g[:, None].to(dtype) * h.to(dtype)  # [N, d]: scale the rows of h, not the [N, V] p
            grad_W = torch.zeros_like(W, dtype=dtype)  # float32 sums
            for i in range(0, N, rows):
                for j in range(0, V, cols):  # recompute the tile: cheaper than storing [N, V]
                    h_i, W_j = h[i:i + rows], W[j:j + cols]
                    p = _logits(h_i, W_j, buf[:len(h_i), :len(W_j)]).sub_(lse[i:i + rows, None]).exp_()
                    if dtype == W.dtype:
                        grad_W[j:j + cols].addmm_(p.T, gh[i:i + rows], alpha=-1)  # in place: no [cols, d] temporary
                    else:  # the matmuls run in the input dtype (bf16 on GPU), sums in float32
                        grad_W[j:j + cols].sub_(p.to(W.dtype).T @ gh[i:i + rows].to(W.dtype))
            grad_W = grad_W.index_add_(0, targets, gh).to(W.dtype)  # + the onehot(t) (g h)^T part
        return grad_h, grad_W, None, None


def sequence_logps(h, W, targets, mask, impl="auto", tile=None):
    """log pi(y|x) [B] float32: the sum of log p(targets) over the masked positions of each sequence.

    Same arguments as sequence_logps_reference, except that `mask` may also be given as the scored
    positions (seq, pos), LongTensors [M] as mask.nonzero(as_tuple=True) returns them: finding them in a
    mask on a GPU sizes an output by the mask's values, so the host waits for the device (a sync);
    data.collate builds them on the host. Only the scored rows reach the kernel, so prompt and padding
    positions cost nothing. impl: "reference" (full logits), "fused" (FusedLogp), "auto" (= "fused"; a
    Triton kernel for CUDA is not written yet). tile: (rows, cols) of the logits the fused kernel holds at
    a time; default TILE[device type].
    """
    if h.dim() != 3 or W.dim() != 2 or h.shape[-1] != W.shape[1]:
        raise ValueError(f"sequence_logps needs h [B, T, d] and W [V, d], got {tuple(h.shape)} and {tuple(W.shape)}")
    seq, pos = (None, None) if isinstance(mask, torch.Tensor) else mask
    where = [mask] if seq is None else [seq, pos]
    if len({h.device, W.device, targets.device, *(x.device for x in where)}) > 1:
        raise ValueError(f"sequence_logps: h, W, targets and mask must be on one device, got {h.device}, "
                         f"{W.device}, {targets.device} and {where[0].device}")
    if targets.shape != h.shape[:2] or seq is None and (mask.shape != h.shape[:2] or mask.dtype != torch.bool):
        raise ValueError(f"targets and mask (bool) must be [B, T] = {tuple(h.shape[:2])}, got "
                         f"{tuple(targets.shape)} and {tuple(where[0].shape)} {where[0].dtype}")
    if seq is not None and not (seq.dtype == pos.dtype == torch.long and seq.dim() == 1 and seq.shape == pos.shape):
        raise ValueError(f"sequence_logps: scored positions (seq, pos) must be two LongTensors [M], got "
                         f"{tuple(seq.shape)} {seq.dtype} and {tuple(pos.shape)} {pos.dtype}")
    if impl == "reference":
        if seq is not None:
            mask = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device).index_put_((seq, pos), seq >= 0)
        return sequence_logps_reference(h, W, targets, mask)
    if impl not in ("fused", "auto"):
        raise ValueError(f"unknown sequence_logps impl {impl!r}; expected 'reference', 'fused' or 'auto'")
    if seq is None:
        seq, pos = mask.nonzero(as_tuple=True)  # [M]: the sequence and position of each scored token
    return _summed_logps(h[seq, pos], W, targets[seq, pos], seq, h.shape[0], tile)


def _summed_logps(h_m, W, t, seq, n, tile=None):
    """The fused log-probs of scored tokens h_m [M, d] with targets t [M], summed per sequence seq [M] -> [n]."""
    require(((t >= 0) & (t < W.shape[0])).all(), f"targets at masked positions must be token ids in [0, {W.shape[0]})")
    device = h_m.device.type
    if torch.is_autocast_enabled(device):
        # the kernel's matmuls write into its buffer (out=) or run in backward, where autocast does not
        # reach: cast here, as autocast casts the reference's h @ W.T (W.grad returns in W's dtype)
        amp = torch.get_autocast_dtype(device)
        h_m, W = h_m.to(amp), W.to(amp)
    if h_m.dtype != W.dtype:
        raise ValueError(f"sequence_logps: h and W must have one dtype, or run under torch.autocast; got "
                         f"{h_m.dtype} and {W.dtype}")
    logp = FusedLogp.apply(h_m, W, t, tile or TILE.get(device, TILE["cpu"]))  # [M]
    return torch.zeros(n, dtype=torch.float32, device=h_m.device).index_add(0, seq, logp.float())


def batch_logps(model, tokens, loss_mask):
    """log pi(y|x) of each of the B*K rows [B*K]: one forward pass, then the fused LM-head log-prob over
    the response positions only (position t predicts token t + 1). loss_mask: [B*K, T] bool, or its True
    positions (rows, cols) as data.collate gives them under "scored" (no host sync: see sequence_logps)."""
    h = model.hidden(tokens[:, :-1])  # [B*K, T-1, d]
    mask = loss_mask[:, 1:] if isinstance(loss_mask, torch.Tensor) else (loss_mask[0], loss_mask[1] - 1)
    return sequence_logps(h, model.output.weight, tokens[:, 1:], mask)  # [B*K]


def packed_logps(model, batch):
    """log pi(y|x) [B, K] of a packed batch (data.pack): each prompt computed once for its K responses, the
    same values as batch_logps on collate's batch. A packed row holds several responses, so each scored
    token's log-prob is summed into its own slot b * K + k, read off the row's prompt and response ids."""
    tokens, prompt, response = batch["tokens"], batch["prompt"], batch["response"]
    B, K = batch["rewards"].shape
    h = model.hidden(tokens, pos=batch["pos"], pack=(batch["to_padded"], batch["to_packed"]))  # [R, L, d]
    row, col = batch["scored"]  # [M]: the scored tokens (from the lengths: loss_mask.nonzero() would sync)
    h_m = h[row, batch["source"][row, col]]  # [M, d]: the hidden state that predicts each
    slot = prompt[row, col] * K + response[row, col]  # [M]
    return _summed_logps(h_m, model.output.weight, tokens[row, col], slot, B * K).view(B, K)
