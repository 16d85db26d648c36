"""FairHuman's confidence metrics, "Face Confi." and "Hand Confi.", with detection rates.

- Face Confi.: the mean face-detection score over all detected faces.
- Hand Confi.: the mean handedness probability (mediapipe's Left/Right classifier) over all
  detected hands.

Each comes with its detection rate (images with at least one detection / images): both means
are over *detected* regions only, so a model that stops drawing hands (or draws them so badly
that none is found) would otherwise keep, or even raise, its score.

How the FairHuman evaluation computed Hand Confi., and what differs here: it ran mediapipe's
legacy ``solutions.hands.Hands`` in tracking mode (``static_image_mode=False``) over the whole
list of generated images, so the landmarks, and hence the handedness, of an image could be
tracked over from the previous, unrelated image; and it averaged over detected hands only. Here
every image is scored on its own (the Tasks API in IMAGE mode, no state between images), the
per-image scores are kept (``per_image``) and the detection rates are reported beside the means.
By default one whole-image pass is used, as in the paper (``tiles=False``); ``tiles=True``
uses the annotation's tiled detection, which also counts small faces and hands.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence


@dataclass(frozen=True)
class ImageScores:
    image: str  # a name (path) or index, for the per-image details
    face_scores: tuple[float, ...]  # face-detection scores
    hand_scores: tuple[float, ...]  # handedness probabilities


@dataclass(frozen=True)
class ConfidenceReport:
    images: int
    face_confidence: float | None  # None when no face was detected at all
    face_detection_rate: float
    faces: int
    hand_confidence: float | None
    hand_detection_rate: float
    hands: int
    per_image: tuple[ImageScores, ...]

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def mean(value):
            return "n/a" if value is None else f"{value:.4f}"

        return (f"Face Confi. {mean(self.face_confidence)} (faces in {self.face_detection_rate:.0%} of "
                f"{self.images} images) | Hand Confi. {mean(self.hand_confidence)} "
                f"(hands in {self.hand_detection_rate:.0%})")


def summarize(per_image: Iterable[ImageScores]) -> ConfidenceReport:
    """The report over per-image scores (an empty list gives rates of 0 and no means)."""
    rows = tuple(per_image)
    faces = [s for row in rows for s in row.face_scores]
    hands = [s for row in rows for s in row.hand_scores]
    count = len(rows)

    def rate(pick) -> float:
        return sum(1 for row in rows if pick(row)) / count if count else 0.0

    return ConfidenceReport(
        images=count,
        face_confidence=sum(faces) / len(faces) if faces else None,
        face_detection_rate=rate(lambda r: r.face_scores), faces=len(faces),
        hand_confidence=sum(hands) / len(hands) if hands else None,
        hand_detection_rate=rate(lambda r: r.hand_scores), hands=len(hands),
        per_image=rows,
    )


def image_scores(image: Any, name: str = "", *, min_confidence: float = 0.5, tiles: bool = False,
                 models_dir=None) -> ImageScores:
    """Detect one image (array, PIL image or path) and keep its scores."""
    from .masks import detect

    faces, hands = detect(image, min_confidence=min_confidence, tiles=tiles, models_dir=models_dir)
    return ImageScores(image=str(name), face_scores=tuple(f.score for f in faces),
                       hand_scores=tuple(h.handedness_score for h in hands))


def confidence_metrics(images: Iterable[Any], *, names: Sequence[str] | None = None, min_confidence: float = 0.5,
                       tiles: bool = False, models_dir=None,
                       progress: Callable[[int], None] | None = None) -> ConfidenceReport:
    """Face Confi. / Hand Confi. with detection rates over ``images`` (arrays, PIL images or
    paths). ``progress(i)`` is called after each image."""
    rows = []
    for index, image in enumerate(images):
        name = names[index] if names is not None else (str(image) if isinstance(image, (str, bytes)) or hasattr(
            image, "__fspath__") else str(index))
        rows.append(image_scores(image, name, min_confidence=min_confidence, tiles=tiles, models_dir=models_dir))
        if progress is not None:
            progress(index + 1)
    return summarize(rows)


def scores_from_records(records: Iterable[dict]) -> ConfidenceReport:
    """The report from ``metadata.jsonl`` records written by ``annotate`` (errors left out)."""
    return summarize(
        ImageScores(image=row["image"], face_scores=tuple(f["score"] for f in row.get("faces", [])),
                    hand_scores=tuple(h["handedness_score"] for h in row.get("hands", [])))
        for row in records if row.get("status", "ok") != "error"
    )
