"""The combiner's scale: ``--match-norm`` (the fair update at the plain sum's step size) and the
vanishing-objective guarantee (an objective whose gradient goes to 0 cannot take over the
update), both through the real ``FairCombiner`` on a small least-squares model."""
import argparse

import pytest
import torch

from core.combine import FairCombiner, fair_weights
from core.weighting import WEIGHTINGS, get_weighting, mpd_weights
from core.weighting.base import VANISHING_FLOOR

K = 3


def _problem(seed=0):
    """Two parameter tensors (20 numbers) and three least-squares objectives on them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(8, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()]
    a = torch.randn(K, 6, 20, generator=g, dtype=torch.float64)
    b = torch.randn(K, 6, generator=g, dtype=torch.float64)
    return params, a, b


def _losses(params, a, b, eps=1.0):
    """½‖r_i‖², r_i = A_i x − b_i, except that objective 2's residual is moved to ``eps`` times its
    value at the current x (same Jacobian): its gradient ∝ eps, its loss ∝ eps², as a region's
    loss going to 0 does."""
    x = torch.cat([p.reshape(-1) for p in params])
    residual = torch.einsum("kij,j->ki", a, x) - b
    if eps != 1.0:
        residual = torch.cat([residual[:2], residual[2:] - (1 - eps) * residual[2:].detach()])
    return 0.5 * (residual ** 2).sum(dim=1)


def _combined(name, params, a, b, eps=1.0, match_norm=False):
    """d = Σ w_i g_i as one flat vector, and the step's weights."""
    combiner = FairCombiner(params, get_weighting(name, K), K, match_norm=match_norm)
    combiner.add(_losses(params, a, b, eps))
    step = combiner.step(generator=torch.Generator().manual_seed(7))  # rlw: the same draw each call
    d = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return d, step


def _plain(params, a, b):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(_losses(params, a, b).sum(), params)])


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_match_norm_gives_the_plain_updates_norm_and_keeps_the_direction(name, seed):
    params, a, b = _problem(seed)
    plain = _plain(params, a, b)
    free, _ = _combined(name, params, a, b)
    matched, _ = _combined(name, params, a, b, match_norm=True)
    assert torch.isfinite(matched).all()
    assert float(matched.norm()) == pytest.approx(float(plain.norm()), rel=1e-6)
    assert float(torch.nn.functional.cosine_similarity(matched, free, dim=0)) == pytest.approx(1.0, abs=1e-6)


def test_match_norm_is_off_by_default_and_a_cli_option():
    from trainers.config import TrainConfig, add_config_arguments, resolve

    assert TrainConfig().match_norm is False
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert resolve(parser.parse_args(["--match-norm", "true"])).match_norm is True
    assert resolve(parser.parse_args([])).match_norm is False


def test_match_norm_changes_mpds_step_size():
    # MPD's weights are not normalized: without matching its d is far from the plain norm
    params, a, b = _problem(0)
    free, step = _combined("mpd", params, a, b)
    matched, matched_step = _combined("mpd", params, a, b, match_norm=True)
    ratio = float(matched.norm() / free.norm())
    assert abs(ratio - 1) > 1e-2
    assert torch.allclose(matched_step.weights, step.weights * ratio, rtol=1e-5)


# ---- vanishing objectives -------------------------------------------------------------------

def _diag_gram(small: float) -> torch.Tensor:
    """Orthogonal gradients of squared norms 1, 0.25 and ``small``."""
    return torch.diag(torch.tensor([1.0, 0.25, small], dtype=torch.float64))


def _parts(w, gram):
    """‖w_i g_i‖ for each objective (from the Gramian)."""
    return w.abs() * torch.diagonal(gram).clamp_min(0).sqrt()


@pytest.mark.parametrize("small", [1e-7, 1e-12, 1e-24, 0.0])
def test_a_gramian_diagonal_going_to_zero_keeps_mpd_bounded(small):
    mpd = get_weighting("mpd", K)
    gram = _diag_gram(small)
    w = fair_weights(mpd, gram, torch.ones(K))
    at_floor = fair_weights(mpd, _diag_gram(VANISHING_FLOOR), torch.ones(K))
    assert torch.isfinite(w).all()
    # the vanishing objective's weight is at most the weight at the floor, the others' unchanged
    assert float(w[2]) <= float(at_floor[2]) * (1 + 1e-9)
    assert torch.allclose(w[:2], at_floor[:2], rtol=1e-9)
    # its part of the update goes to zero with its gradient, and never exceeds 10 × the largest's
    parts = _parts(w, gram)
    assert float(parts[2]) <= (small / VANISHING_FLOOR) ** 0.5 * float(_parts(at_floor, _diag_gram(VANISHING_FLOOR))[2]) * (1 + 1e-9)
    assert float(parts[2]) <= 10 * float(parts[0]) * (1 + 1e-9)
    # exact MPD would not be bounded: its part grows as ‖g‖^(-1/3)
    if small > 0:
        exact = mpd_weights(gram)
        assert float(_parts(exact, gram)[2]) > 10 * float(_parts(exact, gram)[0])


def test_above_the_floor_the_weighting_sees_the_true_gramian():
    g = torch.randn(K, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g[2] *= 2e-3  # squared norm ratio ~4e-6: above the 1e-6 floor
    gram = g @ g.T
    assert torch.diagonal(gram).min() > VANISHING_FLOOR * torch.diagonal(gram).max()
    for name in ("mpd", "nash-mtl", "mpd-closed-form"):
        weighting = get_weighting(name, K)
        assert torch.equal(fair_weights(weighting, gram, torch.ones(K)), weighting(gram, torch.ones(K)))


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_an_objective_gradient_driven_to_1e_12_cannot_take_over_the_update(name):
    params, a, b = _problem(2)
    reference, _ = _combined(name, params, a, b, eps=1.0)
    for eps in (1e-3, 1e-6, 1e-9, 1e-12, 1e-14):
        d, step = _combined(name, params, a, b, eps=eps)
        norms = step.grad_norms
        assert torch.isfinite(d).all() and torch.isfinite(step.weights).all()
        if eps == 1e-14:
            assert float(norms[2]) <= 1e-12 < 1e-10 * float(norms.max())  # the gradient really vanished
            vanishing = float(step.weights[2].abs() * norms[2])
            assert vanishing <= 1e-4 * float(d.norm()), (name, step.weights.tolist())
            assert float(d.norm()) <= 10 * float(reference.norm()), (name, step.weights.tolist())
