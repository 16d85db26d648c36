"""Real photos of people for tests, benchmarks and the demo, fetched into a cache outside git.

The npm package ``@vladmandic/face-api@1.7.15`` ships six group photos (``demo/sample1..6.jpg``,
1920 px wide, 3-5 people each, faces and hands at many sizes). ``npm pack`` fetches the package
tarball from the npm registry once, with npm's own client; only the six JPEGs are kept, in
``~/.cache/fairhuman-hgdpo/photos``. They are never committed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from core.fileio import write_bytes_atomic

PACKAGE = "@vladmandic/face-api@1.7.15"
NAMES = tuple(f"sample{i}.jpg" for i in range(1, 7))


class PhotosUnavailable(RuntimeError):
    """The photos cannot be fetched here (no npm, no registry); says why."""


def cache_root() -> Path:
    return Path(os.environ.get("FAIRHUMAN_CACHE", Path.home() / ".cache" / "fairhuman-hgdpo"))


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
                write_bytes_atomic(folder / name, member.read())  # concurrent fetchers each write a whole file
    return paths
