"""Checkpoint lookup: explicit path, weights dir (option or env), pinned-hash download (file:// URLs only)."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

import pytest

from export import checkpoints, efficientat
from export.base import CheckpointError
from export.checkpoints import OfficialWeights, resolve_checkpoint, sha256_file


def _family(weights: OfficialWeights) -> types.ModuleType:
    module = types.ModuleType("family_under_test")
    module.OFFICIAL_WEIGHTS = {weights.variant: weights}  # type: ignore[attr-defined]
    return module


def test_sha256_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_official_mn04_entry_is_pinned() -> None:
    official = efficientat.OFFICIAL_WEIGHTS["mn04"]
    assert official.file_name == "mn04_as_mAP_432.pt"
    assert official.url == "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/mn04_as_mAP_432.pt"
    assert official.sha256 == "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"
    assert all(w.sha256 is None for v, w in efficientat.OFFICIAL_WEIGHTS.items() if v != "mn04")


def test_weights_dir_layouts_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nested = tmp_path / "nested" / "efficientat" / "mn04_as_mAP_432.pt"
    flat = tmp_path / "flat" / "mn04_as_mAP_432.pt"
    for path in (nested, flat):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert resolve_checkpoint(efficientat, "mn04", weights_directory=tmp_path / "nested") == nested
    assert resolve_checkpoint(efficientat, "mn04", weights_directory=tmp_path / "flat") == flat
    monkeypatch.setenv(checkpoints.WEIGHTS_DIR_ENV, str(tmp_path / "flat"))
    assert resolve_checkpoint(efficientat, "mn04") == flat
    # the option wins over the environment
    assert resolve_checkpoint(efficientat, "mn04", weights_directory=tmp_path / "nested") == nested


def test_explicit_checkpoint_must_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent\.pt: checkpoint file not found"):
        resolve_checkpoint(efficientat, "mn04", checkpoint=tmp_path / "absent.pt")


def test_missing_without_pinned_hash_is_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(efficientat, "mn40", weights_directory=tmp_path)
    message = str(info.value)
    assert "mn40_as_mAP_484.pt" in message and "no pinned sha256" in message
    assert str(tmp_path / "efficientat" / "mn40_as_mAP_484.pt") in message


def test_download_disabled_names_searched_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="download disabled") as info:
        resolve_checkpoint(efficientat, "mn04", weights_directory=tmp_path, allow_download=False)
    assert str(tmp_path / "mn04_as_mAP_432.pt") in str(info.value)


def test_download_verifies_pinned_hash(tmp_path: Path) -> None:
    source = tmp_path / "release" / "w.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 1000)
    good = OfficialWeights("fam", "v1", "w.pt", source.as_uri(), sha256_file(source))
    got = resolve_checkpoint(_family(good), "v1", weights_directory=tmp_path / "weights")
    assert got == tmp_path / "weights" / "fam" / "w.pt" and got.read_bytes() == source.read_bytes()

    bad = OfficialWeights("fam", "v1", "w.pt", source.as_uri(), "0" * 64)
    with pytest.raises(CheckpointError, match="expected 0000"):
        resolve_checkpoint(_family(bad), "v1", weights_directory=tmp_path / "other")
    assert not list((tmp_path / "other" / "fam").iterdir())  # no partial or wrong file left behind


def test_failed_download_says_what_to_do(tmp_path: Path) -> None:
    missing = OfficialWeights("fam", "v1", "w.pt", (tmp_path / "nowhere.pt").as_uri(), "0" * 64)
    with pytest.raises(CheckpointError, match=r"download from .* failed.*--weights-dir"):
        resolve_checkpoint(_family(missing), "v1", weights_directory=tmp_path / "weights")
