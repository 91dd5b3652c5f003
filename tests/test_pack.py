"""Packed batches (data.pack, model.Attention on packed rows, nca.packed_logps) against the padded path (data.collate,
nca.batch_logps), the readable reference: same ids, and the same log-probs and parameter gradients.

Golden values: the layout of data.packed_batch's docstring picture, written out by hand; for the
numbers, the padded path, where each response has a row of its own and plain causal attention.
"""
import pytest
import torch

import data
import lora
import nca
from conftest import tiny

TOK = data.load_tokenizer("byte")


def test_the_docstring_picture_by_hand():
    groups = [([1, 2, 3, 4], [[5, 6, 7], [8, 9]]), ([10, 11], [[12, 13], [14]])]
    b = data.packed_batch(groups, pad_id=0, pack_tokens=15)
    assert b["tokens"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert b["pos"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 0, 1, 2, 3, 2]]
    assert b["prompt"].tolist() == [[0] * 9 + [1] * 5]
    assert b["response"].tolist() == [[-1] * 4 + [0] * 3 + [1] * 2 + [-1] * 2 + [0] * 2 + [1]]
    assert b["loss_mask"].tolist() == [[False] * 4 + [True] * 5 + [False] * 2 + [True] * 3]
    assert b["source"][b["loss_mask"]].tolist() == [3, 4, 5, 3, 7, 10, 11, 10]
    # collate's rows [prompt; response k] as indices of the packed tokens, in two buckets (lengths 7, 6 | 4, 3)
    assert [x.tolist() for x in b["to_padded"]] == [[[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 7, 8, 0]],
                                                    [[9, 10, 11, 12], [9, 10, 13, 0]]]
    assert b["to_packed"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 11, 12, 14, 15, 16, 17, 20]]
    padded = torch.cat([b["tokens"].flatten()[rows].flatten() for rows in b["to_padded"]])
    assert padded[b["to_packed"]].tolist() == b["tokens"].tolist()  # every token finds its slot again


def test_groups_go_to_the_first_row_with_room_and_a_long_group_gets_its_own_row():
    groups = [([1] * 4, [[2] * 3, [3] * 2]), ([4] * 2, [[5] * 2, [6]]), ([7] * 9, [[8] * 9, [9] * 9]),
              ([1], [[2], [3]])]
    b = data.packed_batch(groups, pad_id=0, pack_tokens=12)  # lengths 9, 5, 27, 3
    # row 0: group 0 (9) + group 3 (3) = 12; row 1: group 1; row 2: group 2, over the budget, alone
    assert [sorted(set(r.tolist()) - {-1}) for r in b["prompt"]] == [[0, 3], [1], [2]]
    assert b["tokens"].shape == (3, 27)
    assert (b["tokens"][1, 5:] == 0).all() and (b["prompt"][1, 5:] == -1).all() and not b["loss_mask"][1, 5:].any()


def examples(K):
    """Ragged: prompts of 1..40 bytes, a response of one token (the end of turn alone), one cut at max_length."""
    gen = torch.Generator().manual_seed(K)
    text = lambda n: "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=gen))
    lengths = [(5, [3, 0, 12, 7]), (40, [1, 30, 0, 9]), (1, [60, 2, 5, 5]), (17, [8, 8, 8, 8])]
    return [data.Example(text(p), [text(n) for n in rs[:K]], [float(k) for k in range(K)]) for p, rs in lengths]


KW = dict(max_length=48, max_prompt_length=24)  # prompt 40 is cut to 24; 24 + 30 and 1 + 60 responses are cut


def padded_and_packed(m, exs, pack_tokens, grad=True):
    """log pi [B, K] and the gradients of sum g * log pi (g differs per response) of both paths."""
    out = []
    for path in ("padded", "packed"):
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            if path == "padded":
                b = data.collate(exs, TOK, **KW)
                logps = nca.batch_logps(m, b["tokens"], b["loss_mask"]).view(len(exs), -1)
            else:
                b = data.pack(exs, TOK, pack_tokens=pack_tokens, **KW)
                logps = nca.packed_logps(m, b)
        if grad:
            (logps * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        out.append((logps.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, b))
    return out


def assert_same(padded, packed):
    (lp, gp, _), (lq, gq, _) = padded, packed
    torch.testing.assert_close(lq, lp, rtol=1e-5, atol=0)
    assert gp.keys() == gq.keys() and gp
    for name in gp:  # relative to the gradient's scale: a sum of many float32 terms in another order
        torch.testing.assert_close(gq[name], gp[name], rtol=1e-5, atol=1e-5 * gp[name].abs().max().item(), msg=name)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("pack_tokens", [100, 400])  # 100: rows of one to three prompts; 400: one row
def test_packed_equals_padded_log_probs_and_gradients(K, pack_tokens):
    padded, packed = padded_and_packed(tiny(), examples(K), pack_tokens)
    pb, qb = padded[2], packed[2]
    for key in ("prompts_truncated", "responses_truncated"):
        assert pb[key] == qb[key] == {"prompts_truncated": 1, "responses_truncated": 2}[key]
    assert qb["loss_mask"].sum() == pb["loss_mask"].sum()  # the same scored tokens, now without the repeated prompts
    assert qb["tokens"].numel() < pb["tokens"].numel()
    if pack_tokens == 400:
        assert qb["tokens"].shape[0] == 1
    else:
        assert any(len(set(r.tolist()) - {-1}) > 1 for r in qb["prompt"])  # a row holding several prompts
    assert_same(padded, packed)


def test_the_ids_are_collates():
    exs = examples(4)
    pb, qb = data.collate(exs, TOK, **KW), data.pack(exs, TOK, pack_tokens=100, **KW)
    for b in range(len(exs)):
        for k in range(4):
            row = pb["tokens"][b * 4 + k][pb["tokens"][b * 4 + k] != TOK.pad_id]
            at = (qb["prompt"] == b) & (qb["response"] < 0), (qb["prompt"] == b) & (qb["response"] == k)
            assert torch.cat([qb["tokens"][at[0]], qb["tokens"][at[1]]]).tolist() == row.tolist()


def test_with_a_sliding_window_each_token_sees_what_it_sees_alone():
    padded, packed = padded_and_packed(tiny(sliding_window=6), examples(4), 100)
    assert_same(padded, packed)


def test_with_activation_checkpointing():  # the mask goes through torch.utils.checkpoint with the blocks
    m = tiny()
    m.checkpoint_activations = True
    assert_same(*padded_and_packed(m, examples(4), 100))


def test_with_lora_adapters_on_and_off():
    m = tiny()
    lora.inject(m, r=4)
    with torch.no_grad():
        for mod in lora.lora_modules(m).values():  # B = 0 at init would make the adapters the identity
            mod.lora_B.normal_(0, 0.1)
    on = padded_and_packed(m, examples(4), 100)
    assert_same(*on)
    with lora.disabled(m):  # the reference policy, computed without gradients as train.py does
        padded, packed = padded_and_packed(m, examples(4), 100, grad=False)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=0)
    assert not torch.allclose(packed[0], on[1][0], rtol=1e-3)  # the adapters did change the log-probs


def test_by_default_the_batch_is_one_row():
    groups = [([1] * 4, [[2] * 3, [3] * 2]), ([4] * 2, [[5] * 2, [6]]), ([7], [[8], [9]])]  # lengths 9, 5, 3
    b = data.packed_batch(groups, pad_id=0)
    assert b["tokens"].shape == (1, 17) and not (b["prompt"] < 0).any()
