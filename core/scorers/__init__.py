"""Image scorers for AI feedback: ``score(images, prompts) -> list[float]``, higher is better.

| name | what it scores | weights |
|---|---|---|
| anatomy | face detection confidence + hand confidence × landmark plausibility (mediapipe) | bundled with mediapipe 0.10.21 |
| pickscore | PickScore (a CLIP model fine-tuned on human preferences): text-image agreement | a local folder (`model=`) |
| composite | a weighted sum, e.g. ``anatomy:1,pickscore:0.01`` | those of its parts |

Nothing is downloaded: model-based scorers load from a folder the user supplies.
"""
from __future__ import annotations


def get_scorer(spec: str, **options):
    """A scorer from a name, or a composite from ``name:weight,name:weight``."""
    if "," in spec or ":" in spec:
        from .composite import Composite

        return Composite.parse(spec, **options)
    if spec == "anatomy":
        from .anatomy import AnatomyScorer

        return AnatomyScorer(**options)
    if spec == "pickscore":
        from .clip_preference import PickScore

        return PickScore(**options)
    if spec in ("hps", "imagereward"):
        raise NotImplementedError(f"the {spec} scorer is not available in this version; use anatomy, pickscore "
                                  "or a composite of them")
    raise ValueError(f"unknown scorer {spec!r}; expected anatomy, pickscore or name:weight,... ")
