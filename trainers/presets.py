"""``--preset paper``: every setting the two papers state, in the one table that ``train`` and
``build-pairs`` read and the README's table of defaults is rendered from (``preset_table.py``;
tests/test_presets.py checks the README against it and against the resolved configuration).
It imports nothing of the pack, so ``config`` and ``build_pairs`` may both import it.

Precedence: a flag > the config file > the preset > the method's default > the field default,
so ``--preset paper --resolution 512`` is the paper's recipe at 512 px. The preset's name is
saved in the run's ``config.json`` and the LoRA's metadata.
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER = "paper"


@dataclass(frozen=True)
class Setting:
    option: str  # a TrainConfig field (train) or a build-pairs option (its dest)
    paper: object  # the value --preset paper sets
    source: str  # where the paper value and the default come from, and why they differ
    default_text: str | None = None  # the default when it is not one value (beta: by architecture)


_FAIRHUMAN = (
    Setting("rank", 256, "paper (SDXL LoRA); release script `--rank 256`"),
    Setting("lr", 1e-5, "paper; release script `LR=1e-5`"),
    Setting("resolution", 1024, "paper; release script `RESOLUTION=1024`"),
    Setting("batch_size", 1, "paper; release script `BATCH_SIZE=1`"),
    Setting("grad_accum", 1, "release script `ACCUMULATION=1`"),
    Setting("weighting", "mpd", "paper: MPD fairness, α = 2 (the exact solve; the paper's K^(-2/3) 1 is "
                                "`mpd-closed-form`)"),
    Setting("normalization", "reference", "paper Eq. 2 and release: the masked squared error averaged over "
                                          "all latent elements"),
    Setting("local_scale", 1.0, "paper Eq. 2 (scale 1); the default 5 is the release's `scale=5.0` inside "
                                "the square, 25 × Eq. 2, which gives the masked losses a smaller MPD share"),
    Setting("mixed_precision", "fp16", "paper and release `--mixed_precision fp16`; the default `no` runs "
                                       "anywhere, the CPU included"),
)

PRESETS = {PAPER: {
    "fairhuman": _FAIRHUMAN,
    "fairhuman-controlnet": (
        Setting("lr", 1e-5, "paper (ControlNet); release script `LR=1e-5`"),
        Setting("condition_dropout", 0.3, "paper (ControlNet): the condition image dropped for 30% of samples"),
        Setting("resolution", 1024, "release script `RESOLUTION=1024`"),
        *(s for s in _FAIRHUMAN if s.option in ("weighting", "normalization", "local_scale", "mixed_precision")),
    ),
    "hg-dpo": (
        Setting("rank", 8, "paper: LoRA rank 8 on the attention linears"),
        Setting("lr", 1e-5, "paper"),
        Setting("beta", 2500.0, "paper (SD1.5); the default for SDXL (5000) is this pack's, untested by the paper",
                default_text="2500 (SD1.5), 5000 (SDXL)"),
        Setting("lambda_stat", 10000.0, "paper, the weight of Eq. 8"),
        Setting("stat_reduction", "squared-norm", "paper Eq. 8 read literally: ‖μ − μ_ref‖² over the 4 latent "
                                                  "channels; the default `channel-mean` (÷ 4) is this pack's "
                                                  "first reduction, kept so earlier runs resume unchanged"),
        Setting("resolution", 1024, "a cap, not a size: each pair trains at its own size (the paper: at the "
                                    "generation size, 704 × 1024 for its SD1.5 model); a pair above about "
                                    "resolution² pixels goes to the nearest aspect bucket of that area"),
        Setting("batch_size", 1, "micro-batch of one pair: the paper's batch of 16 comes from `grad_accum`"),
        Setting("grad_accum", 16, "paper: batch 16, here 16 accumulated pairs (the loop sums the "
                                  "micro-batches' gradients exactly)"),
        Setting("optimizer", "auto", "paper: 8-bit Adam; `auto` takes 8-bit AdamW where bitsandbytes works, "
                                     "else AdamW"),
    ),
    "build-pairs": (
        Setting("scorer", "pickscore", "paper Eqs. 4-6 (PickScore); the default `anatomy` needs no model files"),
        Setting("n", 20, "paper: N = 20 images per prompt"),
        Setting("sampler", "dpmsolver++", "paper App. D.4: DPM-Solver++; the default keeps the base model's "
                                          "own scheduler"),
        Setting("steps", 50, "paper App. D.4: 50 steps"),
        Setting("cfg", 5.0, "paper App. D.4: CFG 5; the default 7.5 is the common SD default"),
    ),
}}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_values(preset: str, command: str) -> dict:
    """{option: value} that ``preset`` sets for ``command`` (a method name or ``build-pairs``);
    {} for no preset. An unknown preset, or one without settings for the command, is named by
    ``preset_problem``."""
    return {s.option: s.paper for s in PRESETS.get(preset, {}).get(command, ())}


def preset_problem(preset: str, command: str) -> str | None:
    """Why ``--preset preset`` cannot apply to ``command``, or None."""
    if not preset:
        return None
    if preset not in PRESETS:
        return f"--preset {preset!r} is unknown; expected one of {', '.join(PRESETS)}"
    if command not in PRESETS[preset]:
        return (f"--preset {preset} has no settings for {command} (it has {', '.join(PRESETS[preset])}); "
                "drop --preset and give the options")
    return None
