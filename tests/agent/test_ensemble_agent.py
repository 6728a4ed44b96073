"""The agent with `models:` (an ensemble of two toy encoders at 8 and 16 kHz) and an ensemble bank."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from edge_agent.agent.config import load_config
from edge_agent.agent.daemon import Agent
from edge_agent.audio.wavio import read_wav, write_wav
from edge_agent.errors import ConfigError
from edge_agent.model.encoder import Encoder
from edge_agent.model.model_set import ModelSet
from edge_agent.model_info import ModelInfo
from edge_agent.scoring.bank_set import ENSEMBLE_JSON, load_banks
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import enroll
from edge_agent.scoring.scorer import BankScorer, Scorer

from .agent_helpers import (
    BASE,
    RATE,
    REPO,
    Mosquitto,
    Watcher,
    agent_command,
    build_bank,
    noise,
    start_agent,
    stop_agent,
    write_anomaly_wav,
    write_config,
)

WIDE_RATE = 16000  # the second encoder's rate: one-second windows of 16000 samples


def write_abs_model(path: Path) -> Path:
    """waveform [B, 16000] -> layer_1: mean |x| per position of 32-sample frames, layer_2: peak |x|."""
    frame = 32
    info = ModelInfo(family="toy", variant="abs32", sample_rate=WIDE_RATE, window_samples=WIDE_RATE,
                     layers=("layer_1", "layer_2"), dims=(frame, frame), default_layers=("layer_1",),
                     checkpoint_sha256="ef" * 32, exporter_version="agent-test")
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, WIDE_RATE // frame, frame])
    nodes = [
        helper.make_node("Reshape", ["waveform", "shape"], ["frames"]),
        helper.make_node("Abs", ["frames"], ["magnitude"]),
        helper.make_node("ReduceMean", ["magnitude"], ["layer_1"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["magnitude"], ["layer_2"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "abs32",
        [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["batch", WIDE_RATE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", frame]) for n in ("layer_1", "layer_2")],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, info.to_metadata())
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def abs_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_abs_model(tmp_path_factory.mktemp("abs_model") / "abs32.onnx")


def build_ensemble_bank(models: list[Path], bank_dir: Path, windows: int = 24, amplitude: float = 0.05,
                        seed: int = 1) -> None:
    """One-second noise windows at 8 kHz, resampled per model, enrolled as an ensemble bank."""
    model_set = ModelSet([Encoder(p) for p in models])
    clips = noise(windows, amplitude, seed).reshape(windows, RATE)
    embs = model_set.embed(model_set.prepare([(c, RATE) for c in clips]))
    names = {"source": [f"noise_{i:03d}" for i in range(windows)]}
    enroll(bank_dir, model_set.members, [{"source": e} for e in embs], names, ScoringConfig(normalizer="ld-domain"))


def _agent_config(tmp_path: Path, models: list[Path], bank: Path, wav: Path, extra: str = "") -> Path:
    cfg = tmp_path / "agent.yaml"
    model_lines = "".join(f"  - {{path: {p}}}\n" for p in models)
    cfg.write_text(f"""
node: ens-node
models:
{model_lines}sources:
  - {{name: fan, type: file, path: {wav}, realtime: false, bank: {bank}, window_seconds: 1, hop_seconds: 1,
      publish_scores: true}}
