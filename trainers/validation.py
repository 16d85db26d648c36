"""The best LoRA by face and hand quality: ``--validate-every N``.

Every N steps, and at the last step, the current LoRA renders fixed prompts × seeds (the
sampler's rendering, ``train_job.make_renderer``). The images are scored with the pack's
Face Confi. and Hand Confi. (``core.metrics``, as ``evaluate`` scores) and, when one is named,
a scorer from ``core.scorers`` (``--validation-scorer``: anatomy, or a model scorer whose
weights folder is given). A ``validation`` event records the scores; the LoRA with the best
score so far is exported as ``<name>_best.safetensors`` beside the final one, atomically, its
metadata saying the step, the score and the metric.

The metric (``--validation-metric``), higher is better:

- ``face-hand`` (default): the mean over the images of (face + hand) / 2, where face is the
  image's mean face-detection score and hand its mean handedness probability, each 0 when
  nothing is detected. That is Face Confi. and Hand Confi. with a missed face or hand counted
  as 0: the paper's means are over detected regions only, so a LoRA that stops drawing hands
  would keep its Hand Confi.; here it loses it.
- ``face``, ``hand``: one of the two terms alone.
- ``scorer``: the mean score of ``--validation-scorer``.

A later LoRA replaces the kept one only with a strictly higher score: ties go to the earlier step.

Resume keeps the best so far exactly: the kept file *is* the state (its metadata holds step and
score), so whatever point a run was killed at, the resumed run compares against the best it had
measured. A validation due at the checkpoint a run resumes from, cut short by the kill, is redone
from that checkpoint (``catch_up``) before training continues.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from core.fileio import VALIDATION, EventLog, atomic_path, read_events

from .run_dir import checkpoint_step

METRICS = ("face-hand", "face", "hand", "scorer")
# Prompts of people whose faces and hands show, used when --validation-prompts is not given.
DEFAULT_PROMPTS = (
    "a photo of a person waving at the camera, face and hands visible",
    "a close-up portrait of a woman holding a cup with both hands",
    "a man giving a thumbs up and smiling, upper body",
    "two friends clapping their hands, photo",
)


def prompts_of(cfg) -> list[str]:
    return list(cfg.validation_prompts or DEFAULT_PROMPTS)


def renders_of(cfg) -> list[tuple[str, int]]:
    """The fixed (prompt, seed) pairs of every validation: each prompt with seeds seed, seed+1, ..."""
    return [(prompt, cfg.seed + k) for prompt in prompts_of(cfg) for k in range(cfg.validation_seeds)]


def best_name(output_file: str) -> str:
    """``fairhuman_sdxl.safetensors`` -> ``fairhuman_sdxl_best.safetensors`` (a folder in the name,
    as in ComfyUI's LoRA names, is kept)."""
    path = Path(output_file)
    return str(path.with_name(f"{path.stem}_best{path.suffix}"))


def config_problems(cfg) -> list[str]:
    """What makes the validation options unusable together (checked before anything loads)."""
    if not cfg.validate_every:
        return []
    problems = []
    from .methods import METHODS, method_module

    if cfg.method in METHODS and getattr(method_module(cfg.method).METHOD, "trainable_kind", "lora") != "lora":
        problems.append(f"--validate-every keeps the best LoRA; {cfg.method} trains a ControlNet: set it to 0")
    if cfg.validation_metric == "scorer" and not cfg.validation_scorer:
        problems.append("--validation-metric scorer needs --validation-scorer (anatomy, pickscore, hps, ...)")
    if cfg.validation_scorer:
        from core.scorers import MODEL_SCORERS, NAMES

        if cfg.validation_scorer not in NAMES:
            problems.append(f"--validation-scorer {cfg.validation_scorer!r} must be one of {', '.join(NAMES)}")
        elif cfg.validation_scorer in MODEL_SCORERS and not (
                cfg.validation_scorer_model and Path(cfg.validation_scorer_model).is_dir()):
            problems.append(f"--validation-scorer {cfg.validation_scorer} needs its weights folder: "
                            "--validation-scorer-model FOLDER (see docs/scorers.md)")
    return problems


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def score_images(images: list, prompts: list[str], scorer=None, names: list[str] | None = None) -> dict:
    """Every metric of one validation's images: the metric values (``METRICS``' keys; ``scorer``
    only with a scorer) and, beside them, FairHuman's Face/Hand Confi. with detection rates."""
    from core.metrics import confidence_metrics

    report = confidence_metrics(images, names=names)
    face = [_mean(row.face_scores) for row in report.per_image]  # 0 where no face was found
    hand = [_mean(row.hand_scores) for row in report.per_image]
    values = {"face": _mean(face), "hand": _mean(hand), "face-hand": _mean((f + h) / 2 for f, h in zip(face, hand))}
    if scorer is not None:
        values["scorer"] = _mean(float(s) for s in scorer.score(images, prompts))
    return {"scores": values, "face_confidence": report.face_confidence,
            "hand_confidence": report.hand_confidence, "face_detection_rate": report.face_detection_rate,
            "hand_detection_rate": report.hand_detection_rate, "images": report.images}


def read_best(path: Path) -> tuple[int, float] | None:
    """(step, score) of a kept best file, from its metadata; None when there is none."""
    from core.lora_format import META_PREFIX, read_lora_metadata

    if not Path(path).is_file():
        return None
    meta = read_lora_metadata(path)
    return int(meta[META_PREFIX + "validation_step"]), float(meta[META_PREFIX + "validation_score"])


def validated_steps(events_path: Path) -> set[int]:
    return {e["step"] for e in read_events(events_path) if e.get("event") == VALIDATION}


class Validator:
    """``validator(step)``: render, score, emit the ``validation`` event, keep the best LoRA.

    ``render(pairs)`` gives PIL images of (prompt, seed) pairs with the current weights;
    ``export(path, metadata)`` writes the current LoRA with ``metadata`` added to its own."""

    def __init__(self, cfg, run_dir: Path, events: EventLog, output_file: str,
                 render: Callable[[list[tuple[str, int]]], list], export: Callable[[Path, dict], object]):
        self.cfg, self.run_dir, self.events = cfg, Path(run_dir), events
        self.render, self.export = render, export
        self.pairs = renders_of(cfg)
        self.path = self.run_dir / best_name(output_file)
        self.scorer = None
        if cfg.validation_scorer:  # loaded now: a bad weights folder fails before training
            from core.scorers import get_scorer

            folder = cfg.validation_scorer_model
            self.scorer = get_scorer(cfg.validation_scorer, models={cfg.validation_scorer: folder} if folder else None)
        from core.masks.model_files import resolve_model_files

        resolve_model_files()  # the detector's files: missing ones are named before training

    def __call__(self, step: int) -> dict:
        images = self.render(self.pairs)
        names = []
        for k, ((_, seed), image) in enumerate(zip(self.pairs, images)):
            path = self.run_dir / "samples" / f"validation_step_{step:07d}_{k}_seed{seed}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            names.append(str(path))
        found = score_images(images, [p for p, _ in self.pairs], self.scorer, names)
        metric = self.cfg.validation_metric
        score = found["scores"][metric]
        best = read_best(self.path)
        improved = best is None or score > best[1]
        if improved:
            self.export(self.path, {"validation_step": step, "validation_score": score,
                                    "validation_metric": metric, "validation_scores": found["scores"]})
            best = (step, score)
        return self.events.emit(VALIDATION, step=step, metric=metric, score=score, improved=improved,
                                best_step=best[0], best_score=best[1], best_path=str(self.path), paths=names,
                                **found)

    def catch_up(self, checkpoint: Path | None, load: Callable[[Path], None]) -> None:
        """Resuming from ``checkpoint``: redo the validation due at its step if the killed run
        did not finish it (``load`` puts the checkpoint's weights into the model)."""
        if checkpoint is None:
            return
        step = checkpoint_step(checkpoint)
        if step % self.cfg.validate_every == 0 and step not in validated_steps(self.events.path):
            load(checkpoint)
            self(step)
