"""A weighted sum of scorers: ``anatomy:1,hps:5``."""
from __future__ import annotations


class Composite:
    def __init__(self, parts: list[tuple[object, float]]):
        self.parts = parts

    @classmethod
    def parse(cls, spec: str, models: dict | None = None):
        from . import get_scorer

        parts = []
        for item in spec.split(","):
            name, _, weight = item.strip().partition(":")
            parts.append((get_scorer(name, models=models), float(weight or 1.0)))
        return cls(parts)

    def score(self, images, prompts) -> list[float]:
        total = [0.0] * len(images)
        for scorer, weight in self.parts:
            for i, value in enumerate(scorer.score(images, prompts)):
                total[i] += weight * value
        return total
