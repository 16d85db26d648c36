"""Weightings: each maps the Gramian of the objective gradients (and, for some, the losses) to
non-negative weights w, from which the update is d = Σ w_i g_i.

A weighting is a small object: ``weights = weighting(gram, losses, generator=None)`` with
``gram`` (K, K) fp32 and ``losses`` (K,) detached. Stateful ones keep their state in
``state_dict()`` / ``load_state_dict()`` (saved in training checkpoints); one with learnable
parameters exposes ``parameters()`` and sets their ``.grad`` itself. The Gramian is computed
elsewhere (``core.combine``) and the weights are applied elsewhere too: the TorchJD split.

| name | method | paper |
|---|---|---|
| mpd | α-fair Minimum Potential Delay, exact | FairHuman (Wang et al., 2025); Mo & Walrand 2000 |
| mpd-closed-form | w = K^(-α/(α+1)) 1 (exact only for diagonal K) | FairHuman paper's approximation |
| ls | fixed weights (linear scalarization) | — |
| dwa | dynamic weight average | Liu et al., CVPR 2019 |
| uw | uncertainty weighting (learned log-variances) | Kendall et al., CVPR 2018 |
| rlw | random loss weighting | Lin et al., TMLR 2022 |
| si | scale-invariant: w_i = 1 / L_i | Navon et al., ICML 2022 (baseline) |
| nash-mtl | Nash bargaining: the α = 1 case of the same equation | Navon et al., ICML 2022 |
"""
from __future__ import annotations

from .baselines import DWA, RLW, SI, UW, LinearScalarization
from .mpd import MPD, MPDClosedForm, mpd_closed_form, mpd_weights

WEIGHTINGS = {
    "mpd": MPD,
    "mpd-closed-form": MPDClosedForm,
    "ls": LinearScalarization,
    "dwa": DWA,
    "uw": UW,
    "rlw": RLW,
    "si": SI,
    "nash-mtl": lambda **kw: MPD(alpha=1.0, **kw),
}


def get_weighting(name: str, **options):
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](**options)


__all__ = ["WEIGHTINGS", "get_weighting", "mpd_weights", "mpd_closed_form", "MPD", "MPDClosedForm"]
