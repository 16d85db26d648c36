"""MPD and the other weightings: each method's own analytical cases (the fairness condition,
special cases, the per-objective scale law). The properties every weighting shares are checked
once for all in tests/test_weighting_properties.py."""
import math

import pytest
import torch

from core.weighting import get_weighting, mpd_closed_form, mpd_weights


def _residual(gram, w, alpha=2.0):
    k, w = gram.double(), w.double()
    target = w ** (-1.0 / alpha)
    return float((k @ w - target).norm() / target.norm())


def _random_gram(seed, k=3, n=500):
    g = torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g @ g.T


def _ill_conditioned(cond=1e8, seed=0):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor([1.0, cond ** -0.5, 1.0 / cond], dtype=torch.float64)) @ q.T


def _rank_deficient(seed=0):
    g = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = torch.cat([g, (0.5 * g[0] + 2 * g[1])[None]])  # g3 in the span of g1, g2
    return g @ g.T


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("case", ["random", "ill", "rank"])
def test_mpd_solves_the_fairness_condition(case, alpha):
    grams = {"random": [_random_gram(s) for s in range(5)], "ill": [_ill_conditioned(1e8, s) for s in range(5)],
             "rank": [_rank_deficient(s) for s in range(5)]}[case]
    for gram in grams:
        w = mpd_weights(gram, alpha=alpha)
        assert (w > 0).all() and torch.isfinite(w).all()
        assert _residual(gram, w, alpha) < 1e-6


def test_condition_number_really_is_1e8():
    vals = torch.linalg.eigvalsh(_ill_conditioned())
    assert vals.max() / vals.min() == pytest.approx(1e8, rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_rank_deficient_grams_really_are_rank_two(seed):
    assert torch.linalg.matrix_rank(_rank_deficient(seed)) == 2


def test_diagonal_gram_equals_the_closed_form():
    gram = torch.diag(torch.tensor([1.0, 4.0, 0.01], dtype=torch.float64))
    exact = mpd_weights(gram)
    assert torch.allclose(exact, mpd_closed_form(gram), rtol=1e-9)
    assert torch.allclose(exact, torch.diagonal(gram) ** (-2.0 / 3.0), rtol=1e-9)


def test_closed_form_is_not_exact_for_correlated_gradients():
    gram = _random_gram(3, n=4)
    assert _residual(gram, mpd_closed_form(gram)) > 1e-3
    assert _residual(gram, mpd_weights(gram)) < 1e-6


def test_mpd_weights_stay_on_the_device_and_dtype():
    gram = _random_gram(1).float()
    w = mpd_weights(gram)
    assert w.dtype == torch.float32 and w.device == gram.device


def test_scaling_every_gradient_by_c_scales_d_by_c_to_minus_one_third():
    g = torch.randn(3, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c = 7.0
    d = mpd_weights(g @ g.T) @ g
    d_scaled = mpd_weights((c * g) @ (c * g).T) @ (c * g)
    assert torch.allclose(d_scaled, c ** (-1.0 / 3.0) * d, rtol=1e-8)


def test_scaling_one_orthogonal_loss_shrinks_its_share_by_c_to_minus_one_third():
    # Orthogonal gradients: the exact law of the README (w_j -> c^(-4/3) w_j, others unchanged).
    g = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    c = 8.0
    w = mpd_weights(g @ g.T)
    g2 = g.clone()
    g2[2] *= c
    w2 = mpd_weights(g2 @ g2.T)
    assert torch.allclose(w2[:2], w[:2], rtol=1e-9)
    assert float(w2[2]) == pytest.approx(c ** (-4.0 / 3.0) * float(w[2]), rel=1e-9)
    contribution, contribution2 = w[2] * g[2], w2[2] * g2[2]
    assert torch.allclose(contribution2, c ** (-1.0 / 3.0) * contribution, rtol=1e-9)


def test_scaling_one_correlated_loss_moves_every_weight():
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    w = mpd_weights(g @ g.T)
    g2 = g.clone()
    g2[2] *= 8.0
    w2 = mpd_weights(g2 @ g2.T)
    assert not torch.allclose(w2[:2], w[:2], rtol=1e-3)


def test_baselines_analytic_cases():
    gram = _random_gram(0).float()
    losses = torch.tensor([2.0, 4.0, 0.5])
    assert torch.equal(get_weighting("ls")(gram, losses), torch.ones(3))
    assert torch.equal(get_weighting("ls", weights=[1, 2, 3])(gram, losses), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(get_weighting("si")(gram, losses), 1 / losses)
    rlw = get_weighting("rlw")(gram, losses, generator=torch.Generator().manual_seed(0))
    assert rlw.sum() == pytest.approx(1.0)
    nash = get_weighting("nash-mtl")(gram, losses)
    assert _residual(gram, nash, alpha=1.0) < 1e-5  # (K w) = 1/w, Nash bargaining
    dwa = get_weighting("dwa")  # T = 2
    assert torch.equal(dwa(gram, losses), torch.ones(3))  # first two steps: equal weights
    assert torch.equal(dwa(gram, losses * torch.tensor([1.0, 1.0, 4.0])), torch.ones(3))
    w = dwa(gram, losses)  # ratios of the last two steps: (1, 1, 4), softmax of (0.5, 0.5, 2)
    e = [math.exp(0.5), math.exp(0.5), math.exp(2.0)]
    assert w.tolist() == pytest.approx([3 * x / sum(e) for x in e], rel=1e-6)
    uw = get_weighting("uw")
    assert torch.allclose(uw(gram, losses), torch.ones(3))
    assert torch.allclose(uw.log_vars.grad, 1 - losses)


def test_unknown_weighting_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown weighting"):
        get_weighting("fair-ish")


def test_dwa_keeps_each_objectives_history_when_one_is_absent():
    # step 3 has no hand (objective 1): its history stays, and objective 2's ratio is its own
    gram = _random_gram(0).float()
    dwa = get_weighting("dwa")
    dwa(gram, torch.tensor([1.0, 1.0, 1.0]))
    dwa(gram, torch.tensor([2.0, 3.0, 4.0]))
    w = dwa(gram[[0, 2]][:, [0, 2]], torch.tensor([5.0, 6.0]), active=[0, 2])
    e = [math.exp(2.0 / 2), math.exp(4.0 / 2)]  # ratios 2/1 and 4/1
    assert w.tolist() == pytest.approx([2 * x / sum(e) for x in e], rel=1e-6)
    w = dwa(gram, torch.tensor([5.0, 3.0, 6.0]))  # ratios 5/2, 3/3 (kept), 6/4
    e = [math.exp(2.5 / 2), math.exp(1.0 / 2), math.exp(1.5 / 2)]
    assert w.tolist() == pytest.approx([3 * x / sum(e) for x in e], rel=1e-6)


def test_uw_learns_only_the_log_variances_of_present_objectives():
    uw = get_weighting("uw")
    gram = _random_gram(0).float()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, 1.0, 2.0]))
    w = uw(gram[[0, 2]][:, [0, 2]], torch.tensor([2.0, 3.0]), active=[0, 2])
    assert w.tolist() == pytest.approx([1.0, math.exp(-2.0)], rel=1e-6)
    assert uw.log_vars.grad.tolist() == pytest.approx([1 - 2.0, 0.0, 1 - 3.0 * math.exp(-2.0)], rel=1e-6)
