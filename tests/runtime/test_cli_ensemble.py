"""edge-agent enroll / score / info with an ensemble of two encoders (random mn04 at 32 kHz + ced-tiny at 16 kHz)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.cli import main
from edge_agent.evaluation.synthetic import synthesize_dataset
from edge_agent.scoring.bank_set import ENSEMBLE_JSON

from ..exported import ExportedModel
from .toy_model import toy_info, write_toy_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ens_ds")
    synthesize_dataset(root, machines=("fan",), n_train_source=6, n_train_target=2, n_test_per_class=1, seed=3)
    return root / "fan"


@pytest.fixture(scope="module")
def models(mn04_random_onnx: Path, ced_tiny_model: ExportedModel) -> tuple[Path, Path]:
    return mn04_random_onnx, ced_tiny_model.path


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _model_args(*paths: Path) -> list[str]:
    return [arg for p in paths for arg in ("--model", str(p))]


def _score(capsys: pytest.CaptureFixture[str], bank: Path, files: list[Path], *paths: Path) -> list[dict]:
    assert main(["score", *_model_args(*paths), "--bank", str(bank), "--no-progress", *map(str, files)]) == 0
    return _json_lines(capsys.readouterr().out)


@pytest.fixture(scope="module")
def ensemble_bank(dataset: Path, models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    bank = tmp_path_factory.mktemp("ens_bank") / "bank"
    assert main(["enroll", *_model_args(*models), "--bank", str(bank), "--train", str(dataset / "train"),
                 "--no-progress"]) == 0
    return bank


def test_enroll_writes_an_ensemble_bank_with_aligned_members(ensemble_bank: Path, models: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads((ensemble_bank / ENSEMBLE_JSON).read_text())
    assert doc["format_version"] == 1 and doc["kind"] == "ensemble"
    assert [m["variant"] for m in doc["members"]] == ["mn04", "ced-tiny"]
    member_names = [json.loads((ensemble_bank / m["subdir"] / "bank.json").read_text())["names"]
                    for m in doc["members"]]
    assert member_names[0] == member_names[1] and len(member_names[0]["source"]) == 6
    assert doc["threshold"]["method"] == "gamma" and doc["threshold"]["n"] == 8

    assert main(["info", str(ensemble_bank)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ensemble" and info["counts"] == {"source": 6, "target": 2}
    assert [m["variant"] for m in info["members"]] == ["mn04", "ced-tiny"]
    assert info["threshold"]["value"] == doc["threshold"]["value"]
    assert info["model"] == "+".join(m["model_id"] for m in doc["members"])


def test_ensemble_score_is_the_mean_of_the_members_normalized_scores(
        ensemble_bank: Path, dataset: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    test_files = sorted((dataset / "test").glob("*.wav"))
    rows = _score(capsys, ensemble_bank, test_files, *models)
    assert len(rows) == len(test_files) == 4
    threshold = json.loads((ensemble_bank / ENSEMBLE_JSON).read_text())["threshold"]["value"]
    assert all(r["threshold"] == pytest.approx(threshold, abs=1e-6) for r in rows)

    # each member directory is an ordinary bank: score it alone with its own model
    doc = json.loads((ensemble_bank / ENSEMBLE_JSON).read_text())
    member_rows = [_score(capsys, ensemble_bank / m["subdir"], test_files, model)
                   for m, model in zip(doc["members"], models, strict=True)]
    expected = np.mean([[r["score"] for r in member] for member in member_rows], axis=0)
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=2e-6)
    # the members disagree, so the mean is not just one of them
    assert not np.allclose(member_rows[0][0]["score"], member_rows[1][0]["score"])

    # the models may be given in any order
    swapped = _score(capsys, ensemble_bank, test_files, *reversed(models))
    assert [r["score"] for r in swapped] == [r["score"] for r in rows]


def test_mismatched_or_missing_members_are_clear_errors(ensemble_bank: Path, dataset: Path,
                                                       models: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    clip = str(sorted((dataset / "test").glob("*.wav"))[0])
    mn04 = models[0]
    assert main(["score", "--model", str(mn04), "--bank", str(ensemble_bank), clip]) == 2
    err = capsys.readouterr().err
    assert f"{ensemble_bank / ENSEMBLE_JSON}: an ensemble bank of 2 models" in err and "give every member" in err

    toy = write_toy_model(tmp_path / "toy.onnx", toy_info())
    assert main(["score", "--model", str(mn04), "--model", str(toy), "--bank", str(ensemble_bank), clip]) == 2
    err = capsys.readouterr().err
    assert str(ensemble_bank / ENSEMBLE_JSON) in err
    assert "no model given for member(s) ced-tiny" in err and "not in the ensemble: toy1-" in err

    assert main(["score", "--model", str(mn04), "--model", str(mn04), "--bank", str(ensemble_bank), clip]) == 2
    assert "is the same model as" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(ensemble_bank, broken)
    member = json.loads((broken / ENSEMBLE_JSON).read_text())["members"][1]["subdir"]
    shutil.rmtree(broken / member)
    assert main(["score", *_model_args(*models), "--bank", str(broken), clip]) == 2
    assert f"{broken / member}: no memory bank there" in capsys.readouterr().err

    single = tmp_path / "single"
    shutil.copytree(broken / json.loads((broken / ENSEMBLE_JSON).read_text())["members"][0]["subdir"], single)
    assert main(["score", *_model_args(*models), "--bank", str(single), clip]) == 2
    assert "a single-model bank (bank.json), not an ensemble bank" in capsys.readouterr().err


def test_re_enroll_replaces_the_ensemble_and_one_model_keeps_a_plain_bank(
        ensemble_bank: Path, dataset: Path, models: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(ensemble_bank, bank)
    source_clips = sorted((dataset / "train").glob("*source*"))[:4]
    assert main(["enroll", *_model_args(*models), "--bank", str(bank), "--source", *map(str, source_clips),
                 "--threshold-method", "percentile", "--no-progress"]) == 0
    summary = _json_lines(capsys.readouterr().out)[-1]
    assert summary["source_refs"] == 4 and summary["target_refs"] == 0
    assert set(summary["layers"]) == set(summary["members"]) and len(summary["members"]) == 2
    doc = json.loads((bank / ENSEMBLE_JSON).read_text())
    assert doc["threshold"]["method"] == "percentile" and doc["threshold"]["value"] == summary["threshold"]
    assert sorted(p.name for p in bank.iterdir()) == sorted([ENSEMBLE_JSON, *(m["subdir"] for m in doc["members"])])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bank.")]  # no temp dirs left behind

    plain = tmp_path / "plain"
    assert main(["enroll", "--model", str(models[0]), "--bank", str(plain), "--source", *map(str, source_clips),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert (plain / "bank.json").is_file() and not (plain / ENSEMBLE_JSON).exists()
