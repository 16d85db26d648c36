"""Real photos of people for tests and the demo, fetched into a cache outside git.

The npm package ``@vladmandic/face-api@1.7.15`` ships six group photos (``demo/sample1..6.jpg``,
1920 px wide, several faces and hands each). ``npm pack`` fetches the package tarball from the
registry once; only the six JPEGs are kept. They are never committed.
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


def cache_root() -> Path:
    return Path(os.environ.get("FAIRHUMAN_CACHE", Path.home() / ".cache" / "fairhuman-hgdpo"))


def sample_photos(cache_dir: str | Path | None = None) -> list[Path]:
    """Paths of the six sample photos, fetching them with npm on first use.

    Raises RuntimeError with the reason when npm is missing or the registry cannot be reached.
    """
    folder = Path(cache_dir) if cache_dir else cache_root() / "photos"
    paths = [folder / name for name in NAMES]
    if all(p.is_file() for p in paths):
        return paths
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: cannot fetch the sample photos of " + PACKAGE)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                                text=True, timeout=300)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not tarballs:
            raise RuntimeError(f"npm pack {PACKAGE} failed: {result.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as archive:
            for name in NAMES:
                member = archive.getmember(f"package/demo/{name}")
                data = archive.extractfile(member).read()
                tmp_path = folder / f".{name}.tmp"
                tmp_path.write_bytes(data)
                os.replace(tmp_path, folder / name)
    return paths
