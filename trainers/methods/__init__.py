"""Training methods: what a step's objectives are and where its data comes from.

The loop (``trainers.loop``) is shared; a method (a ``base.Method`` subclass, its module's
``METHOD``) supplies ``objective_names``, ``combine`` ("fair": per-objective gradients combined
by a weighting; "sum": one backward of the ``sum_weights()``-weighted sum), its ``defaults``,
``check_data(cfg)``, ``batch(step, micro)`` and ``losses(batch, generator) -> StepLosses``; the
model is ``self.model``, given at construction. ``base.py`` documents each.
"""
from __future__ import annotations

import importlib

METHODS = {"fairhuman": "fairhuman", "fairhuman-controlnet": "fairhuman_controlnet", "hg-dpo": "hg_dpo",
           "fair-dpo": "fair_dpo"}


def method_module(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}")