output: {{jsonl: out/alerts.jsonl}}
metrics: {{enabled: false}}
{extra}""")
    return cfg


def test_agent_with_two_models_scores_the_mean_and_alerts_to_jsonl(tmp_path: Path, toy_model: Path,
                                                                   abs_model: Path, validators: dict) -> None:
    models = [toy_model, abs_model]
    bank = tmp_path / "bank"
    build_ensemble_bank(models, bank)
    wav = write_anomaly_wav(tmp_path / "fan.wav", 12, (4, 8))
    cfg = _agent_config(tmp_path, models, bank, wav)
    result = subprocess.run(agent_command(cfg), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    scores = [x for x in lines if "type" not in x]
    alerts = [x for x in lines if "type" in x]
    for s in scores:
        validators["score"].validate(s)
    for a in alerts:
        validators["alert"].validate(a)

    encoders = [Encoder(p) for p in models]
    model_id = "+".join(e.model_id for e in encoders)
    assert {s["model"] for s in scores} == {model_id} and {a["model"] for a in alerts} == {model_id}
    ensemble = load_banks(bank, ModelSet(encoders).members)
    assert scores[0]["threshold"] == pytest.approx(ensemble.threshold["value"])
    assert [s["over"] for s in scores] == [4 <= i < 8 for i in range(12)]
    assert [a["type"] for a in alerts][0::max(1, len(alerts) - 1)] == ["new", "end"]

    # the agent's score is the mean of the members' normalized scores of the window, each resampled
    # from the file's 8 kHz to its own model's rate
    audio, rate = read_wav(wav)
    windows = [(audio[i * rate:(i + 1) * rate], rate) for i in range(12)]
    model_set = ModelSet(encoders)
    embs = model_set.embed(model_set.prepare(windows))
    scorers = [BankScorer.fit(b, ScoringConfig()) for b in ensemble.banks]
    members = [s.score(e) for s, e in zip(scorers, embs, strict=True)]
    # standardized members: z-units, where float32 embeddings of a window give differences ~1e-5 near 0
    np.testing.assert_allclose([s["score"] for s in scores], np.mean(members, axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(Scorer(scorers).score(embs), np.mean(members, axis=0))
    assert not np.allclose(members[0], members[1])


def test_state_lists_every_model_and_config_errors_name_the_key(tmp_path: Path, toy_model: Path,
                                                                abs_model: Path, validators: dict) -> None:
    models = [toy_model, abs_model]
    build_ensemble_bank(models, tmp_path / "bank")
    build_bank(toy_model, tmp_path / "plain")
    wav = write_anomaly_wav(tmp_path / "fan.wav", 4, (1, 2))
    cfg_path = _agent_config(tmp_path, models, tmp_path / "bank", wav)
    agent = Agent(load_config(cfg_path), cfg_path)
    state = agent.state()
    validators["state"].validate(state)
    model = state["model"]
    assert model["family"] == "ensemble" and model["variant"] == "power16+abs32"
    assert model["sample_rate"] == WIDE_RATE  # captured at the highest member rate
    assert [m["variant"] for m in model["members"]] == ["power16", "abs32"]
    assert [m["sample_rate"] for m in model["members"]] == [RATE, WIDE_RATE]
    assert agent.runtime.pipelines["fan"].source.model_rate == WIDE_RATE

    doc = yaml.safe_load(cfg_path.read_text())

    def error(change) -> ConfigError:  # type: ignore[no-untyped-def]
        d = json.loads(json.dumps(doc))
        change(d)
        cfg_path.write_text(yaml.safe_dump(d))
        with pytest.raises(ConfigError) as info:
            Agent(load_config(cfg_path), cfg_path)
        assert str(info.value).startswith(f"{cfg_path}: {info.value.path}")
        return info.value

    assert error(lambda d: d.update(model={"path": str(toy_model)})).path == "models"
    assert error(lambda d: d.pop("models")).path == "model"
    assert error(lambda d: d.update(models=[{"path": str(toy_model)}])).path == "models"
    assert error(lambda d: d["models"].append({"path": str(toy_model)})).path == "models[2].path"
    assert error(lambda d: d["models"][1].update(providers=[])).path == "models[1].providers"
    exc = error(lambda d: d["models"][1].update(path=str(tmp_path / "nope.onnx")))
    assert exc.path == "models[1].path" and "nope.onnx" in str(exc)
    exc = error(lambda d: d["sources"][0].update(bank=str(tmp_path / "plain")))
    assert exc.path == "sources[0].bank" and "a single-model bank (bank.json)" in str(exc)
    exc = error(lambda d: (d.pop("models"), d.update(model={"path": str(toy_model)})))
    assert exc.path == "sources[0].bank" and "an ensemble bank of 2 models" in str(exc)
    other = write_abs_variant(tmp_path / "other.onnx")
    exc = error(lambda d: d["models"].__setitem__(1, {"path": str(other)}))
    assert exc.path == "sources[0].bank" and "no model given for member(s) abs32" in str(exc)


def write_abs_variant(path: Path) -> Path:
    """The abs32 graph with another checkpoint hash: a different model, not a member of the bank."""
    write_abs_model(path)
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key == "checkpoint_sha256":
            prop.value = "01" * 32
    onnx.save(model, path)
    return path


def test_enroll_over_mqtt_rebuilds_every_member_and_recalibrates_the_ensemble(
        tmp_path: Path, toy_model: Path, abs_model: Path, broker: Mosquitto, watcher: Watcher,
        validators: dict) -> None:
    models = [toy_model, abs_model]
    bank = tmp_path / "bank"
    build_ensemble_bank(models, bank)
    wav = tmp_path / "target_domain.wav"
    write_wav(wav, noise(10, 0.15, seed=11), RATE)  # louder than the bank's source domain
    cfg = write_config(tmp_path, toy_model, bank, broker.port, wav, realtime=True, loop=True, speed=10,
                       extra_source="    publish_scores: true\n")
    doc = yaml.safe_load(cfg.read_text())
    doc.pop("model")
    doc["models"] = [{"path": str(p)} for p in models]
    cfg.write_text(yaml.safe_dump(doc))
    member_set = ModelSet([Encoder(p) for p in models])
    before_bank = load_banks(bank, member_set.members)
    log = tmp_path / "agent.log"
    proc = start_agent(cfg, log)
    scores_topic = f"{BASE}/fan/score"
    try:
        watcher.wait_for(lambda m: len(watcher.on(scores_topic)) >= 3, what="scores from the running agent")
        before = [s["score"] for s in watcher.on(scores_topic)]
        watcher.publish(f"{BASE}/cmd/enroll", json.dumps({"id": "enroll-e", "windows": 6}))
        watcher.wait_for(lambda m: watcher.on(f"{BASE}/cmd/result"), timeout=60, what="enroll result")
        result = watcher.on(f"{BASE}/cmd/result")[0]
        validators["cmd_result"].validate(result)
        assert result["ok"] is True, result

        after_bank = load_banks(bank, member_set.members)
        assert [b.count_raw("target") for b in after_bank.banks] == [6, 6]
        assert after_bank.banks[0].names == after_bank.banks[1].names
        assert after_bank.threshold["value"] != before_bank.threshold["value"]
        assert result["result"]["bank"] == after_bank.content_hash()[:12]
        assert result["result"]["calibrated_threshold"] == pytest.approx(after_bank.threshold["value"])
        # the recalibrated threshold is the one of the mean leave-one-out scores
        loo = Scorer([BankScorer.fit(b, ScoringConfig()) for b in after_bank.banks]).loo_scores()
        assert after_bank.threshold["n"] == loo.size == 24 + 6
        doc_after = json.loads((bank / ENSEMBLE_JSON).read_text())
        assert not [p for p in bank.iterdir() if p.name not in
                    {ENSEMBLE_JSON, *(m["subdir"] for m in doc_after["members"])}]

        n = len(watcher.on(scores_topic))
        watcher.wait_for(lambda m: len(watcher.on(scores_topic)) >= n + 5, what="scores after enroll")
        after = [s for s in watcher.on(scores_topic)[n:] if s["bank"] == result["result"]["bank"]]
        assert len(after) >= 3
        assert np.median([s["score"] for s in after]) < 0.5 * np.median(before)
        watcher.publish(f"{BASE}/cmd/status", json.dumps({"id": "st"}))
        watcher.wait_for(lambda m: len(watcher.on(f"{BASE}/cmd/result")) >= 2, what="status result")
        status = watcher.on(f"{BASE}/cmd/result")[1]["result"]
        validators["state"].validate(status)
        assert status["sources"][0]["bank"]["counts"]["target"] == 6
        assert len(status["model"]["members"]) == 2
    finally:
        assert stop_agent(proc, log) == 0, log.read_text()
