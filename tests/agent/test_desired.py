"""Desired documents: what a node accepts (shape, keys, signature, target), how documents rank, how an
overlay goes onto the local config, and what the node remembers across restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent.config import ControlConfig, FleetConfig, build_config
from edge_agent.agent.desired import (
    DesiredState,
    apply_overlay,
    check_overlay,
    parse_document,
    rank,
)
from edge_agent.agent.signing import encode_public_key, new_private_key, sign
from edge_agent.errors import ConfigError

LIMITS = ControlConfig().limits(ControlConfig().max_config_bytes)
SHA = "ab" * 32


def _parse(doc: Any, origin: str = "node", fleet: FleetConfig | None = None) -> Any:
    payload = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_document(payload, origin, "n1", fleet or FleetConfig(groups=["line-1"]), LIMITS)


def test_a_valid_document_with_artifacts_is_parsed() -> None:
    doc = _parse({"version": 3, "id": "r3", "target": "group/line-1", "config": {
        "model": {"url": "https://u.example/m.onnx", "sha256": SHA, "size": 5000, "version": "v3",
                  "providers": ["cpu"]},
        "sources": {"*": {"threshold": 1.5, "hysteresis": {"raise_after": 3}},
                    "press": {"bank": {"url": "http://u.example/b.tar.gz", "sha256": "cd" * 32, "size": 10}}}}},
        origin="group/line-1")
    assert (doc.version, doc.id, doc.origin) == (3, "r3", "group/line-1")
    assert set(doc.artifacts) == {"config.model", "config.sources.press.bank"}
    assert doc.artifacts["config.model"].version == "v3" and doc.artifacts["config.sources.press.bank"].kind == "bank"


@pytest.mark.parametrize(("doc", "path", "message"), [
    ({"version": 0, "config": {}}, "version", "integer in"),
    ({"version": True, "config": {}}, "version", "integer in"),
    ({"version": 1.5, "config": {}}, "version", "integer in"),
    ({"version": 2**60, "config": {}}, "version", "integer in"),
    ({"version": 1}, "config", "is required"),
    ({"version": 1, "config": {}, "extra": 1}, "extra", "unknown key"),
    ({"version": 1, "config": {}, "id": "x" * 129}, "id", "1 to 128"),
    ({"version": 1, "config": {}, "target": "node/other"}, "target", "not the topic"),
    ({"version": 1, "config": {"mqtt": {"host": "evil"}}}, "config.mqtt", "node-specific"),
    ({"version": 1, "config": {"node": "x"}}, "config.node", "node-specific"),
    ({"version": 1, "config": {"sources": {"*": {"device": "hw:1"}}}}, "config.sources.*.device", "node-specific"),
    ({"version": 1, "config": {"sources": {"a": {"name": "b"}}}}, "config.sources.a.name", "node-specific"),
    ({"version": 1, "config": {"sources": {"a": {"threshold": "high"}}}}, "config.sources.a.threshold", "number"),
    ({"version": 1, "config": {"sources": {"a": {"hop_seconds": -1}}}}, "config.sources.a.hop_seconds", ">"),
    ({"version": 1, "config": {"sources": {"a b": {}}}}, "config.sources.a b", "must match"),
    ({"version": 1, "config": {"sources": ["a"]}}, "config.sources", "mapping"),
    ({"version": 1, "config": {"model": {"path": "m.onnx"}, "models": []}}, "config.models", "not both"),
    ({"version": 1, "config": {"model": {"path": "m.onnx", "url": "https://x/m", "sha256": SHA, "size": 1}}},
     "config.model.path", "not both"),
    ({"version": 1, "config": {"model": {"providers": ["cpu"]}}}, "config.model.path", "is required"),
    ({"version": 1, "config": {"model": {"url": "ftp://x/m.onnx", "sha256": SHA, "size": 1}}}, "config.model.url", ""),
    ({"version": 1, "config": {"model": {"url": "https://x/m.onnx", "sha256": "ab", "size": 1}}},
     "config.model.sha256", ""),
    ({"version": 1, "config": {"sources": {"a": {"bank": {"url": "https://x/b", "sha256": SHA, "size": 0}}}}},
     "config.sources.a.bank.size", ""),
    ({"version": 1, "config": {"models": [{"path": "a.onnx"}]}}, "config.models", "2 to"),
])
def test_bad_documents_are_refused_naming_the_key(doc: dict, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(doc)
    assert info.value.path == path, (info.value.path, info.value.message)
    assert message in info.value.message


def test_not_json_and_oversized_documents_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"JSON|json"):
        _parse(b"version: 1\nconfig: {}")
    with pytest.raises(ConfigError, match="bytes"):
        _parse(json.dumps({"version": 1, "config": {"sources": {"*": {"threshold": 1.0}}}, "id": "x" * 300_000})
               .encode())


def test_signatures_are_required_checked_and_bound_to_the_topic() -> None:
    key, other = new_private_key(), new_private_key()
    fleet = FleetConfig(groups=["line-1"], trusted_keys=[encode_public_key(other.public_key()),
                                                         encode_public_key(key.public_key())])
    doc = {"version": 4, "target": "group/line-1", "config": {"sources": {"*": {"threshold": 2.0}}}}
    assert _parse(sign(doc, key), "group/line-1", fleet).version == 4
    with pytest.raises(ConfigError, match="not signed") as info:
        _parse(doc, "group/line-1", fleet)
    assert info.value.path == "signature"
    tampered = {**sign(doc, key), "version": 5}
    with pytest.raises(ConfigError, match="not made by any"):
        _parse(tampered, "group/line-1", fleet)
    stranger = new_private_key()
    with pytest.raises(ConfigError, match="not made by any"):
        _parse(sign(doc, stranger), "group/line-1", fleet)
    # replayed onto another topic: the signed target says where it belongs
    with pytest.raises(ConfigError, match="not the topic") as info:
        _parse(sign(doc, key), "node", fleet)
    assert info.value.path == "target"
    untargeted = {k: v for k, v in doc.items() if k != "target"}
    with pytest.raises(ConfigError, match="required in a signed document"):
        _parse(sign(untargeted, key), "group/line-1", fleet)


def test_rank_highest_version_then_node_over_group_then_group_order() -> None:
    groups = ["line-1", "site"]
    assert rank(5, "group/line-1", groups) > rank(4, "node", groups)
    assert rank(5, "node", groups) > rank(5, "group/line-1", groups)
    assert rank(5, "group/line-1", groups) > rank(5, "group/site", groups)


def test_overlay_goes_onto_the_local_config(tmp_path: Path) -> None:
    base = {"node": "n1", "state_dir": str(tmp_path / "state"), "model": {"path": "old.onnx"},
            "sources": [{"name": "fan", "type": "stdin", "sample_rate": 16000, "bank": "banks/fan",
                         "hysteresis": {"raise_after": 2, "clear_after": 4}, "device": "kept"},
                        {"name": "press", "type": "mic", "bank": "banks/press"}]}
    overlay = {"model": {"url": "https://u/m.onnx", "sha256": SHA, "size": 9, "providers": ["cpu"]},
               "sources": {"*": {"threshold": 2.0, "hysteresis": {"raise_after": 5}},
                           "press": {"threshold": 3.0, "bank": {"url": "https://u/b.tar", "sha256": SHA, "size": 9}},
                           "pump": {"threshold": 9.0}}}
    artifacts = check_overlay(overlay, 10**9)
    paths = {"config.model": tmp_path / "store" / "m.onnx", "config.sources.press.bank": tmp_path / "store" / "bank"}
    assert set(artifacts) == set(paths)
    merged, ignored = apply_overlay(base, overlay, paths)
    assert ignored == ["pump"]
    assert merged["model"] == {"path": str(paths["config.model"]), "providers": ["cpu"]}
    fan, press = merged["sources"]
    assert fan["threshold"] == 2.0 and fan["hysteresis"] == {"raise_after": 5, "clear_after": 4}
    assert fan["device"] == "kept" and fan["bank"] == "banks/fan"
    assert press["threshold"] == 3.0 and press["bank"] == str(paths["config.sources.press.bank"])
    assert base["sources"][0]["hysteresis"] == {"raise_after": 2, "clear_after": 4}, "the base is not changed"
    cfg = build_config(merged, base_dir=tmp_path)
    assert [s.threshold for s in cfg.sources] == [2.0, 3.0]


def test_desired_state_survives_a_restart_and_a_corrupt_file_is_reported(tmp_path: Path) -> None:
    state = DesiredState(tmp_path)
    assert state.tried_rank(["g"]) == (0, 0, 0)
    doc = _parse({"version": 7, "config": {"sources": {"*": {"threshold": 2.0}}}}, origin="node")
    state.record(doc, "trial")
    state.commit(doc, {}, "0123456789abcdef")
    again = DesiredState(tmp_path)
    assert again.applied is not None and again.applied.document["version"] == 7
    assert again.last is not None and again.last.status == "committed"
    assert again.tried_rank(["g"]) == rank(7, "node", ["g"])
    again.start_failed("the model file is gone")
    third = DesiredState(tmp_path)
    assert third.applied is None and third.previous is not None
    assert third.last is not None and (third.last.status, third.last.version) == ("rolled_back", 7)
    state.path.write_text("{not json")
    broken = DesiredState(tmp_path)
    assert broken.applied is None and broken.problem is not None and "unreadable" in broken.problem
