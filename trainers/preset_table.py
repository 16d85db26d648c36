"""The README's table of ``--preset`` settings: each option's default, its preset value and where
both come from, rendered from ``presets.PRESETS`` and the commands' own defaults (a separate
module: it reads ``config``, ``build_pairs`` and the methods, which all read ``presets``)."""
from __future__ import annotations

from core.job_spec import flag

from .build_pairs import DEFAULTS as BUILD_PAIRS_DEFAULTS
from .config import TrainConfig
from .methods import method_module
from .presets import PAPER, PRESETS


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def defaults_of(command: str) -> dict:
    """The value each option of ``command`` takes without a preset (and without flags)."""
    if command == "build-pairs":
        return dict(BUILD_PAIRS_DEFAULTS)
    return {**TrainConfig().to_dict(), **method_module(command).METHOD.defaults}


def markdown_table(preset: str = PAPER) -> str:
    """The README's table: each setting of ``preset``, its default, and where both come from."""
    lines = [f"| command | option | default | `--preset {preset}` | where it comes from |", "|---|---|---|---|---|"]
    for command, settings in PRESETS[preset].items():
        defaults = defaults_of(command)
        name = "build-pairs" if command == "build-pairs" else f"train --method {command}"
        for s in settings:
            default = s.default_text or format_value(defaults[s.option])
            lines.append(f"| {name} | `{flag(s.option)}` | {default} | {format_value(s.paper)} | {s.source} |")
    return "\n".join(lines)
