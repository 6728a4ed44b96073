"""The evaluate pipeline end to end: real ONNX models, real banks and scorers, synthetic and DCASE clips."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.resample import resample
from edge_agent.audio.wavio import read_wav
from edge_agent.cli import add_evaluate_arguments, run_evaluate
from edge_agent.errors import ConfigError, DatasetError, EdgeAsdError
from edge_agent.evaluation.dcase import scan_dataset
from edge_agent.evaluation.evaluate import embed_dataset, evaluate_dataset, score_embeddings
from edge_agent.evaluation.report import write_report
from edge_agent.evaluation.synthetic import synthesize_dataset, write_demo_recording
from edge_agent.model.embedding import embed_windows
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank import MemoryBank, MixupSpec
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer

JSON_KEYS = {"official", "auc_source", "auc_target", "pauc", "machines"}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthesize_dataset(root, machines=("fan", "pump", "gearbox"), n_train_source=10, n_train_target=3,
                       n_test_per_class=6, seed=0)
    return root


def test_random_model_end_to_end_with_report(mn04_random_onnx: Path, synthetic_root: Path,
                                             tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    result = evaluate_dataset([mn04_random_onnx], synthetic_root, ScoringConfig(), batch_size=5, progress=False)
    write_report(result, report_dir)
    data = result.to_json()
    json.dumps(data, allow_nan=False)
    assert set(data) >= JSON_KEYS
    assert sorted(data["machines"]) == ["fan", "gearbox", "pump"]
    for entry in data["machines"].values():
        assert entry["n_test"] == 24
        assert entry["n_train"] == {"source": 10, "target": 3}
        for key in ("auc_source", "auc_target", "pauc"):
            assert 0.0 <= entry[key] <= 1.0
    assert data["complete"] and data["n_undefined"] == 0
    assert data["config"]["normalizer"] == "ld-domain"
    assert 0.0 < data["official"] <= 1.0
    for section in result.sections:
        assert section.scores.shape == (24,) and np.all(np.isfinite(section.scores))

    markdown = (report_dir / "report.md").read_text()
    for machine in ("fan", "gearbox", "pump"):
        assert f"| {machine} | 00 |" in markdown
        png = report_dir / f"{machine}_section_00.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with open(report_dir / f"anomaly_score_{machine}_section_00_test.csv") as fh:
            assert len(list(csv.reader(fh))) == 24
    assert f"{data['official']:.4f}" in markdown
    assert json.loads((report_dir / "result.json").read_text())["official"] == data["official"]


def test_each_clip_is_embedded_once_and_reused_across_configs(mn04_random_onnx: Path,
                                                              synthetic_root: Path) -> None:
    dataset = scan_dataset(synthetic_root, machines=["fan"])
    embeddings = embed_dataset([mn04_random_onnx], dataset, batch_size=7, progress=False)
    (model,) = embeddings.models
    assert set(model.by_clip) == {clip.path for clip in dataset.all_clips()}
    assert all(set(layers) == set(model.info.layers) for layers in model.by_clip.values())
    defaults_only = embed_dataset([mn04_random_onnx], dataset, progress=False, layers="default")
    assert defaults_only.models[0].layers == model.info.default_layers
    assert all(set(layers) == set(model.info.default_layers) for layers in defaults_only.models[0].by_clip.values())
    results = {name: score_embeddings(embeddings, ScoringConfig(normalizer=name))
               for name in ("none", "zscore-test", "ld-domain")}
    scores = [r.sections[0].scores for r in results.values()]
    assert not np.allclose(scores[0], scores[2])  # the normalizers do differ on the same embeddings


def test_an_ensemble_of_one_model_twice_equals_the_model(mn04_random_onnx: Path, synthetic_root: Path) -> None:
    dataset = scan_dataset(synthetic_root, machines=["pump"])
    single = score_embeddings(embed_dataset([mn04_random_onnx], dataset, progress=False), ScoringConfig())
    double = score_embeddings(embed_dataset([mn04_random_onnx, mn04_random_onnx], dataset, progress=False),
                              ScoringConfig())
    np.testing.assert_allclose(double.sections[0].scores, single.sections[0].scores, rtol=1e-6)
    assert len(double.to_json()["models"]) == 2


def test_real_dcase_sample_passes_through(mn04_random_onnx: Path, dcase_sample: Path, tmp_path: Path) -> None:
    for normalizer in ("none", "zscore-test", "zscore-domain", "ld", "ld-domain"):
        result = evaluate_dataset([mn04_random_onnx], dcase_sample, ScoringConfig(normalizer=normalizer),
                                  progress=False)
        write_report(result, tmp_path / normalizer)
        data = result.to_json()
        json.dumps(data, allow_nan=False)
        assert len(data["machines"]) == 7
        # 2 test clips per machine: ToyCar and slider have only normals, so their AUCs are undefined
        assert data["machines"]["ToyCar"]["auc_source"] is None
        assert data["machines"]["ToyCar"]["pauc"] is None
        # one normal against one anomaly: 0 or 1, or 0.5 for a tie (zscore-test over a batch of two gives each
        # layer the z-scores -1 and +1; two layers that order the pair differently average to a tie)
        assert data["machines"]["fan"]["auc_target"] in (0.0, 0.5, 1.0)
        assert not data["complete"] and data["n_undefined"] > 0
        assert data["official"] is not None
        assert (tmp_path / normalizer / "ToyCar_section_00.png").is_file()


def test_pretrained_mn04_separates_synthetic_anomalies(mn04_real_onnx: Path, synthetic_root: Path) -> None:
    result = evaluate_dataset([mn04_real_onnx], synthetic_root, ScoringConfig(), progress=False)
    data = result.to_json()
    assert data["auc_source"] > 0.75 and data["auc_target"] > 0.75
    # clearly above chance (a random-init mn04 lands near 0.55 here), but not a solved problem
    assert 0.8 < data["official"] < 0.99, data


def test_unlabelled_test_clip_is_an_error_naming_it(mn04_random_onnx: Path, synthetic_root: Path,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split in ("train", "test"):
        (root / "fan" / split).mkdir(parents=True)
    source = synthetic_root / "fan"
    for clip in sorted((source / "train").glob("*.wav"))[:3]:
        (root / "fan" / "train" / clip.name).write_bytes(clip.read_bytes())
    first_test = sorted((source / "test").glob("*.wav"))[0]
    (root / "fan" / "test" / "section_00_0001.wav").write_bytes(first_test.read_bytes())
    with pytest.raises(DatasetError, match=r"section_00_0001\.wav.*no normal/anomaly label"):
        evaluate_dataset([mn04_random_onnx], root, ScoringConfig(), progress=False)


def test_report_without_matplotlib_is_a_clear_error(mn04_random_onnx: Path, synthetic_root: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = scan_dataset(synthetic_root, machines=["gearbox"])
    result = score_embeddings(embed_dataset([mn04_random_onnx], dataset, progress=False), ScoringConfig())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is absent
    with pytest.raises(EdgeAsdError, match=r"edge-asd\[report\]"):
        write_report(result, tmp_path / "r")
    write_report(result, tmp_path / "tables-only", plots=False)
    assert "| gearbox | 00 |" in (tmp_path / "tables-only" / "report.md").read_text()


def test_cli_hook_prints_json_on_the_last_line(mn04_random_onnx: Path, synthetic_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["--model", str(mn04_random_onnx), "--dataset", str(synthetic_root),
                              "--machines", "fan", "--normalization", "zscore-test", "--layers", "layer_12",
                              "--json", "--no-progress"])
    assert run_evaluate(args) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last_line)
    assert list(data["machines"]) == ["fan"]
    assert data["config"]["normalizer"] == "zscore-test"
    assert data["models"][0]["layers"] == ["layer_12"]


def test_several_sections_are_scored_separately(mn04_random_onnx: Path, synthetic_root: Path,
                                                tmp_path: Path) -> None:
    # DCASE 2021/2022 style: one machine, sections 00 and 01, each with its own banks
    for split in ("train", "test"):
        out = tmp_path / "fan" / split
        out.mkdir(parents=True)
        for clip in sorted((synthetic_root / "fan" / split).glob("*.wav")):
            (out / clip.name).write_bytes(clip.read_bytes())
            (out / clip.name.replace("section_00", "section_01")).write_bytes(clip.read_bytes())
    result = evaluate_dataset([mn04_random_onnx], tmp_path, ScoringConfig(normalizer="none"), progress=False)
    assert [(s.machine, s.section) for s in result.sections] == [("fan", "00"), ("fan", "01")]
    np.testing.assert_allclose(result.sections[0].scores, result.sections[1].scores, rtol=1e-6)
    entry = result.to_json()["machines"]["fan"]
    assert set(entry["sections"]) == {"00", "01"}
    assert entry["auc_source"] == pytest.approx(entry["sections"]["00"]["auc_source"])
    assert entry["n_test"] == 48


def test_demo_recording_anomaly_stands_out_for_pretrained_mn04(mn04_real_onnx: Path, synthetic_root: Path,
                                                                tmp_path: Path) -> None:
    # the daemon demo: a bank of the synthetic "fan" source clips, then the long recording window by window
    encoder = Encoder(mn04_real_onnx)
    fan = scan_dataset(synthetic_root, machines=["fan"]).machines["fan"]
    refs = [encoder.prepare(*read_wav(clip.path)) for clip in fan.train_by_domain()["source"]]
    bank = MemoryBank(encoder.info, {"source": embed_windows(encoder, refs)})
    scorer = BankScorer.fit(bank, ScoringConfig())
    demo = write_demo_recording(tmp_path / "demo.wav", seconds=80.0, anomaly_span=(30.0, 50.0), seed=2)
    audio, rate = read_wav(demo)
    window = encoder.info.window_samples
    model_rate_audio = resample(audio, rate, encoder.info.sample_rate)
    starts = range(0, model_rate_audio.size - window + 1, window)  # 0, 10, ..., 70 s
    scores = scorer.score(embed_windows(encoder, [model_rate_audio[s:s + window] for s in starts]))
    normal = np.r_[scores[:2], scores[6:]]  # windows 0-20 s and 60-80 s
    anomalous = scores[3:5]  # windows 30-40 s and 40-50 s lie inside the span
    assert anomalous.min() > 1.5 * normal.max(), scores
    assert normal.max() < scorer.loo_scores().max() * 1.5, scores


def test_every_scoring_knob_reaches_evaluate(mn04_random_onnx: Path, synthetic_root: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    args = parser.parse_args(["--model", str(mn04_random_onnx), "--dataset", str(synthetic_root), "--machines", "fan",
                              "--metric", "sqeuclidean", "--k-n", "2", "--k-source", "8", "--k-target", "3",
                              "--ld-k", "12", "--ld-reduce", "sum", "--feature-stats", "add",
                              "--feature-stats-eps", "0.5", "--fusion", "standardized", "--memmixup", "4,0.8",
                              "--json", "--no-progress"])
    assert run_evaluate(args) == 0
    config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]
    assert {k: config[k] for k in ("metric", "k_n", "k_source", "k_target", "ld_k", "ld_reduce", "feature_stats",
                                   "feature_stats_eps", "fusion")} == {
        "metric": "sqeuclidean", "k_n": 2, "k_source": 8, "k_target": 3, "ld_k": 12, "ld_reduce": "sum",
        "feature_stats": "add", "feature_stats_eps": 0.5, "fusion": "standardized"}
    assert config["memmixup"] == {"lam": 0.8, "k": 4}
    # the knobs change the scores computed from the same embeddings
    dataset = scan_dataset(synthetic_root, machines=["fan"])
    embeddings = embed_dataset([mn04_random_onnx], dataset, progress=False, layers="default")
    plain = score_embeddings(embeddings, ScoringConfig(feature_stats="off", fusion="mean")).sections[0].scores
    fused = score_embeddings(embeddings, ScoringConfig(feature_stats="add", fusion="standardized")).sections[0].scores
    mixed = score_embeddings(embeddings, ScoringConfig(feature_stats="off", fusion="mean"),
                             MixupSpec(0.8, 4)).sections[0].scores
    assert not np.allclose(plain, fused) and not np.allclose(plain, mixed)
    for bad in ("4", "0,0.5", "4,1.5", "a,b"):
        args = parser.parse_args(["--model", str(mn04_random_onnx), "--dataset", str(synthetic_root),
                                  "--memmixup", bad, "--no-progress"])
        with pytest.raises(ConfigError, match="--memmixup"):
            run_evaluate(args)
