"""One property suite over every registered weighting (TorchJD's shape): shape, dtype and
device, finiteness, non-negativity, non-conflict, permutation equivariance where the method is
symmetric, the scale laws each class states, a subset of active objectives, and the state's
round trip through a real training checkpoint. Each weighting's own analytical cases live in
tests/test_engine_mpd.py."""
import pytest
import torch

from core.weighting import WEIGHTINGS, Weighting, get_weighting
from trainers.run_dir import load_checkpoint, save_checkpoint

K = 3
STEPS = 5


def _grams(seed, k=K, steps=STEPS, n=7):
    """Gramians of gradients that conflict (n small: the gradients are far from orthogonal)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        g = torch.randn(k, n, generator=gen, dtype=torch.float64) * torch.rand(k, 1, generator=gen, dtype=torch.float64)
        out.append((g @ g.T).float())
    return out


def _losses(seed, k=K, steps=STEPS):
    gen = torch.Generator().manual_seed(1000 + seed)
    return [0.05 + torch.rand(k, generator=gen) for _ in range(steps)]


def _run(weighting, grams, losses, seed=0, active=None):
    """The weights of consecutive steps, each with its own generator as the loop gives it."""
    return [weighting(g, l, generator=torch.Generator().manual_seed(seed * 100 + t), active=active)
            for t, (g, l) in enumerate(zip(grams, losses))]


NAMES = sorted(WEIGHTINGS)


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def test_every_weighting_follows_the_contract(name):
    weighting = get_weighting(name)
    assert isinstance(weighting, Weighting)
    assert isinstance(weighting.state_dict(), dict) and isinstance(weighting.parameters(), list)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shape_dtype_device_and_finiteness(name, k):
    weighting = get_weighting(name, objectives=k)
    for w, g in zip(_run(weighting, _grams(0, k), _losses(0, k)), _grams(0, k)):
        assert w.shape == (k,) and w.dtype == g.dtype and w.device == g.device
        assert torch.isfinite(w).all()


def test_non_negative_where_the_method_promises_it(name):
    weighting = get_weighting(name)
    weights = [w for seed in range(4) for w in _run(weighting, _grams(seed), _losses(seed), seed)]
    negative = any((w < 0).any() for w in weights)
    # the closed form's lack of the promise is real: conflicting gradients give negative weights
    assert negative is (not weighting.non_negative)


def test_non_conflicting_where_the_method_promises_it(name):
    weighting = get_weighting(name)
    for seed in range(4):
        for w, g in zip(_run(weighting, _grams(seed), _losses(seed), seed), _grams(seed)):
            if weighting.non_conflicting:
                assert (g.double() @ w.double() > 0).all()  # g_i · d > 0 for every objective


def test_the_grams_conflict_so_non_conflict_means_something():
    # the plain sum (ls) conflicts with some objective on these Gramians; MPD never does
    ls = get_weighting("ls")
    conflicts = [bool((g @ ls(g, l) <= 0).any()) for s in range(4) for g, l in zip(_grams(s), _losses(s))]
    assert any(conflicts)


def test_permutation_equivariance_where_the_method_is_symmetric(name):
    weighting = get_weighting(name)
    if not weighting.symmetric:
        pytest.skip(f"{name} is not symmetric: one draw assigns its values by index")
    perm = torch.tensor([2, 0, 1])
    grams, losses = _grams(3), _losses(3)
    plain = _run(get_weighting(name), grams, losses)
    permuted = _run(get_weighting(name), [g[perm][:, perm] for g in grams], [l[perm] for l in losses])
    for w, wp in zip(plain, permuted):
        assert torch.allclose(wp, w[perm], rtol=1e-5, atol=1e-7)


def test_a_non_symmetric_weighting_really_is_not():
    perm = torch.tensor([2, 0, 1])
    grams, losses = _grams(3), _losses(3)
    plain = _run(get_weighting("rlw"), grams, losses)
    permuted = _run(get_weighting("rlw"), [g[perm][:, perm] for g in grams], [l[perm] for l in losses])
    assert not all(torch.allclose(wp, w[perm]) for w, wp in zip(plain, permuted))
    assert get_weighting("ls", weights=[1, 2, 3]).symmetric is False


@pytest.mark.parametrize("s", [0.01, 9.0])
def test_gram_scale_law(name, s):
    # w(s K) = s^gram_power w(K): -α/(α+1) for MPD and its closed form, 0 for the others
    weighting = get_weighting(name)
    grams, losses = _grams(5), _losses(5)
    plain = _run(get_weighting(name), grams, losses)
    scaled = _run(get_weighting(name), [s * g for g in grams], losses)
    for w, ws in zip(plain, scaled):
        assert torch.allclose(ws, s ** weighting.gram_power * w, rtol=1e-4, atol=1e-7)


def test_the_documented_gram_powers():
    assert get_weighting("mpd").gram_power == pytest.approx(-2 / 3)
    assert get_weighting("mpd", alpha=3.0).gram_power == pytest.approx(-3 / 4)
    assert get_weighting("nash-mtl").gram_power == pytest.approx(-1 / 2)
    assert get_weighting("mpd-closed-form").gram_power == pytest.approx(-2 / 3)


@pytest.mark.parametrize("c", [0.1, 30.0])
def test_loss_scale_law(name, c):
    # w(K, c L) = c^loss_power w(K, L): -1 for si (w = 1 / L), 0 for the others
    weighting = get_weighting(name)
    grams, losses = _grams(6), _losses(6)
    plain = _run(get_weighting(name), grams, losses)
    scaled = _run(get_weighting(name), grams, [c * l for l in losses])
    for w, ws in zip(plain, scaled):
        assert torch.allclose(ws, c ** weighting.loss_power * w, rtol=1e-5, atol=1e-7)


def test_a_subset_of_active_objectives_keeps_per_objective_state_in_place(name):
    """An image without a hand: the combiner passes the Gramian of objectives 0 and 2 with
    active=[0, 2]. The weights must be those the weighting gives objectives 0 and 2."""
    options = {"weights": [1.0, 2.0, 3.0]} if name == "ls" else {}
    active = torch.tensor([0, 2])
    grams, losses = _grams(7), _losses(7)
    weighting = get_weighting(name, **options)
    sub = [g[active][:, active] for g in grams]
    weights = _run(weighting, sub, [l[active] for l in losses], active=active)
    for w in weights:
        assert w.shape == (2,) and torch.isfinite(w).all()
    if name == "ls":
        assert torch.equal(weights[0], torch.tensor([1.0, 3.0]))
    if name == "uw":
        assert weighting.log_vars.grad[1] == 0 and weighting.log_vars.grad[0] != 0
    if name in ("ls", "dwa", "uw"):  # per-objective state: a wrong or missing active is an error
        with pytest.raises(ValueError, match="active"):
            get_weighting(name, **options)(sub[0], losses[0][active], active=torch.tensor([0, 7]))
        with pytest.raises(ValueError, match="without active="):
            get_weighting(name, **options)(sub[0], losses[0][active])


def test_state_round_trip_through_a_checkpoint(name, tmp_path):
    """Run two steps, save the state in a real training checkpoint, load it into a fresh
    weighting: the remaining steps give the same weights as the weighting that never stopped."""
    grams, losses = _grams(8), _losses(8)
    first = get_weighting(name)
    _run(first, grams[:2], losses[:2])
    with torch.no_grad():
        for p in first.parameters():  # as if the optimizer had stepped them
            p.add_(0.1)
    path = save_checkpoint(tmp_path, 2, {"weighting": first.state_dict()})
    resumed = get_weighting(name)
    resumed.load_state_dict(load_checkpoint(path)["weighting"])

    def rest(weighting):
        return [weighting(g, l, generator=torch.Generator().manual_seed(t))
                for t, (g, l) in enumerate(zip(grams[2:], losses[2:]), start=2)]

    after_resume, uninterrupted = rest(resumed), rest(first)
    for w, r in zip(after_resume, uninterrupted):
        assert torch.equal(w, r)
    if name in ("dwa", "uw"):  # the state matters: a fresh weighting gives other weights
        assert not torch.equal(rest(get_weighting(name))[0], after_resume[0])


def test_a_stateless_weighting_refuses_state_it_does_not_keep():
    with pytest.raises(ValueError, match="keeps no state"):
        get_weighting("mpd").load_state_dict({"history": []})


def test_options_a_weighting_does_not_take_are_a_clear_error():
    with pytest.raises(ValueError, match="does not take the options"):
        get_weighting("mpd", temperature=2.0)
    with pytest.raises(ValueError, match="3 weights for 2 objectives"):
        get_weighting("ls", objectives=2, weights=[1, 2, 3])


def test_every_weighting_through_the_combiner_with_an_absent_objective(name):
    """The combiner hands each weighting the sub-Gramian of the present objectives and names
    them (``active``): a micro-batch without a hand must train, not crash or mix objectives."""
    from core.combine import FairCombiner

    options = {"weights": [1.0, 2.0, 3.0]} if name == "ls" else {}
    p = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    combiner = FairCombiner([p], get_weighting(name, **options), K)
    losses = torch.stack([(p ** 2).sum(), (p ** 3).sum(), (p * torch.arange(6.0)).sum()])
    combiner.add(losses, torch.tensor([True, False, True]))
    step = combiner.step(torch.Generator().manual_seed(0))
    assert step.weights[1] == 0 and torch.isfinite(p.grad).all()
    if name == "ls":  # the fixed weights stay on their objectives
        assert step.weights.tolist() == [1.0, 0.0, 3.0]
