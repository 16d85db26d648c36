"""Image scorers for AI feedback: ``score(images, prompts) -> list[float]``, higher is better.

| name | what it scores | weights |
|---|---|---|
| anatomy | face detection confidence + hand confidence × landmark plausibility (mediapipe) | the mediapipe model files (`python -m trainers models`) |
| pickscore | PickScore (CLIP fine-tuned on human choices): logit scale × text-image cosine | a local folder |
| hps | HPS v2 / v2.1 (open_clip ViT-H-14 fine-tuned on human choices): text-image cosine | a local folder |
| imagereward | ImageReward (BLIP + reward head), standardized | a local folder |
| clipscore | CLIP score: 100 × max(cosine, 0) of a plain CLIP model (evaluation) | a local folder |
| composite | a weighted sum, e.g. ``anatomy:1,hps:5`` | those of its parts |

Nothing is downloaded: model-based scorers load from folders the user supplies
(``models={"hps": FOLDER, ...}``, or ``model=FOLDER`` for one scorer); docs/scorers.md has the
layouts.
"""
from __future__ import annotations

from importlib import import_module

MODEL_SCORERS = {"pickscore": (".clip_preference", "PickScore"), "hps": (".hps", "HPSv2"),
                 "imagereward": (".image_reward", "ImageReward"), "clipscore": (".clip_preference", "ClipScore")}
NAMES = ("anatomy", *MODEL_SCORERS)


def get_scorer(spec: str, models: dict | None = None, **options):
    """A scorer from a name, or a composite from ``name:weight,name:weight``. ``models`` maps
    model-based scorer names to their weights folders."""
    if "," in spec or ":" in spec:
        from .composite import Composite

        return Composite.parse(spec, lambda name: get_scorer(name, models=models))
    if spec == "anatomy":
        from .anatomy import AnatomyScorer

        return AnatomyScorer(**options)
    if spec in MODEL_SCORERS:
        module, name = MODEL_SCORERS[spec]
        folder = options.pop("model", None) or (models or {}).get(spec)
        return getattr(import_module(module, __name__), name)(model=folder, **options)
    raise ValueError(f"unknown scorer {spec!r}; expected one of {', '.join(NAMES)} or name:weight,...")
