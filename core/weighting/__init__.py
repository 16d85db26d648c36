"""Weightings: each maps the Gramian of the objective gradients (and, for some, the losses) to
non-negative weights w, from which the update is d = Σ w_i g_i.

Every weighting is a ``base.Weighting``: ``weights = weighting(gram, losses, generator=None,
active=None)``, with ``state_dict()`` / ``load_state_dict()`` / ``parameters()`` and the laws it
obeys as class attributes; ``base`` states the contract, and one property suite checks it on
every entry of ``WEIGHTINGS``. The Gramian is computed elsewhere (``core.combine``) and the
weights are applied elsewhere too: the TorchJD split.

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

from .base import Weighting
from .baselines import DWA, RLW, SI, UW, LinearScalarization
from .mpd import MPD, MPDClosedForm, NashMTL, mpd_closed_form, mpd_weights

WEIGHTINGS = {
    "mpd": MPD,
    "mpd-closed-form": MPDClosedForm,
    "ls": LinearScalarization,
    "dwa": DWA,
    "uw": UW,
    "rlw": RLW,
    "si": SI,
    "nash-mtl": NashMTL,
}


def get_weighting(name: str, objectives: int = 3, **options) -> Weighting:
    """The weighting ``name`` for ``objectives`` objectives, with its own ``options``."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of {sorted(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](objectives=objectives, **options)
    except TypeError as error:  # an option this weighting does not take
        raise ValueError(f"weighting {name!r} does not take the options {sorted(options)}: {error}") from None


__all__ = [
    "MPD",
    "WEIGHTINGS",
    "MPDClosedForm",
    "NashMTL",
    "Weighting",
    "get_weighting",
    "mpd_closed_form",
    "mpd_weights",
]
