"""A weighted sum of scorers: ``anatomy:1,hps:5``."""
from __future__ import annotations


class Composite:
    def __init__(self, parts: list[tuple[object, float]]):
        self.parts = parts

    @classmethod
    def parse(cls, spec: str, make_scorer):
        """``name:weight,...`` with each part made by ``make_scorer(name)`` (``get_scorer``, passed in
        by the package so that this module does not import it back)."""
        parts = []
        for item in spec.split(","):
            name, _, weight = item.strip().partition(":")
            parts.append((make_scorer(name), float(weight or 1.0)))
        return cls(parts)

    def score(self, images, prompts) -> list[float]:
        total = [0.0] * len(images)
        for scorer, weight in self.parts:
            for i, value in enumerate(scorer.score(images, prompts)):
                total[i] += weight * value
        return total
