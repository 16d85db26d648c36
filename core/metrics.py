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


# ---- comparing models: color shift and win rates ---------------------------------------------
HSV_CHANNELS = ("hue", "saturation", "value")


def hsv_means(images: Iterable[Any]) -> tuple[float, float, float]:
    """Mean hue (in turns, [0, 1)), saturation and value ([0, 1]) over every pixel of ``images``
    (arrays, PIL images or paths). Hue is an angle: its plain mean barely moves when every hue
    is rotated (values wrap around), so it is the circular mean of the pixels' chroma vectors
    (saturation × (cos, sin) of the hue): gray pixels, whose hue means nothing, weigh nothing."""
    import numpy as np
    from PIL import Image

    total, chroma, count = np.zeros(3), np.zeros(2), 0
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        hsv = (np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float64) / 255.0).reshape(-1, 3)
        total += hsv.sum(axis=0)
        angle = hsv[:, 0] * 2 * np.pi
        chroma += (hsv[:, 1] * np.cos(angle)).sum(), (hsv[:, 1] * np.sin(angle)).sum()
        count += hsv.shape[0]
    if not count:
        raise ValueError("no images to measure")
    hue = (np.arctan2(chroma[1], chroma[0]) / (2 * np.pi)) % 1.0
    return float(hue), float(total[1] / count), float(total[2] / count)


def color_shift(reference: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """How far the colors of ``other`` moved from ``reference`` (HG-DPO Table 2's measure), from
    their ``hsv_means``: saturation and value as the absolute % change of their means, hue as the
    angle between the mean hues in % of a full turn (0-50); ``mean`` averages the three. All 0
    for identical sets."""
    turn = abs(other[0] - reference[0]) % 1.0
    shift = {"hue": min(turn, 1.0 - turn) * 100.0}
    shift.update({name: abs(o - r) / r * 100.0 if r else (0.0 if o == r else float("inf"))
                  for name, r, o in zip(HSV_CHANNELS[1:], reference[1:], other[1:])})
    shift["mean"] = sum(shift[n] for n in HSV_CHANNELS) / len(HSV_CHANNELS)
    return shift


@dataclass(frozen=True)
class WinRate:
    """A against B on one metric over prompts: a tie counts half; ``low``/``high`` bound the
    rate with the 95% Wilson score interval over ``prompts`` comparisons."""

    wins: int
    losses: int
    ties: int
    prompts: int
    rate: float
    low: float
    high: float

    def to_json(self) -> dict:
        return asdict(self)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a: Sequence[float | None], b: Sequence[float | None], higher_is_better: bool = True) -> WinRate:
    """Per-prompt comparison of two models' scores (same prompts, same order); a prompt where
    either has no score (e.g. no face detected by either) is left out."""
    if len(a) != len(b):
        raise ValueError(f"score lists differ in length: {len(a)} vs {len(b)}")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    sign = 1 if higher_is_better else -1
    wins = sum(1 for x, y in pairs if sign * (x - y) > 0)
    losses = sum(1 for x, y in pairs if sign * (x - y) < 0)
    ties = len(pairs) - wins - losses
    n = len(pairs)
    rate = (wins + 0.5 * ties) / n if n else 0.5
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return WinRate(wins, losses, ties, n, rate, low, high)
