"""The losses of nca.py against independent formulas: hand-worked values, TRL's nca_pair and the
paper's optima reached by optimising free r_theta values."""
import math

import pytest
import torch
import torch.nn.functional as F

import nca


def _pair(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    policy, ref = torch.randn(B, 2, generator=g, dtype=torch.float64), torch.randn(B, 2, generator=g, dtype=torch.float64)
    rewards = torch.tensor([[3.0, 1.0], [0.0, 2.0], [5.0, -1.0], [1.0, 4.0], [2.0, 0.5]], dtype=torch.float64)[:B]
    return policy, ref, rewards


def test_dpo_loss_is_minus_logsigmoid_of_the_reward_margin():
    policy, ref, rewards = _pair()
    beta = 0.1
    w = rewards.argmax(-1)  # the winner's column
    l = 1 - w
    r = beta * (policy - ref)
    r_w, r_l = r.gather(1, w[:, None]).squeeze(1), r.gather(1, l[:, None]).squeeze(1)
    expected = [-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(r_w.tolist(), r_l.tolist())]
    assert torch.allclose(nca.dpo_loss(policy, ref, rewards, beta=beta), torch.tensor(expected, dtype=torch.float64))


def test_infonca_at_k2_tends_to_dpo_as_alpha_goes_to_zero():
    policy, ref, rewards = _pair()
    dpo = nca.dpo_loss(policy, ref, rewards, beta=0.1)
    gaps = [(nca.infonca_loss(policy, ref, rewards, alpha=a, beta=0.1) - dpo).abs().max().item()
            for a in (10.0, 1.0, 0.1, 0.01)]
    assert gaps[0] > 1e-2  # a large temperature really is a different loss...
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:]))  # ...that converges to DPO
    assert gaps[-1] < 1e-12


def test_nca_pair_loss_equals_trl_nca_pair_formula():
    policy, ref, rewards = _pair()
    beta = 0.3
    chosen = rewards.argmax(-1, keepdim=True)
    rejected = 1 - chosen
    # TRL DPOTrainer, loss_type="nca_pair", written out independently of nca.py
    chosen_rewards = beta * (policy.gather(1, chosen) - ref.gather(1, chosen)).squeeze(1)
    rejected_rewards = beta * (policy.gather(1, rejected) - ref.gather(1, rejected)).squeeze(1)
    trl = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    assert torch.allclose(nca.nca_pair_loss(policy, ref, rewards, beta=beta), trl)


def test_losses_by_hand_on_one_prompt():
    # K = 3, beta = 1, ref = 0 so r_theta = policy; alpha = 1 so w = softmax(rewards)
    r_theta = [0.5, -1.0, 2.0]
    rewards = [1.0, 0.0, -1.0]
    z = sum(math.exp(v) for v in rewards)
    w = [math.exp(v) / z for v in rewards]
    zt = sum(math.exp(v) for v in r_theta)
    infonca = -sum(wi * math.log(math.exp(ri) / zt) for wi, ri in zip(w, r_theta))
    sig = lambda t: 1 / (1 + math.exp(-t))
    nca_ = -sum(wi * math.log(sig(ri)) + math.log(sig(-ri)) / 3 for wi, ri in zip(w, r_theta))
    args = (torch.tensor([r_theta]), torch.zeros(1, 3), torch.tensor([rewards]))
    assert nca.infonca_loss(*args, alpha=1.0, beta=1.0).item() == pytest.approx(infonca, rel=1e-6)
    assert nca.nca_loss(*args, alpha=1.0, beta=1.0).item() == pytest.approx(nca_, rel=1e-6)


def test_alpha_zero_labels_are_one_hot_and_ties_share_the_weight():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 5.0, 5.0]])
    w = nca.soft_labels(rewards, 0.0)
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1 / 3, 0.0, 1 / 3, 1 / 3]]))
    # ...which is what softmax(r / alpha) tends to
    assert torch.allclose(nca.soft_labels(rewards, 1e-3), w)


