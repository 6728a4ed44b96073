"""Finding checkpoint files: explicit path, weights directory, or a download pinned by sha256.

A family module may declare `OFFICIAL_WEIGHTS: dict[variant, OfficialWeights]`. Lookup order:
  1. --checkpoint PATH (used as is)
  2. the weights directory (--weights-dir, else $EDGE_ASD_WEIGHTS_DIR): DIR/<family>/<file>, DIR/<file>
  3. download of the official URL into DIR/<family>/<file> (or the user cache), only when the sha256 is
     pinned here; the file is verified before it is renamed into place.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from edge_agent.fsutil import replacing, sha256_file
from export.base import CheckpointError

WEIGHTS_DIR_ENV = "EDGE_ASD_WEIGHTS_DIR"
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class OfficialWeights:
    family: str
    variant: str
    file_name: str
    url: str
    sha256: str | None  # None: never downloaded (no verified hash to check it against)


def weights_dir(option: Path | str | None = None) -> Path | None:
    """The weights directory from the option, else from $EDGE_ASD_WEIGHTS_DIR, else None."""
    if option:
        return Path(option)
    env = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(env) if env else None


def default_download_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edge-asd" / "weights"


def official_weights(family: ModuleType, variant: str) -> OfficialWeights | None:
    return getattr(family, "OFFICIAL_WEIGHTS", {}).get(variant)


def find_local(official: OfficialWeights, directory: Path) -> Path | None:
    for candidate in (directory / official.family / official.file_name, directory / official.file_name):
        if candidate.is_file():
            return candidate
    return None


def resolve_checkpoint(
    family: ModuleType,
    variant: str,
    checkpoint: Path | str | None = None,
    weights_directory: Path | str | None = None,
    allow_download: bool = True,
) -> Path:
    """The checkpoint file to load for `variant`; CheckpointError says what was searched when none is found."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
        return path
    official = official_weights(family, variant)
    if official is None:
        raise CheckpointError(f"{variant}: no official checkpoint is known; pass --checkpoint PATH")
    directory = weights_dir(weights_directory)
    searched = []
    if directory is not None:
        found = find_local(official, directory)
        if found is not None:
            return found
        searched = [str(directory / official.family / official.file_name), str(directory / official.file_name)]
    where = f"not found in {' or '.join(searched)}; " if searched else ""
    if official.sha256 is None:
        raise CheckpointError(
            f"{official.file_name}: {where}no pinned sha256 for {variant}, so it is not downloaded; "
            f"fetch {official.url} yourself and pass --checkpoint or --weights-dir"
        )
    if not allow_download:
        raise CheckpointError(f"{official.file_name}: {where}download disabled")
    target_dir = (directory if directory is not None else default_download_dir()) / official.family
    return download(official, target_dir / official.file_name)


def download(official: OfficialWeights, dest: Path) -> Path:
    """Fetch official.url to dest, verify the pinned sha256, then rename into place."""
    if official.sha256 is None:
        raise CheckpointError(f"{official.file_name}: refusing to download without a pinned sha256")
    if dest.is_file() and sha256_file(dest) == official.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dest) as tmp, open(tmp, "wb") as out:
        try:
            with urllib.request.urlopen(official.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
        except OSError as exc:  # URLError, timeouts and socket errors are all OSErrors
            raise CheckpointError(
                f"{official.file_name}: download from {official.url} failed ({exc}); "
                f"place the file in a weights dir (--weights-dir or ${WEIGHTS_DIR_ENV}) or pass --checkpoint"
            ) from None
        out.flush()
        actual = sha256_file(tmp)
        if actual != official.sha256:
            raise CheckpointError(
                f"{official.file_name}: downloaded file has sha256 {actual}, expected {official.sha256}"
            )
    return dest
