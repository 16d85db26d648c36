"""Real photos of people for tests, benchmarks and the demo, fetched into a cache outside git.

The npm package ``@vladmandic/face-api@1.7.15`` ships six group photos (``demo/sample1..6.jpg``,
1920 px wide, 3-5 people each, faces and hands at many sizes). ``npm pack`` fetches the package
tarball from the npm registry once, with npm's own client; only the six JPEGs are kept, in
``~/.cache/fairhuman-hgdpo/photos``. They are never committed. Where npm is unavailable,
``skimage_photos`` writes scikit-image's bundled ``astronaut`` and ``camera`` (when installed).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@vladmandic/face-api@1.7.15"
NAMES = tuple(f"sample{i}.jpg" for i in range(1, 7))


class PhotosUnavailable(RuntimeError):
    """The photos cannot be fetched here (no npm, no registry, no scikit-image); says why."""


def cache_root() -> Path:
    return Path(os.environ.get("FAIRHUMAN_CACHE", Path.home() / ".cache" / "fairhuman-hgdpo"))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)  # concurrent fetchers each write a whole file


def sample_photos(cache_dir: str | Path | None = None) -> list[Path]:
    """Paths of the six sample photos, fetched with ``npm pack`` on first use.

    Raises ``PhotosUnavailable`` with the reason when npm is missing or fails.
    """
    folder = Path(cache_dir) if cache_dir else cache_root() / "photos"
    paths = [folder / name for name in NAMES]
    if all(p.is_file() and p.stat().st_size > 0 for p in paths):
        return paths
    npm = shutil.which("npm")
    if npm is None:
        raise PhotosUnavailable(f"npm is not installed: cannot fetch the sample photos of {PACKAGE}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                                    text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise PhotosUnavailable(f"npm pack {PACKAGE} failed: {err}") from err
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise PhotosUnavailable(f"npm pack {PACKAGE} failed: {result.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as archive:
            for name in NAMES:  # read the six members by name; nothing else is extracted
                member = archive.extractfile(f"package/demo/{name}")
                if member is None:
                    raise PhotosUnavailable(f"{PACKAGE} has no demo/{name}")
                _write_atomic(folder / name, member.read())
    return paths


def skimage_photos(cache_dir: str | Path | None = None) -> list[Path]:
    """scikit-image's ``astronaut`` (one face) and ``camera`` (one person) as PNGs in the cache;
    ``PhotosUnavailable`` when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError as err:
        raise PhotosUnavailable("scikit-image is not installed: no fallback photos") from err
    import io

    import numpy as np
    from PIL import Image

    folder = Path(cache_dir) if cache_dir else cache_root() / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "camera"):
        path = folder / f"skimage_{name}.png"
        if not path.is_file():
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(buffer, format="PNG")
            _write_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths
