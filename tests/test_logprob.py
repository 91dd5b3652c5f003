"""nca.sequence_logps: the fused kernel equals the full-logits reference in value and gradients.

Golden values: float64 finite differences (torch.autograd.gradcheck) for the kernel itself, and the
readable reference (full logits + log_softmax, differentiated by autograd) for the masked,
per-sequence version. Shapes are chosen so that N and V are not multiples of the tile size.
"""
import pytest
import torch

import nca
from conftest import tiny


def batch(B=4, T=37, d=16, V=1003, dtype=torch.float32, seed=0):
    """h [B, T, d], W [V, d], targets [B, T], mask [B, T] with ragged masks and one empty sequence."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[1] = False  # a sequence with no scored token: log pi = 0, no gradient
    return h.to(dtype), W.to(dtype), targets, mask


def value_and_grads(impl, h, W, targets, mask, g, **kw):
    """sequence_logps and the gradients of sum_b g_b log pi_b (g differs per sequence, as in training)."""
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_(W.requires_grad)
    logps = nca.sequence_logps(h, W, targets, mask, impl=impl, **kw)
    (logps @ g).backward()
    return logps, h.grad, W.grad


@pytest.mark.parametrize("w_frozen", [False, True])
def test_fused_kernel_gradients_pass_float64_gradcheck(w_frozen):
    h, W, targets, _ = batch(B=2, T=11, d=5, V=13, dtype=torch.float64)
    h, W, targets = h[0].requires_grad_(), W.requires_grad_(not w_frozen), targets[0]
    # tiles of 4 x 5 over [11, 13]: ragged in both directions, the online logsumexp runs over 3 vocabulary tiles
    assert torch.autograd.gradcheck(lambda h, W: nca.FusedLogp.apply(h, W, targets, (4, 5)), (h, W))


@pytest.mark.parametrize("w_frozen", [False, True])
def test_fused_equals_reference_float32_with_masks_ragged_tiles_and_per_sequence_grads(w_frozen):
    h, W, targets, mask = batch()
    W.requires_grad_(not w_frozen)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ref = value_and_grads("reference", h, W, targets, mask, g)
    fused = value_and_grads("fused", h, W, targets, mask, g, tile=(16, 100))  # V = 1003: 11 tiles, the last of 3
    assert mask.sum() % 16 != 0 and fused[0].dtype == torch.float32
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-5)
    assert fused[0][1] == 0 and (fused[1][1] == 0).all()  # the empty sequence
    if w_frozen:
        assert fused[2] is None
    else:
        torch.testing.assert_close(fused[2], ref[2], rtol=1e-5, atol=1e-5)


def test_fused_bfloat16_is_as_accurate_as_the_reference():
    h, W, targets, mask = batch(T=64, d=64, V=2051, dtype=torch.bfloat16)
    W.requires_grad_()
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    exact = value_and_grads("reference", h.double(), W.double().requires_grad_(), targets, mask, g)  # same numbers
    ref = value_and_grads("reference", h, W, targets, mask, g)
    fused = value_and_grads("fused", h, W, targets, mask, g, tile=(48, 500))
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    for f, r, e in zip(fused, ref, exact):  # bf16 logits keep ~3 digits; sums run in float32
        error = lambda x: ((x.double() - e).norm() / e.norm()).item()
        assert error(f) < max(1.25 * error(r), 1e-6) and error(f) < 0.01


def test_bfloat16_confident_tokens_never_get_log_p_above_zero():
    # p_t ~ 1 (most tokens of a trained LM): log p_t = z_t - logsumexp(z) must subtract the same rounded
    # z_t that the logsumexp saw, or bf16 rounding of |z| ~ 30 (steps of 0.125) shows up as log p > 0
    h, W, targets, mask = batch(B=2, T=200, d=64, V=1000, dtype=torch.bfloat16)
    mask[:] = True
    h = (h.float() + 4 * W.float()[targets]).to(torch.bfloat16)  # z_t ~ 4 |W_t|^2 ~ 60: dominant
    per_token = lambda impl: nca.sequence_logps(h.flatten(0, 1)[:, None], W, targets.flatten()[:, None],
                                                mask.flatten()[:, None], impl=impl, tile=(64, 300))
    exact = nca.sequence_logps(h.flatten(0, 1)[:, None].double(), W.double(), targets.flatten()[:, None],
                               mask.flatten()[:, None], impl="reference")
    fused, ref = per_token("fused"), per_token("reference")
    assert (fused <= 0).all() and (exact > -0.01).float().mean() > 0.5
    assert (fused.double() - exact).norm() <= max(1.25 * (ref.double() - exact).norm(), 1e-3)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
def test_under_bfloat16_autocast_as_train_py_runs_it_the_matmuls_are_the_references(h_dtype):
    # train.py: forward under autocast, backward outside it; float32 W (master weights), h float32 or
    # bf16 (LoRA/FSDP). The fused kernel must compute the reference's bf16 logits, not more precise
    # float32 ones (slow on a GPU) nor crash on mixed dtypes in backward.
    h, W, targets, mask = batch(T=64, d=64, V=2051)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0])
    exact = value_and_grads("reference", h.double(), W.double().requires_grad_(), targets, mask, g)
    runs = {}
    for impl in ("reference", "fused"):
        hh, WW = h.to(h_dtype).clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = nca.sequence_logps(hh, WW, targets, mask, impl=impl, tile=(48, 500))
        (logps @ g).backward()
        runs[impl] = (logps, hh.grad, WW.grad)
    rel = lambda x, y: ((x.double() - y.double()).norm() / y.double().norm()).item()
    (f, *f_grads), (r, *r_grads) = runs["fused"], runs["reference"]
    assert rel(f, r) < 0.01 * rel(r, exact[0])  # the same bf16 logits (float32 ones: rel(f, r) ~ rel(r, exact))
    for f, r, e in zip(f_grads, r_grads, exact[1:]):  # bf16 gradients, rounded at other places: as accurate
        assert f.dtype == r.dtype and rel(f, e) < 1.25 * rel(r, e)


def test_second_derivatives_are_refused_not_silently_wrong():
    h, W, targets, mask = batch(B=2, T=5, d=4, V=7)
    h.requires_grad_()
    logps = nca.sequence_logps(h, W, targets, mask)
    (grad_h,) = torch.autograd.grad((logps ** 2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        grad_h.sum().backward()


@pytest.mark.parametrize("tile", [(2048, 2048), (3, 7)])
def test_huge_logits_target_probability_underflowing_float32_is_still_exact(tile):
    h, W, targets, mask = batch(B=2, T=8, d=8, V=101)
    W = W * 200  # logits ~ +-1e3: most targets have p < 1e-38 in float32; small tiles rescale by exp(-1e3)
    g = torch.tensor([1.0, -2.0])
    h64, W64 = h.double().requires_grad_(), W.double().requires_grad_()  # the readable formula, in float64
    exact = torch.log_softmax(h64 @ W64.T, -1).gather(-1, targets[..., None]).squeeze(-1).where(mask, 0.0).sum(-1)
    (exact @ g.double()).backward()
    fused = value_and_grads("fused", h, W.requires_grad_(), targets, mask, g, tile=tile)
    assert exact[0] < -1e3 and all(torch.isfinite(x).all() for x in fused)
    for f, e in zip(fused, (exact.detach(), h64.grad, W64.grad)):
        torch.testing.assert_close(f.double(), e, rtol=1e-5, atol=1e-3)


def test_under_no_grad_as_for_the_reference_policy_values_agree():
    h, W, targets, mask = batch()
    with torch.no_grad():  # the reference policy's log-probs: the forward skips d log p / d h
        fused = nca.sequence_logps(h.requires_grad_(), W, targets, mask, tile=(16, 100))
    torch.testing.assert_close(fused, nca.sequence_logps_reference(h, W, targets, mask).detach(), rtol=1e-5, atol=1e-4)


def test_unmasked_positions_never_reach_the_kernel():
    h, W, targets, mask = batch(B=2, T=9, d=8, V=50)
    ref = nca.sequence_logps(h, W, targets, mask, impl="reference")
    h, targets = h.masked_fill(~mask[..., None], float("nan")), targets.masked_fill(~mask, -100)
    torch.testing.assert_close(nca.sequence_logps(h, W, targets, mask), ref)  # default impl: fused


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_the_scored_positions_give_what_the_mask_gives_and_no_host_sync(host_syncs, impl):
    h, W, targets, mask = batch(B=3, T=9, d=8, V=50)
    g = torch.tensor([1.0, -2.0, 0.5])
    positions = mask.nonzero(as_tuple=True)
    with host_syncs:
        got = value_and_grads(impl, h, W.requires_grad_(), targets, positions, g)
    assert host_syncs.ops == []
    for a, b in zip(got, value_and_grads(impl, h, W, targets, mask, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="two LongTensors"):
        nca.sequence_logps(h, W, targets, (positions[0], positions[1][:-1]))


def test_default_impl_is_the_fused_kernel(monkeypatch):
    calls = []
    apply = nca.FusedLogp.apply
    monkeypatch.setattr(nca.FusedLogp, "apply", lambda *a: calls.append(1) or apply(*a))
    nca.sequence_logps(*batch(B=2, T=5, d=4, V=7))
    assert calls


def test_no_scored_token_at_all_gives_zeros():
    h, W, targets, mask = batch(B=3, T=5, d=4, V=7)
    g = torch.ones(3)
    logps, grad_h, grad_W = value_and_grads("fused", h, W.requires_grad_(), targets, torch.zeros_like(mask), g)
    assert (logps == 0).all() and (grad_h == 0).all() and (grad_W == 0).all()


@pytest.mark.parametrize("change, message", [
    (lambda h, W, t, m: (h[0], W, t, m), "h \\[B, T, d\\]"),
    (lambda h, W, t, m: (h, W[:, :3], t, m), "W \\[V, d\\]"),
    (lambda h, W, t, m: (h, W, t[:, :2], m), "targets and mask"),
    (lambda h, W, t, m: (h, W, t, m.float()), "targets and mask"),
    (lambda h, W, t, m: (h, W, t.masked_fill(m, 7), m), "token ids in \\[0, 7\\)"),
    (lambda h, W, t, m: (h, W.double(), t, m), "one dtype, or run under torch.autocast"),
    (lambda h, W, t, m: (h, W.to("meta"), t, m), "on one device"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        nca.sequence_logps(*change(*batch(B=2, T=5, d=4, V=7)))
    with pytest.raises(ValueError, match="unknown sequence_logps impl"):
        nca.sequence_logps(*batch(B=2, T=5, d=4, V=7), impl="cuda")


def test_batch_logps_scores_each_response_token_from_the_position_before_it():
    # golden: the model's full forward logits, log_softmax, the logit at t scoring token t + 1
    m = tiny()
    V = m.args.vocab_size
    tokens = torch.randint(0, V, (3, 11))
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 4:], mask[1, 7:9], mask[2, 10] = True, True, True  # response tokens (never position 0)
    logp = torch.log_softmax(m(tokens).double(), dim=-1)  # [B, T, V]
    expected = torch.stack([sum(logp[b, t - 1, tokens[b, t]] for t in range(1, 11) if mask[b, t]) for b in range(3)])
    torch.testing.assert_close(nca.batch_logps(m, tokens, mask).double(), expected, rtol=1e-5, atol=1e-4)