def _optimise_free_r_theta(loss_fn, rewards, alpha, steps=3000):
    # beta = 1 and ref = 0 make policy_logps the free r_theta values themselves
    r_theta = torch.zeros_like(rewards, requires_grad=True)
    opt = torch.optim.LBFGS([r_theta], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(r_theta, torch.zeros_like(rewards), rewards, alpha=alpha, beta=1.0).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return r_theta.detach()


def test_infonca_minimiser_is_log_w_plus_a_per_prompt_constant():
    rewards = torch.tensor([[1.0, 0.2, -0.5, 0.7], [2.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    alpha = 0.5
    r_theta = _optimise_free_r_theta(nca.infonca_loss, rewards, alpha)
    log_w = torch.log_softmax(rewards / alpha, dim=-1)
    shift = r_theta - log_w  # must be the same constant C(x) across each row
    assert torch.allclose(shift, shift.mean(dim=-1, keepdim=True), atol=1e-5)


def test_nca_minimiser_is_log_k_w():
    rewards = torch.tensor([[1.0, 0.2, -0.5, 0.7], [2.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    alpha, K = 0.5, 4
    r_theta = _optimise_free_r_theta(nca.nca_loss, rewards, alpha)
    # sample form of r/alpha - log E_mu exp(r/alpha), with the K samples standing in for mu
    expected = torch.log(K * torch.softmax(rewards / alpha, dim=-1))
    assert torch.allclose(r_theta, expected, atol=1e-5)
    assert (r_theta.gather(1, rewards.argmax(-1, keepdim=True)) > 0).all()  # best response rises above mu


def _by_hand(name, r_theta, rewards, alpha):
    """One prompt's loss written out with math from the equations; alpha = 0: ties share the label."""
    sig = lambda t: 1 / (1 + math.exp(-t))
    K, top = len(rewards), max(rewards)
    e = [float(v == top) if alpha == 0 else math.exp((v - top) / alpha) for v in rewards]
    w = [x / sum(e) for x in e]
    if name == "dpo":  # Rafailov et al. Eq. 7, winner first or second
        r_w, r_l = r_theta if rewards[0] > rewards[1] else r_theta[::-1]
        return -math.log(sig(r_w - r_l))
    if name == "nca_pair":  # TRL's nca_pair
        r_w = r_theta[0] if rewards[0] > rewards[1] else r_theta[1]
        return -math.log(sig(r_w)) - 0.5 * sum(math.log(sig(-t)) for t in r_theta)
    if name == "infonca":
        lse = math.log(sum(math.exp(t) for t in r_theta))
        return -sum(wi * (t - lse) for wi, t in zip(w, r_theta))
    return -sum(wi * math.log(sig(t)) + math.log(sig(-t)) / K for wi, t in zip(w, r_theta))


@pytest.mark.parametrize("name", ["dpo", "infonca", "nca", "nca_pair"])
def test_each_named_loss_computes_its_formula_called_as_train_calls_it(name):
    # by name, with alpha only where the loss takes one: LOSSES and PAIR_LOSSES must match the formulas
    K = 2 if name in nca.PAIR_LOSSES else 3
    r_theta, rewards, alpha, beta = [0.7, -0.4, 1.3][:K], [2.0, 5.0, 1.0][:K], 0.8, 0.5
    policy = torch.tensor([[t / beta for t in r_theta]], dtype=torch.float64)  # ref = 0: r_theta = beta * policy
    kwargs = dict(beta=beta) if name in nca.PAIR_LOSSES else dict(alpha=alpha, beta=beta)
    got = nca.LOSSES[name](policy, torch.zeros_like(policy), torch.tensor([rewards], dtype=torch.float64), **kwargs)
    assert got.item() == pytest.approx(_by_hand(name, r_theta, rewards, alpha), rel=1e-12)
    assert set(nca.LOSSES) == {"dpo", "infonca", "nca", "nca_pair"}


@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_alpha_zero_keeps_float64_labels_and_losses(name):
    # ties at the top: weights 1/3, which float32 labels round (~3e-8 relative)
    rewards = torch.tensor([[2.0, 2.0, 2.0, 0.5], [1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    policy = torch.tensor([[0.3, -1.1, 0.9, 0.2], [-0.7, 0.4, 1.7, -2.3]], dtype=torch.float64)
    assert nca.soft_labels(rewards, 0.0).dtype == torch.float64
    got = nca.LOSSES[name](policy, torch.zeros_like(policy), rewards, alpha=0.0, beta=1.0)
    for row in range(2):
        expected = _by_hand(name, policy[row].tolist(), rewards[row].tolist(), 0.0)
        assert got[row].item() == pytest.approx(expected, rel=1e-14, abs=0)


def test_metrics_on_a_hand_worked_batch():
    policy = torch.tensor([[-1.0, -3.0, -2.0], [-4.0, -1.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0]])
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]])  # best: column 0, then column 1
    m = nca.metrics(policy, ref, rewards, beta=0.5)
    # log-ratios: row 0 = [1, -1, 0] (chosen 1, rejected mean -0.5); row 1 = [-2, 1, 0] (chosen 1, rejected -1)
    assert m["logratio/chosen"].item() == pytest.approx(1.0)
    assert m["logratio/rejected"].item() == pytest.approx(-0.75)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.5 * 1.75)
    assert m["logps/chosen"].item() == pytest.approx(-1.0)
    assert m["logps/rejected"].item() == pytest.approx((-3 - 2 - 4 - 2) / 4)
    # ordered pairs: row 0 (0>2, 0>1, 2>1) all right; row 1 (1>2 right, 1>0 right, 2>0 right) -> 6/6
    assert m["rewards/accuracies"].item() == pytest.approx(1.0)
    m = nca.metrics(policy, ref, -rewards, beta=0.5)  # reversed preferences: every pair wrong
    assert m["rewards/accuracies"].item() == pytest.approx(0.0)


def test_metrics_with_tied_rewards_follow_the_alpha_zero_labels():
    # ties at the top are all chosen, with equal weight; a prompt whose rewards all tie has rejected = chosen
    logratio = torch.tensor([[1.0, 3.0, -1.0, 0.0], [2.0, -2.0, 0.0, 8.0]])  # ref = 0: policy = log-ratio
    rewards = torch.tensor([[2.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    m = nca.metrics(logratio, torch.zeros_like(logratio), rewards, beta=0.5)
    # row 0: chosen (1 + 3) / 2 = 2, rejected (-1 + 0) / 2 = -0.5; row 1: both the mean, 2
    assert m["logratio/chosen"].item() == pytest.approx((2 + 2) / 2)
    assert m["logratio/rejected"].item() == pytest.approx((-0.5 + 2) / 2)
    assert m["rewards/margins"].item() == pytest.approx(0.5 * (2 - 0.75))
    assert m["rewards/accuracies"].item() == pytest.approx(4 / 5)  # row 0's strict pairs; 2 > 3 is wrong
    perm = torch.tensor([3, 1, 2, 0])  # the order of the K responses changes nothing
    m2 = nca.metrics(logratio[:, perm], torch.zeros_like(logratio), rewards[:, perm], beta=0.5)
    assert all(torch.equal(m[k], m2[k]) for k in m)
    tied = nca.metrics(logratio[1:], torch.zeros(1, 4), rewards[1:], beta=0.5)  # nothing rejected anywhere
    assert tied["rewards/margins"].item() == 0 and all(torch.isfinite(v) for v in tied.values())


BAD_INPUTS = [
    (dict(policy=torch.zeros(4)), "must be \\[B, K\\]"),
    (dict(ref=torch.zeros(2, 3)), "share one \\[B, K\\] shape"),
    (dict(policy=torch.zeros(2, 1), ref=torch.zeros(2, 1), rewards=torch.zeros(2, 1)), "K >= 2|K = 2"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=float("inf")), "alpha"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "beta"),
    (dict(rewards=torch.tensor([[1.0, float("inf")], [0.0, 1.0]])), "rewards must be finite"),
]
# dpo, nca_pair and metrics take no reward temperature (alpha is the limit 0, or unused)
CASES = [(fn, bad, msg) for fn in ("infonca", "nca", "dpo", "nca_pair", "metrics") for bad, msg in BAD_INPUTS
         if not (fn in ("dpo", "nca_pair", "metrics") and "alpha" in bad)]


@pytest.mark.parametrize("fn, bad, message", CASES)
def test_every_input_check_fires_with_its_message(fn, bad, message):
    args = dict(policy=torch.zeros(2, 2), ref=torch.zeros(2, 2), rewards=torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                alpha=0.1, beta=0.1)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        if fn == "metrics":
            nca.metrics(args["policy"], args["ref"], args["rewards"], beta=args["beta"])
        else:
            kwargs = dict(beta=args["beta"]) if fn in nca.PAIR_LOSSES else dict(alpha=args["alpha"], beta=args["beta"])
            nca.LOSSES[fn](args["policy"], args["ref"], args["rewards"], **kwargs)


@pytest.mark.parametrize("alpha, beta, message", [(-0.1, 0.1, "alpha .* >= 0, got -0.1"), (0.1, 0.0, "beta .* > 0, got 0.0"),
                                                  (float("nan"), 0.1, "alpha"), (0.1, float("inf"), "beta")])
def test_check_alpha_beta_names_the_bad_value_and_what_was_expected(alpha, beta, message):
    nca.check_alpha_beta(0.0, 0.01)  # alpha = 0 (the pair losses' limit) is allowed
    with pytest.raises(ValueError, match=message):
        nca.check_alpha_beta(alpha, beta)


def test_soft_labels_stay_finite_for_a_tiny_temperature():
    w = nca.soft_labels(torch.tensor([[1.0, 2.0], [3.0, 3.0]]), 1e-39)
    assert torch.equal(w, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))


@pytest.mark.parametrize("loss", ["dpo", "nca_pair"])
def test_pair_losses_refuse_more_than_two_responses(loss):
    with pytest.raises(ValueError, match="K = 2"):
        nca.LOSSES[loss](torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), beta=0.1)
