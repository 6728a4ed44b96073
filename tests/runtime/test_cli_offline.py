"""edge-agent info / synth / enroll / score end to end on a random-init mn04 export."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank_set import load_banks
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import Scorer


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert main(["synth", str(root / "ds"), "--machines", "fan", "--train-source", "6", "--train-target", "2",
                 "--test-per-class", "1", "--demo", str(root / "rec.wav"), "--demo-seconds", "40"]) == 0
    return root


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_enroll_info_score(demo: Path, mn04_random_onnx: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    bank = tmp_path / "bank"
    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(bank),
                 "--train", str(demo / "ds" / "fan" / "train"), "--no-progress"]) == 0
    summary = _json_lines(capsys.readouterr().out)[-1]
    assert summary["source_refs"] == 6 and summary["target_refs"] == 2
    assert summary["normalizer"] == "ld-domain" and summary["threshold"] > 0

    assert main(["info", str(bank)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"source": 6, "target": 2} and info["scoring"]["normalizer"] == "ld-domain"

    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), str(demo / "rec.wav")]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["start_s"] for r in rows] == [0, 10, 20, 30]
    assert all(r["threshold"] == pytest.approx(summary["threshold"], rel=1e-5) for r in rows)

    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), "--normalization", "ld",
                 "--threshold", "123", str(demo / "rec.wav")]) == 0
    assert all(r["threshold"] == 123 and not r["anomalous"] for r in _json_lines(capsys.readouterr().out))

    # scored otherwise than the bank was calibrated (raw distances): its threshold is calibrated again on those
    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), "--normalization", "none",
                 str(demo / "rec.wav")]) == 0
    raw = _json_lines(capsys.readouterr().out)
    banks = load_banks(bank, [Encoder(mn04_random_onnx).member])
    cfg = dataclasses.replace(ScoringConfig.from_dict(banks.scoring), normalizer="none")
    expected = calibrate(Scorer.fit(banks.banks, cfg).loo_scores(), banks.threshold["method"],
                         banks.threshold["quantile"])["value"]
    assert all(r["threshold"] == pytest.approx(expected, rel=1e-5) for r in raw)
    assert expected != pytest.approx(summary["threshold"], rel=1e-2)


def test_enroll_and_score_take_the_statistics_term_and_fusion_options(demo: Path, mn04_random_onnx: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bank, train = tmp_path / "plain", demo / "ds" / "fan" / "train"
    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(bank), "--train", str(train),
                 "--feature-stats", "off", "--fusion", "mean", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(bank)]) == 0
    scoring = json.loads(capsys.readouterr().out)["scoring"]
    assert (scoring["feature_stats"], scoring["fusion"]) == ("off", "mean")
    banks = load_banks(bank, [Encoder(mn04_random_onnx).member])
    plain = Scorer.fit(banks.banks, ScoringConfig(feature_stats="off", fusion="mean"))
    assert banks.threshold["value"] == pytest.approx(calibrate(plain.loo_scores())["value"])
    # score: the bank's settings unless told otherwise; told otherwise, the threshold follows
    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), str(demo / "rec.wav")]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert rows and all(r["threshold"] == pytest.approx(banks.threshold["value"], rel=1e-5) for r in rows)
    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), "--feature-stats", "add",
                 "--feature-stats-eps", "0.5", "--fusion", "standardized", str(demo / "rec.wav")]) == 0
    fused = Scorer.fit(banks.banks, ScoringConfig(feature_stats="add", feature_stats_eps=0.5, fusion="standardized"))
    rows = _json_lines(capsys.readouterr().out)
    assert rows and all(r["threshold"] == pytest.approx(calibrate(fused.loo_scores())["value"], rel=1e-5)
                        for r in rows)
    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(bank), "--feature-stats-eps", "nan",
                 str(demo / "rec.wav")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["edge-agent: error: scoring.feature_stats_eps: must be a number > 0 and <= 10 (got nan)"]


def test_enroll_from_source_and_target_paths_with_memmixup(demo: Path, mn04_random_onnx: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    train = demo / "ds" / "fan" / "train"
    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(tmp_path / "b"),
                 "--source", *map(str, sorted(train.glob("*source*"))), "--target", str(demo / "rec.wav"),
                 "--memmixup", "--normalization", "zscore-domain", "--no-progress"]) == 0
    summary = _json_lines(capsys.readouterr().out)[-1]
    # the 40 s recording gives 4 target windows; MemMixup adds mixes on top
    assert summary["source_refs"] == 6 and summary["target_refs"] > 4


def test_errors_are_one_line_with_exit_2(demo: Path, mn04_random_onnx: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: model file not found" in capsys.readouterr().err

    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(demo / "rec.wav", odd / "recording.wav")
    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(tmp_path / "b"),
                 "--train", str(odd)]) == 2
    assert "recording.wav: not a DCASE clip name" in capsys.readouterr().err

    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(tmp_path / "b"),
                 "--target", str(demo / "rec.wav")]) == 2
    assert "needs normal source-domain recordings" in capsys.readouterr().err

    assert main(["score", "--model", str(mn04_random_onnx), "--bank", str(tmp_path / "nobank"),
                 str(demo / "rec.wav")]) == 2
    assert "nobank" in capsys.readouterr().err

    assert main(["enroll", "--model", str(mn04_random_onnx), "--bank", str(tmp_path / "b"),
                 "--source", str(demo / "rec.wav"), "--layers", "layer_99"]) == 2
    assert "layer_99" in capsys.readouterr().err
