"""Losses: pure CPU, milliseconds. Every divergence is checked against a hand-written float64
reference, for values and gradients, and for the invariants the training loop relies on."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cbd_ray import losses as L

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = list(L.DIVERGENCES)
KW = {"fkl": {}, "rkl": {}, "jsd": {"beta": 0.3}, "sfkl": {"alpha": 0.1}, "srkl": {"alpha": 0.2}}


def _data(b=3, t=50, v=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(b, t, v, generator=g)).requires_grad_(True)
    te = scale * torch.randn(b, t, v, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return s, te, mask


def _ref(name, s, te, mask, temperature=1.0, **kw):
    """Naive float64 reference written from the definitions (probabilities, not logs)."""
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(te.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "fkl":
        per = kl(p, q)
    elif name == "rkl":
        per = kl(q, p)
    elif name == "jsd":
        beta = kw["beta"]
        m = beta * p + (1 - beta) * q
        per = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif name == "sfkl":
        a = kw["alpha"]
        per = kl(p, a * p + (1 - a) * q)
    else:
        a = kw["alpha"]
        per = kl(q, a * q + (1 - a) * p)
    m = mask.bool()
    return per[m].sum() / m.sum()


@pytest.mark.parametrize("name", NAMES)
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    s, _, mask = _data()
    out = L.divergence(name, **KW[name])(s, s.detach().clone(), mask)
    assert abs(out.item()) < 1e-5
    # and it is clearly nonzero for different distributions
    s2, te, _ = _data(seed=1)
    assert L.divergence(name, **KW[name])(s2, te, mask).item() > 1e-2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_value_and_grad_match_float64_reference(name, temperature):
    s, te, mask = _data()
    out = L.DIVERGENCES[name](s, te, mask, temperature=temperature, **KW[name])
    (g,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_(True)
    ref = _ref(name, s64, te, mask, temperature, **KW[name])
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_forward_kl_matches_torch_distributions():
    s, te, mask = _data(b=2, t=5, v=7)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=te.double()), torch.distributions.Categorical(logits=s.double())
    )[mask].mean()
    assert L.forward_kl(s, te, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    rev = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=s.double()), torch.distributions.Categorical(logits=te.double())
    )[mask].mean()
    assert L.reverse_kl(s, te, mask).item() == pytest.approx(rev.item(), rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_values_and_grads(name):
    s, te, mask = _data()
    fn = L.divergence(name, **KW[name])
    full = fn(s, te, mask)
    (g_full,) = torch.autograd.grad(full, s)
    for chunk in (1, 7, 64, 10_000):
        out = L.chunked(fn, chunk)(s, te, mask)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == pytest.approx(full.item(), rel=1e-5)
        torch.testing.assert_close(g, g_full, rtol=1e-5, atol=1e-8)
    # keyword arguments pass through the wrapper
    out = L.chunked(L.jsd, 16)(s, te, mask, beta=0.3)
    assert out.item() == pytest.approx(L.jsd(s, te, mask, beta=0.3).item(), rel=1e-5)


@pytest.mark.parametrize("name", NAMES + ["ce"])
def test_masked_tokens_do_not_contribute(name):
    s, te, mask = _data()
    labels = torch.randint(0, 50, mask.shape)
    s2 = s.detach().clone()
    te2 = te.clone()
    # garbage (even inf/nan) where the mask is False
    s2[~mask] = float("nan")
    te2[~mask] = float("inf")
    labels2 = labels.masked_fill(~mask, -100)
    s2.requires_grad_(True)
    if name == "ce":
        a, b = L.cross_entropy(s, labels, mask), L.cross_entropy(s2, labels2, mask)
    else:
        fn = L.divergence(name, **KW[name])
        a, b = fn(s, te, mask), fn(s2, te2, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    (g,) = torch.autograd.grad(b, s2)
    assert torch.isfinite(g).all()
    assert (g[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES + ["ce"])
def test_all_masked_gives_zero_with_finite_grad(name):
    s, te, _ = _data(b=2, t=4, v=9)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    if name == "ce":
        out = L.cross_entropy(s, torch.zeros(2, 4, dtype=torch.long), mask)
    else:
        out = L.chunked(L.divergence(name, **KW[name]), 3)(s, te, mask)
        assert L.DIVERGENCES[name](s, te, mask).item() == 0.0
    assert out.item() == 0.0
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and (s.grad == 0).all()


def test_jsd_reduces_to_the_kls_at_its_ends():
    s, te, mask = _data()
    fkl, rkl = L.forward_kl(s, te, mask), L.reverse_kl(s, te, mask)
    assert L.jsd(s, te, mask, beta=0.0).item() == pytest.approx(fkl.item(), rel=1e-6)
    assert L.jsd(s, te, mask, beta=1.0).item() == pytest.approx(rkl.item(), rel=1e-6)
    # the ends are continuous once scaled: JSD(β)/β -> KL(p‖q), JSD(β)/(1-β) -> KL(q‖p)
    # (on moderate logits, where the first-order term dominates already at β = 1e-3)
    s1, te1, _ = _data(scale=1.0)
    f1, r1, eps = L.forward_kl(s1, te1, mask).item(), L.reverse_kl(s1, te1, mask).item(), 1e-3
    assert L.jsd(s1, te1, mask, beta=eps).item() / eps == pytest.approx(f1, rel=1e-2)
    assert L.jsd(s1, te1, mask, beta=1 - eps).item() / eps == pytest.approx(r1, rel=1e-2)
    # and it is bounded by ln 2 at β = 1/2 (the classic JSD), unlike the KLs here
    half = L.jsd(s, te, mask, beta=0.5).item()
    assert 0 < half < math.log(2) < fkl.item()


def test_skew_kl_with_alpha_zero_is_plain_kl_and_skew_lowers_it():
    s, te, mask = _data()
    fkl, rkl = L.forward_kl(s, te, mask), L.reverse_kl(s, te, mask)
    assert L.skew_forward_kl(s, te, mask, alpha=0.0).item() == pytest.approx(fkl.item(), rel=1e-6)
    assert L.skew_reverse_kl(s, te, mask, alpha=0.0).item() == pytest.approx(rkl.item(), rel=1e-6)
    assert L.skew_forward_kl(s, te, mask, alpha=0.5).item() < fkl.item()
    assert L.skew_reverse_kl(s, te, mask, alpha=0.5).item() < rkl.item()


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_logits(name):
    s, te, mask = _data()
    fn = L.DIVERGENCES[name]
    a = fn(s, te, mask, temperature=2.5, **KW[name])
    b = fn(s / 2.5, te / 2.5, mask, **KW[name])
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # higher temperature flattens both distributions, so they grow closer
    assert fn(s, te, mask, temperature=50.0, **KW[name]).item() < 0.05 * fn(s, te, mask, **KW[name]).item()


def test_padded_vocab_with_neg_inf_logits_is_finite():
    s, te, mask = _data(b=2, t=6, v=12)
    s2, te2 = s.detach().clone(), te.clone()
    s2[..., 10:] = float("-inf")
    te2[..., 10:] = float("-inf")
    s2.requires_grad_(True)
    for name in NAMES:
        out = L.divergence(name, **KW[name])(s2, te2, mask)
        ref = L.divergence(name, **KW[name])(s2[..., :10], te2[..., :10], mask)
        assert torch.isfinite(out) and out.item() == pytest.approx(ref.item(), rel=1e-6)
        (g,) = torch.autograd.grad(out, s2)
        assert torch.isfinite(g).all()


def test_cross_entropy_matches_torch():
    s, _, mask = _data()
    labels = torch.randint(0, 50, mask.shape)
    ref = torch.nn.functional.cross_entropy(s[mask].double(), labels[mask])
    assert L.cross_entropy(s, labels, mask).item() == pytest.approx(ref.item(), rel=1e-6)


def test_token_logprobs_match_log_softmax_gather_and_zero_where_masked():
    s, _, mask = _data()
    tokens = torch.randint(0, 50, mask.shape)
    out = L.token_logprobs(s, tokens, mask)
    ref = torch.log_softmax(s.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert out.shape == mask.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[mask].double(), ref[mask], rtol=1e-5, atol=1e-6)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(L.token_logprobs(s, tokens).double(), ref, rtol=1e-5, atol=1e-6)
    # garbage at masked positions changes nothing, gradients included
    s2 = s.detach().clone()
    s2[~mask] = float("nan")
    s2.requires_grad_(True)
    out2 = L.token_logprobs(s2, tokens.masked_fill(~mask, -100), mask)
    torch.testing.assert_close(out2, out)
    (g,) = torch.autograd.grad(out2.sum(), s2)
    (g_ref,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref)


def test_bad_arguments_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="fkl, rkl, jsd, sfkl, srkl"):
        L.divergence("kl")
    with pytest.raises(ValueError, match="beta"):
        L.divergence("jsd", beta=1.5)
    with pytest.raises(ValueError, match="gamma"):
        L.divergence("fkl", gamma=1.0)
    with pytest.raises(ValueError, match="temperature"):
        L.forward_kl(*_data()[:3], temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked(L.forward_kl, 0)
    s, te, mask = _data()
    with pytest.raises(ValueError, match="shared vocabulary"):
        L.forward_kl(s, te[..., :40], mask)


# ---------------------------------------------------------------------------------------------
# kd_loss_from_hidden

def _hidden_setup(vs=60, vt=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t, hs, ht = 3, 11, 8, 12
    sh = torch.randn(b, t, hs, generator=g).requires_grad_(True)
    th = torch.randn(b, t, ht, generator=g)
    s_head = nn.Linear(hs, vs, bias=True)
    t_head = nn.Linear(ht, vt, bias=False)
    with torch.no_grad():
        for p in list(s_head.parameters()) + list(t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    t_head.requires_grad_(False)
    mask = torch.rand(b, t, generator=g) > 0.25
    return sh, s_head, th, t_head, mask


@pytest.mark.parametrize("name", NAMES)
def test_kd_loss_from_hidden_equals_full_logits_loss(name):
    sh, s_head, th, t_head, mask = _hidden_setup()
    full = L.DIVERGENCES[name](s_head(sh), t_head(th), mask, temperature=1.5, **KW[name])
    g_full = torch.autograd.grad(full, [sh, s_head.weight, s_head.bias])
    for chunk in (1, 5, 1000):
        out = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, divergence=name, chunk_size=chunk,
                                    temperature=1.5, **KW[name])
        g = torch.autograd.grad(out, [sh, s_head.weight, s_head.bias])
        assert out.item() == pytest.approx(full.item(), rel=1e-5)
        for a, b in zip(g, g_full):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kd_loss_from_hidden_takes_weight_tensors_and_generic_modules():
    sh, s_head, th, t_head, mask = _hidden_setup()
    full = L.forward_kl(s_head(sh), t_head(th), mask)
    seq_head = nn.Sequential(s_head)  # not a plain Linear: called as a module
    a = L.kd_loss_from_hidden(sh, seq_head, th, t_head.weight, mask, chunk_size=4)
    assert a.item() == pytest.approx(full.item(), rel=1e-5)
    g_a = torch.autograd.grad(a, s_head.weight)[0]
    g_f = torch.autograd.grad(L.forward_kl(s_head(sh), t_head(th), mask), s_head.weight)[0]
    torch.testing.assert_close(g_a, g_f, rtol=1e-4, atol=1e-6)
    # a bare weight (e.g. a tied embedding) as the student head: no bias
    b = L.kd_loss_from_hidden(sh, s_head.weight, th, t_head.weight, mask, divergence="rkl", chunk_size=4)
    ref = L.reverse_kl(sh @ s_head.weight.t(), t_head(th), mask)
    assert b.item() == pytest.approx(ref.item(), rel=1e-5)
    for x, y in zip(torch.autograd.grad(b, [s_head.weight, sh]), torch.autograd.grad(ref, [s_head.weight, sh])):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["jsd", "sfkl", "srkl"])
def test_kd_loss_from_hidden_uses_the_public_defaults(name):
    sh, s_head, th, t_head, mask = _hidden_setup()
    out = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, divergence=name, chunk_size=7)
    assert out.item() == pytest.approx(L.DIVERGENCES[name](s_head(sh), t_head(th), mask).item(), rel=1e-5)


def test_kd_loss_from_hidden_gives_a_trainable_teacher_its_gradients_too():
    sh, s_head, th, t_head, mask = _hidden_setup()
    t_head.requires_grad_(True)
    out = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, divergence="jsd", beta=0.4, chunk_size=6)
    ref = L.jsd(s_head(sh), t_head(th), mask, beta=0.4)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(out, [t_head.weight, sh]), torch.autograd.grad(ref, [t_head.weight, sh])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kd_loss_from_hidden_slices_to_the_shared_vocab():
    sh, s_head, th, t_head, mask = _hidden_setup(vs=64, vt=72)
    with pytest.raises(ValueError, match="vocab="):
        L.kd_loss_from_hidden(sh, s_head, th, t_head, mask)
    out = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, divergence="rkl", vocab=60, chunk_size=8)
    ref = L.reverse_kl(s_head(sh)[..., :60], t_head(th)[..., :60], mask)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,) = torch.autograd.grad(out, s_head.weight)
    assert (g[60:] == 0).all() and g[:60].abs().sum() > 0


def test_kd_loss_from_hidden_all_masked_and_no_grad():
    sh, s_head, th, t_head, mask = _hidden_setup()
    out = L.kd_loss_from_hidden(sh, s_head, th, t_head, torch.zeros_like(mask))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(sh.grad).all() and (sh.grad == 0).all()
    with torch.no_grad():
        v = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, chunk_size=4)
    assert v.item() == pytest.approx(L.forward_kl(s_head(sh), t_head(th), mask).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["fkl", "srkl"])
def test_kd_loss_from_hidden_under_bf16_autocast_stays_close_to_float32(name):
    sh, s_head, th, t_head, mask = _hidden_setup()
    ref = L.DIVERGENCES[name](s_head(sh), t_head(th), mask, **KW[name])
    g_ref = torch.autograd.grad(ref, [sh, s_head.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, divergence=name, chunk_size=8, **KW[name])
    g = torch.autograd.grad(out, [sh, s_head.weight])
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=0.05)
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32
        assert (a - b).norm() < 0.05 * b.norm()


def test_kd_loss_from_hidden_with_a_bf16_teacher_beside_a_float32_student():
    sh, s_head, th, t_head, mask = _hidden_setup()
    t_head16 = t_head.to(torch.bfloat16)
    out = L.kd_loss_from_hidden(sh, s_head, th.to(torch.bfloat16), t_head16, mask, chunk_size=8)
    ref = L.forward_kl(s_head(sh), t_head16(th.to(torch.bfloat16)), mask)
    assert out.item() == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(torch.autograd.grad(out, sh)[0], torch.autograd.grad(ref, sh)[0], rtol=1e-3, atol=1e-5)


def test_chunk_rows_follow_the_byte_budget():
    # rows = budget // (4 bytes · V · live float32 [rows, V] buffers)
    assert L.rows_for_budget(128 * 2**20, 50257, 6) == 134217728 // (4 * 50257 * 6) == 111
    assert L.rows_for_budget(1000, 50257, 6) == 1                       # never below one row
    sh, s_head, th, t_head, mask = _hidden_setup(vs=40, vt=40)
    budget = 4 * 40 * L.LIVE_FUSED * 3                                    # three rows on the fused path
    assert L.kd_chunk_rows(s_head, t_head, None, "rkl", budget) == 3
    assert L.kd_chunk_rows(s_head, t_head, None, "jsd", budget) == budget // (4 * 40 * L.LIVE_AUTOGRAD)
    assert L.kd_chunk_rows(s_head, t_head, 30, "fkl", budget) == budget // (4 * 30 * L.LIVE_FUSED)
    assert L.kd_chunk_rows(s_head, t_head, None, "fkl") == L.DEFAULT_CHUNK_BYTES // (4 * 40 * L.LIVE_FUSED)
    with pytest.raises(ValueError, match="chunk byte budget must be a positive int, got 0"):
        L.rows_for_budget(0, 10, 1)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int or None, got -5"):
        L.kd_loss_from_hidden(sh, s_head, th, t_head, mask, chunk_bytes=-5)


@pytest.mark.parametrize("name", ["rkl", "jsd"])
def test_kd_loss_chunked_by_bytes_equals_unchunked_to_1e6(name):
    sh, s_head, th, t_head, mask = _hidden_setup(vs=40, vt=40)
    sh64, th64 = sh.detach().double().requires_grad_(True), th.double()
    s_head, t_head = s_head.double(), t_head.double()
    full = L.DIVERGENCES[name](s_head(sh64), t_head(th64), mask, **KW[name])
    g_full = torch.autograd.grad(full, [sh64, s_head.weight])
    out = L.kd_loss_from_hidden(sh64, s_head, th64, t_head, mask, divergence=name, chunk_bytes=4 * 40 * 10 * 2,
                                **KW[name])                               # 1 or 2 rows a chunk
    g = torch.autograd.grad(out, [sh64, s_head.weight])
    assert abs(out.item() - full.item()) < 1e-6
    for a, b in zip(g, g_full):
        assert float((a - b).abs().max()) < 1e-6


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return total


def test_chunked_keeps_no_chunk_graph_after_forward():
    s, te, mask = _data(b=2, t=64, v=500)
    n = int(mask.sum())
    full = _saved_bytes(lambda: L.reverse_kl(s, te, mask))
    s.grad = None
    chunk = _saved_bytes(lambda: L.chunked(L.reverse_kl, 8)(s, te, mask))
    # unchunked autograd keeps several float32 [N, V] buffers; chunked keeps none of them (each
    # chunk's graph is rebuilt in backward), at most its inputs' row copies [N, V] and indices
    assert full >= 3 * n * 500 * 4
    assert chunk <= 2 * n * 500 * 4 + 4096
