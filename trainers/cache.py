"""A disk cache of tensors a run computes again and again: VAE latent moments per image view
and text embeddings per caption. Files live in the run directory, are written atomically and
are keyed by what the tensor is a function of, so a resumed run reuses them. A value is a tensor
or a dict of tensors (a caption's token embedding and pooled vector; None entries are left out)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from core.fileio import atomic_path


class TensorCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / (hashlib.sha1(key.encode("utf-8")).hexdigest() + ".pt")

    def get_or_compute(self, key: str, compute):
        path = self._path(key)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        value = compute()
        value = ({k: v.detach().cpu() for k, v in value.items() if v is not None} if isinstance(value, dict)
                 else value.detach().cpu())
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
        return value
