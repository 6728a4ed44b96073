"""Config validation: every error names the file, the key path and the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_agent.agent.config import (
    AgentConfig,
    load_config,
    load_default_config,
    parse_config,
    write_config_atomic,
)
from edge_agent.errors import ConfigError


def _base(tmp_path: Path) -> dict:
    (tmp_path / "a.wav").write_bytes(b"")
    return {
        "node": "n1",
        "model": {"path": "model.onnx"},
        "sources": [{"name": "fan", "type": "file", "path": "a.wav", "bank": "banks/fan"}],
    }


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _error(tmp_path: Path, doc: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, doc))
    return info.value


def test_minimal_config_gets_documented_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base(tmp_path)))
    assert isinstance(cfg, AgentConfig)
    src = cfg.sources[0]
    assert src.path == tmp_path / "a.wav" and src.bank == tmp_path / "banks/fan"
    assert cfg.model.path == tmp_path / "model.onnx"
    assert (src.window_seconds, src.hop_seconds, src.realtime, src.loop) == (10.0, 10.0, True, False)
    assert (src.hysteresis.raise_after, src.hysteresis.clear_after) == (2, 2)
    assert cfg.mqtt is None and cfg.metrics.host == "127.0.0.1"
    assert cfg.spool_dir == tmp_path / "state" / "spool"
    assert len(cfg.config_hash) == 16 and cfg.source_file == str(tmp_path / "agent.yaml")


@pytest.mark.parametrize(("change", "path", "value"), [
    (lambda d: d["sources"][0].update(hop_seconds=-1), "sources[0].hop_seconds", -1),
    (lambda d: d["sources"][0].update(hop_seconds=20), "sources[0].hop_seconds", 20.0),
    (lambda d: d["sources"][0].update(window_seconds="ten"), "sources[0].window_seconds", "ten"),
    (lambda d: d["sources"][0].update(colour="red"), "sources[0].colour", None),
    (lambda d: d.update(mqtt={"port": 70000}), "mqtt.port", 70000),
    (lambda d: d.update(mqtt={"port": True}), "mqtt.port", True),
    (lambda d: d["sources"][0].update(type="radio"), "sources[0].type", "radio"),
    (lambda d: d["sources"][0].update(name="bad/name"), "sources[0].name", "bad/name"),
    (lambda d: d["sources"][0]["hysteresis"].update(raise_after=0) if "hysteresis" in d["sources"][0]
     else d["sources"][0].update(hysteresis={"raise_after": 0}), "sources[0].hysteresis.raise_after", 0),
    (lambda d: d["sources"].append(dict(d["sources"][0])), "sources[1].name", "fan"),
    (lambda d: d["sources"][0].update(path="missing.wav"), "sources[0].path", None),
    (lambda d: d["sources"][0].update(learn={"minutes": 0}), "sources[0].learn.minutes", 0),
    (lambda d: d["sources"][0].update(learn={"domain": "both"}), "sources[0].learn.domain", "both"),
    (lambda d: d["sources"][0].update(feedback={"max_refs": 0}), "sources[0].feedback.max_refs", 0),
    (lambda d: d["sources"][0].update(drift={"windows": 1}), "sources[0].drift.windows", 1),
    (lambda d: d.update(evidence={"max_bytes": 10}), "evidence.max_bytes", 10),
    (lambda d: d.update(evidence={"pre_roll_seconds": "a lot"}), "evidence.pre_roll_seconds", "a lot"),
    (lambda d: d.update(sources=[]), "sources", []),
    (lambda d: d["sources"][0].update(type="stdin", path=None), "sources[0].sample_rate", None),
    (lambda d: d.update(logging={"level": "loud"}), "logging.level", "loud"),
    (lambda d: d.update(mqtt={"password": "x", "password_env": "Y"}), "mqtt.password_env", None),
    (lambda d: d.update(mqtt={"tls": {"ca_file": "nope.pem"}}), "mqtt.tls.ca_file", None),
])
def test_errors_name_file_key_path_and_value(tmp_path: Path, change, path: str, value: object) -> None:  # type: ignore[no-untyped-def]
    doc = _base(tmp_path)
    change(doc)
    if doc["sources"] and doc["sources"][0].get("path") is None:
        doc["sources"][0].pop("path", None)
    exc = _error(tmp_path, doc)
    assert exc.path == path
    message = str(exc)
    assert message.startswith(str(tmp_path / "agent.yaml") + ": " + path)
    if value is not None:
        assert exc.value == value and repr(value) in message


def test_yaml_syntax_and_top_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match=r"agent\.yaml: line \d+: not valid YAML"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_password_from_file_or_environment(tmp_path: Path) -> None:
    doc = _base(tmp_path)
    (tmp_path / "secret").write_text("s3cret\n")
    doc["mqtt"] = {"username": "agent", "password_file": "secret"}
    assert load_config(_write(tmp_path, doc)).mqtt_password == "s3cret"
    doc["mqtt"] = {"username": "agent", "password_env": "EDGE_MQTT_PW"}
    text = yaml.safe_dump(doc)
    assert parse_config(text, base_dir=tmp_path, env={"EDGE_MQTT_PW": "pw"}).mqtt_password == "pw"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, env={})
    assert info.value.path == "mqtt.password_env" and "EDGE_MQTT_PW" in str(info.value)
    doc["mqtt"] = {"password_file": "nope"}
    assert _error(tmp_path, doc).path == "mqtt.password_file"


def test_client_id_is_unique_per_node(tmp_path: Path) -> None:
    doc = _base(tmp_path)
    doc["mqtt"] = {}
    assert load_config(_write(tmp_path, doc)).client_id == "edge-agent-n1"
    doc["node"] = "n2"
    assert load_config(_write(tmp_path, doc)).client_id == "edge-agent-n2"


def test_embedded_default_config_is_the_file_demo_without_mqtt(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    monkeypatch.chdir(demo.parent.parent)
    try:
        cfg = load_default_config()
    except ConfigError as exc:  # the demo wav is produced by the main job; only that may be missing
        assert exc.path == "sources[0].path", exc
        return
    assert cfg.mqtt is None and cfg.sources[0].type in ("file", "folder")


def test_atomic_write_replaces_the_file_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("old")
    path.chmod(0o640)
    write_config_atomic(path, "new: 1\n")
    assert path.read_text() == "new: 1\n" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["agent.yaml"]


def test_example_configs_use_only_known_keys() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    production = (configs / "production.yaml").read_text()
    with pytest.raises(ConfigError) as info:
        parse_config(production, source="production.yaml", env={})
    # every key and value before the TLS files is valid; the files exist only on a device
    assert info.value.path == "mqtt.tls.ca_file"
    demo = parse_config((configs / "demo.yaml").read_text().replace("../work/demo/recording.wav", __file__)
                        .replace("type: file", "type: file"), source="demo.yaml", base_dir=configs)
    assert demo.mqtt is None and demo.state_dir == configs / "../work"
