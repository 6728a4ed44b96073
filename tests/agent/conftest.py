"""Fixtures for the agent tests: the toy encoder, a bank, a mosquitto broker, a paho watcher."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from .agent_helpers import Mosquitto, Watcher, build_bank, write_power_model


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_power_model(tmp_path_factory.mktemp("toy_model") / "power16.onnx")


@pytest.fixture
def bank_dir(tmp_path: Path, toy_model: Path) -> Path:
    build_bank(toy_model, tmp_path / "bank")
    return tmp_path / "bank"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    server = Mosquitto(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def watcher(broker: Mosquitto) -> Iterator[Watcher]:
    w = Watcher(broker.port)
    yield w
    w.close()


def load_schema(name: str) -> dict:
    return json.loads(resources.files("edge_agent.agent").joinpath("schemas", f"{name}.json").read_text())


@pytest.fixture(scope="session")
def validators() -> dict[str, jsonschema.Draft202012Validator]:
    out = {}
    for name in ("alert", "score", "state", "config_result", "cmd_result"):
        schema = load_schema(name)
        jsonschema.Draft202012Validator.check_schema(schema)
        out[name] = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    return out
