"""The MQTT contract, docs/asyncapi.yaml: valid AsyncAPI 3.0 for the official parser, in step with the topics the
agent builds and the tables of docs/agent.md and docs/fleet.md, and the desired-document schema against
docs/fleet.md.

The parser is @asyncapi/parser (Node.js), pinned by .ci/asyncapi/package-lock.json and installed by
`bash .ci/setup --install`. Without it these tests skip, except under CI (the env var CI set), where they fail.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource

from edge_agent.agent.control import COMMANDS
from edge_agent.agent.mqtt import Topics, homeassistant_discovery

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "asyncapi.yaml"
SCHEMAS = REPO / "edge_agent" / "agent" / "schemas"
VALIDATOR = REPO / ".ci" / "asyncapi" / "validate.mjs"
PARSER_PACKAGE = REPO / ".ci" / "asyncapi" / "node_modules" / "@asyncapi" / "parser" / "package.json"
PREFIX = "edge-asd"
# What the <placeholders> of the docs' topic tables stand for in the topics checked here.
EXAMPLE_LEVELS = {"<prefix>": PREFIX, "<node>": "n", "<source>": "fan", "<group>": "line-1"}


def _load_doc() -> dict[str, Any]:
    return yaml.safe_load(DOC.read_text(encoding="utf-8"))


# --- (a), (b): the real AsyncAPI parser ----------------------------------------------------------------------------


def _validator_command() -> list[str]:
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("`node` is not on PATH")
    if not PARSER_PACKAGE.is_file():
        missing.append(".ci/asyncapi/node_modules is not installed")
    if missing:
        reason = f"AsyncAPI validator unavailable: {'; '.join(missing)} (bash .ci/setup --install installs it)"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI is set, so the contract must be checked", pytrace=False)
        pytest.skip(reason)
    assert node is not None
    return [node, str(VALIDATOR)]


def _run_validator(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_validator_command(), *options, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)


def test_document_is_valid_asyncapi_3() -> None:
    """The official parser, with the schema files resolved and checked, finds no error and no warning."""
    result = _run_validator(DOC, "--strict")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "AsyncAPI 3.0.0, 0 error(s), 0 warning(s): valid" in output, output


def _sandbox(tmp_path: Path, edit: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """A copy of the document and the schema files in the same layout (so its relative $refs resolve), after
    `edit(document, schemas_dir)`."""
    schemas = tmp_path / "edge_agent" / "agent" / "schemas"
    shutil.copytree(SCHEMAS, schemas)
    doc = _load_doc()
    if edit is not None:
        edit(doc, schemas)
    path = tmp_path / "docs" / "asyncapi.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _missing_channel(doc: dict[str, Any], schemas: Path) -> None:
    doc["operations"]["sendScore"]["channel"] = {"$ref": "#/channels/noSuchChannel"}


def _missing_schema_file(doc: dict[str, Any], schemas: Path) -> None:
    doc["components"]["messages"]["state"]["payload"] = {"$ref": "../edge_agent/agent/schemas/no_such_schema.json"}


def _missing_schema_pointer(doc: dict[str, Any], schemas: Path) -> None:
    message = doc["components"]["messages"]["enrollCommand"]
    message["payload"] = {"$ref": "../edge_agent/agent/schemas/command.json#/$defs/enrol"}


def _broken_schema_file(doc: dict[str, Any], schemas: Path) -> None:
    score = json.loads((schemas / "score.json").read_text())
    score["properties"]["latency_ms"]["type"] = "numbr"
    (schemas / "score.json").write_text(json.dumps(score))


def _bad_mqtt_binding(doc: dict[str, Any], schemas: Path) -> None:
    doc["operations"]["sendAlert"]["bindings"]["mqtt"]["qos"] = 3


def _undeclared_parameter(doc: dict[str, Any], schemas: Path) -> None:
    del doc["channels"]["alert"]["parameters"]["source"]


def _message_of_another_channel(doc: dict[str, Any], schemas: Path) -> None:
    doc["operations"]["sendState"]["messages"] = [{"$ref": "#/channels/alert/messages/alert"}]


BREAKAGES = {
    "operation on a missing channel": (_missing_channel, "#/channels/noSuchChannel"),
    "payload $ref to a missing file": (_missing_schema_file, "no_such_schema.json"),
    "payload $ref to a missing $defs entry": (_missing_schema_pointer, "#/$defs/enrol"),
    "invalid JSON Schema in a referenced file": (_broken_schema_file, "score.json"),
    "MQTT binding with QoS 3": (_bad_mqtt_binding, "qos"),
    "address parameter not declared": (_undeclared_parameter, "source"),
    "operation message from another channel": (_message_of_another_channel, "does not belong"),
}


def test_validator_accepts_the_sandbox_copy(tmp_path: Path) -> None:
    """The control for the negative tests: the untouched copy they start from is valid, so each of them fails
    for its own deliberate error only."""
    result = _run_validator(_sandbox(tmp_path), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_validator_rejects_a_broken_copy(tmp_path: Path, breakage: str) -> None:
    edit, expected = BREAKAGES[breakage]
    result = _run_validator(_sandbox(tmp_path, edit))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    errors = [line for line in output.splitlines() if " error " in line]
    assert errors, output
    assert any(expected in line for line in errors), output
    assert "INVALID" in output, output


# --- (c): the document against the code and the docs' topic tables ---------------------------------------------------


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follows a local `#/...` $ref of the document (one level: the document uses no chains)."""
    if isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = doc
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return target
    return node


def _channel_patterns(doc: dict[str, Any]) -> dict[str, re.Pattern[str]]:
    """Channel id -> a regex of its address, a parameter with an enum standing for exactly those values and any
    other for one topic level of a name (`[A-Za-z0-9][A-Za-z0-9_.-]*`)."""
    patterns = {}
    for channel_id, channel in doc["channels"].items():
        params = {name: _resolve(doc, p) for name, p in (channel.get("parameters") or {}).items()}
        regex = ""
        for literal, param in re.findall(r"([^{]*)(?:\{([^}]+)\})?", channel["address"]):
            regex += re.escape(literal)
            if param:
                assert param in params, f"{channel_id}: parameter {param} is not declared"
                enum = params[param].get("enum")
                regex += f"(?:{'|'.join(map(re.escape, enum))})" if enum else r"[A-Za-z0-9][A-Za-z0-9_.-]*"
        patterns[channel_id] = re.compile(regex)
    return patterns


def _operations_by_channel(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by_channel: dict[str, list[dict[str, Any]]] = {}
    for operation in doc["operations"].values():
        channel_id = operation["channel"]["$ref"].removeprefix("#/channels/")
        by_channel.setdefault(channel_id, []).append(operation)
    return by_channel


def _topics() -> Topics:
    """The agent's topics for node `n`, in group `line-1` where Topics knows groups (the fleet topics)."""
    if "groups" in {f.name for f in dataclasses.fields(Topics)}:
        return Topics(PREFIX, "n", ("line-1",))  # type: ignore[call-arg,unused-ignore]
    return Topics(prefix=PREFIX, node="n")


def _subscriptions(topics: Topics) -> list[str]:
    """The topic filters the node subscribes to (the one `+` stands for a command name)."""
    return list(getattr(topics, "subscriptions", [topics.config_set, topics.cmd_filter]))


def _code_topics() -> list[tuple[str, str]]:
    """(topic, send | receive) for every topic edge_agent/agent/mqtt.py builds."""
    topics = _topics()
    out = [(topics.status, "send"), (topics.state, "send"), (topics.alert("fan"), "send"),
           (topics.score("fan"), "send"), (topics.config_result, "send"), (topics.cmd_result, "send")]
    for topic_filter in _subscriptions(topics):
        assert topic_filter.count("+") <= 1 and "#" not in topic_filter, topic_filter
        if "+" not in topic_filter:
            out.append((topic_filter, "receive"))
            continue
        for name in COMMANDS:
            topic = topic_filter.replace("+", name)
            assert topics.command_name(topic) == name, topic
            out.append((topic, "receive"))
    discovery = homeassistant_discovery(topics, "homeassistant", [("fan.1", True)], "mn04-0123456789ab")
    assert len(discovery) == 5  # per source: anomaly, learning, drift, score; per node: the acknowledge button
    out += [(topic, "send") for topic in discovery]
    return out


def _table_rows(markdown: Path) -> list[dict[str, str]]:
    """The rows of every table whose first column is `topic`, as {header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells if cells[0] == "topic" else []
        elif header and not set(cells[0]) <= {"-", " "}:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _doc_table_topics() -> list[tuple[str, str, int, bool]]:
    """(topic, send | receive, qos, retained) from the topic tables of docs/agent.md and docs/fleet.md, with the
    placeholders filled in (<name>: every command)."""
    out: list[tuple[str, str, int, bool]] = []
    for row in _table_rows(REPO / "docs" / "agent.md"):
        qos_text, _, retain_text = row["QoS / retain"].partition(",")
        out.append((row["topic"].strip("`"), {"in": "receive", "out": "send"}[row["dir"]], int(qos_text),
                    retain_text.strip() == "retained"))
    for row in _table_rows(REPO / "docs" / "fleet.md"):
        action = "send" if row["direction"].startswith("node") else "receive"
        out.append((row["topic"].strip("`"), action, int(row["QoS"]), row["retained"] == "yes"))
    assert len(out) >= 15, out
    filled: list[tuple[str, str, int, bool]] = []
    for template, direction, qos, retain in out:
        level_filled = template
        for placeholder, value in EXAMPLE_LEVELS.items():
            level_filled = level_filled.replace(placeholder, value)
        for name in COMMANDS if "<name>" in level_filled else ("",):
            topic = level_filled.replace("<name>", name)
            assert "<" not in topic, f"unknown placeholder in {template}"
            filled.append((topic, direction, qos, retain))
    return filled


def _channel_of(topic: str, patterns: dict[str, re.Pattern[str]]) -> str:
    matching = [cid for cid, pattern in patterns.items() if pattern.fullmatch(topic)]
    assert len(matching) == 1, f"{topic} matches {matching or 'no channel'} of docs/asyncapi.yaml"
    return matching[0]


def test_every_topic_of_the_code_is_a_channel() -> None:
    doc = _load_doc()
    patterns = _channel_patterns(doc)
    operations = _operations_by_channel(doc)
    for topic, action in _code_topics():
        channel_id = _channel_of(topic, patterns)
        assert action in {op["action"] for op in operations.get(channel_id, [])}, (topic, channel_id)


def test_retained_messages_are_taken_exactly_where_the_document_says() -> None:
    """The node ignores retained messages except desired documents; the receive operations say retain: true
    for exactly those channels."""
    topics = _topics()
    doc = _load_doc()
    patterns = _channel_patterns(doc)
    operations = _operations_by_channel(doc)
    desired_origin = getattr(topics, "desired_origin", lambda topic: None)
    for topic, action in _code_topics():
        if action != "receive":
            continue
        (receive,) = [op for op in operations[_channel_of(topic, patterns)] if op["action"] == "receive"]
        assert receive["bindings"]["mqtt"]["retain"] is (desired_origin(topic) is not None), topic


def test_every_topic_of_the_docs_is_a_channel_with_its_qos_and_retain() -> None:
    doc = _load_doc()
    patterns = _channel_patterns(doc)
    operations = _operations_by_channel(doc)
    for topic, action, qos, retain in _doc_table_topics():
        channel_id = _channel_of(topic, patterns)
        ops = [op for op in operations.get(channel_id, []) if op["action"] == action]
        assert len(ops) == 1, f"{topic}: no single {action} operation on channel {channel_id}"
        binding = ops[0]["bindings"]["mqtt"]
        assert (binding["qos"], binding.get("retain", False)) == (qos, retain), (topic, binding)


def test_every_channel_is_a_topic_of_the_code_or_the_docs() -> None:
    """No stale channel: each one is built by the agent or listed in docs/agent.md or docs/fleet.md."""
    doc = _load_doc()
    patterns = _channel_patterns(doc)
    covered = {_channel_of(topic, patterns) for topic, _ in _code_topics()}
    covered |= {_channel_of(topic, patterns) for topic, *_ in _doc_table_topics()}
    assert covered == set(doc["channels"])
    assert all(ops for ops in _operations_by_channel(doc).values())
    assert set(_operations_by_channel(doc)) == set(doc["channels"])


def test_command_names_status_values_and_last_will() -> None:
    doc = _load_doc()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["components"]["parameters"]["name"]["enum"] == list(COMMANDS)
    state = json.loads((SCHEMAS / "state.json").read_text())
    status = doc["components"]["messages"]["status"]["payload"]["enum"]
    assert set(status) == {*state["properties"]["status"]["enum"], "offline"}
    will = doc["servers"]["broker"]["bindings"]["mqtt"]["lastWill"]
    assert will["topic"] == doc["channels"]["status"]["address"]
    assert will["message"] in status
    send_status = doc["operations"]["sendStatus"]["bindings"]["mqtt"]
    assert (will["qos"], will["retain"]) == (send_status["qos"], send_status["retain"])


def _message_payloads(doc: dict[str, Any]) -> dict[str, Any]:
    return {name: message["payload"] for name, message in doc["components"]["messages"].items()}


def _file_ref_validator(ref: str) -> Draft202012Validator:
    """A validator for a payload `$ref` to a schema file (optionally with a JSON pointer), relative to docs/."""
    file, _, pointer = ref.partition("#")
    schema = json.loads((DOC.parent / file).read_text(encoding="utf-8"))
    registry: Registry = Registry().with_resource(schema["$id"], Resource.from_contents(schema))
    target = {"$ref": f"{schema['$id']}#{pointer}"} if pointer else schema
    return Draft202012Validator(target, registry=registry)


def test_every_payload_ref_is_a_schema_file_and_every_schema_file_is_used() -> None:
    doc = _load_doc()
    used = set()
    for name, payload in _message_payloads(doc).items():
        ref = payload.get("$ref", "")
        if not ref or ref.startswith("#"):
            continue  # inline (plain text, config push, Home Assistant): no schema file of the agent
        file, _, pointer = ref.partition("#")
        path = (DOC.parent / file).resolve()
        assert path.is_file(), f"{name}: {ref} does not exist"
        assert path.parent == SCHEMAS, f"{name}: {ref} is not one of edge_agent/agent/schemas/"
        used.add(path.name)
        schema = json.loads(path.read_text(encoding="utf-8"))
        node = schema
        for part in pointer.lstrip("/").split("/") if pointer else ():
            assert isinstance(node, dict) and part in node, f"{name}: {ref}: no {part!r} in {file}"
            node = node[part]
    assert used == {p.name for p in SCHEMAS.glob("*.json")}


def test_schema_files_share_one_draft_and_are_valid() -> None:
    drafts = set()
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        drafts.add(schema["$schema"])
        validator_for(schema).check_schema(schema)
        assert schema["$id"].endswith(f"/{path.name}")
    assert drafts == {"https://json-schema.org/draft/2020-12/schema"}


def test_message_examples_match_their_payload_schemas() -> None:
    """The parser does not check AsyncAPI 3 message examples; this does, with the schemas' own draft."""
    doc = _load_doc()
    checked = 0
    for name, message in doc["components"]["messages"].items():
        payload = _resolve(doc, message["payload"])
        ref = payload.get("$ref")
        validator = _file_ref_validator(ref) if ref else Draft202012Validator(payload)
        for example in message.get("examples", []):
            errors = [e.message for e in validator.iter_errors(example["payload"])]
            assert not errors, (name, example.get("name"), errors)
            checked += 1
    assert checked >= 4


# --- (d): desired.json against docs/fleet.md -------------------------------------------------------------------------


def _desired_validator() -> Draft202012Validator:
    schema = json.loads((SCHEMAS / "desired.json").read_text(encoding="utf-8"))
    assert validator_for(schema) is Draft202012Validator
    return Draft202012Validator(schema)


def _fleet_example() -> dict[str, Any]:
    text = (REPO / "docs" / "fleet.md").read_text(encoding="utf-8")
    section = text.split("## The desired document", 1)[1]
    match = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert match, "docs/fleet.md: no ```json block in 'The desired document'"
    return json.loads(match.group(1))


def test_desired_schema_accepts_the_fleet_example() -> None:
    example = _fleet_example()
    assert example["version"] == 7 and example["target"] == "group/line-1"
    assert [e.message for e in _desired_validator().iter_errors(example)] == []


def _at(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with `value` set at the dotted `path` (None: the key removed)."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return out


REJECTED = {
    "version 0": ("version", 0, ("version",)),
    "version missing": ("version", None, ()),
    "version not an integer": ("version", 7.5, ("version",)),
    "mqtt in config": ("config.mqtt", {"host": "broker.example"}, ("config",)),
    "node in config": ("config.node", "n2", ("config",)),
    "source key device": ("config.sources.press.device", "hw:1", ("config", "sources", "press")),
    "source key name": ("config.sources.*.name", "x", ("config", "sources", "*")),
    "bank sha256 of 63 hex": ("config.sources.press.bank.sha256", "4" * 63, ("config", "sources", "press", "bank")),
    "bank size 0": ("config.sources.press.bank.size", 0, ("config", "sources", "press", "bank")),
    "bank ftp url": ("config.sources.press.bank.url", "ftp://x/b.tgz", ("config", "sources", "press", "bank")),
    "model with path and url": ("config.model.path", "/m.onnx", ("config", "model")),
    "model and models": ("config.models", [{"path": "/a.onnx"}, {"path": "/b.onnx"}], ("config",)),
    "ensemble of one": ("config.models", [{"path": "/a.onnx"}], ("config",)),
    "bad target": ("target", "nodes/line-1", ("target",)),
    "signed without target": ("target", None, ()),
    "signature not base64": ("signature", "not base64!", ("signature",)),
    "id too long": ("id", "x" * 129, ("id",)),
    "unknown top-level key": ("fleet", {"groups": ["a"]}, ()),
    "artifact version not a string": ("config.model.version", 3, ("config", "model")),
    "ensemble of nine": ("config.models", [{"path": f"/{i}.onnx"} for i in range(9)], ("config",)),
    "source name with a slash": ("config.sources.a/b", {"threshold": 1.0}, ("config", "sources")),
}

ACCEPTED = {
    "minimal": {"version": 1, "config": {}},
    "local model and bank paths": {"version": 2, "config": {
        "model": {"path": "/var/lib/edge-agent/models/mn04.onnx", "providers": ["cpu"], "intra_op_threads": 2},
        "sources": {"fan": {"bank": "/var/lib/edge-agent/banks/fan", "threshold": 1.2, "publish_scores": True,
                            "hysteresis": {"raise_after": 3}, "scoring": {"k_n": 5}, "enroll": {"windows": 20},
                            "audio_checks": {"rms_floor": 0}, "window_seconds": 10, "hop_seconds": 5}}}},
    "ensemble of artifacts": {"version": 3, "target": "node/line3-fan-07", "config": {"models": [
        {"url": "https://u.example/a.onnx", "sha256": "a" * 64, "size": 10, "version": "v1"},
        {"url": "http://u.example/b.onnx", "sha256": "b" * 64, "size": 20, "providers": ["auto"]}]}},
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_desired_schema_rejects(case: str) -> None:
    path, value, where = REJECTED[case]
    doc = _at(_fleet_example(), path, value)
    errors = list(_desired_validator().iter_errors(doc))
    assert errors, f"{case}: accepted"
    for error in errors:  # refused for this reason only
        assert tuple(error.absolute_path)[:len(where)] == where, (case, list(error.absolute_path), error.message)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_desired_schema_accepts(case: str) -> None:
    assert [e.message for e in _desired_validator().iter_errors(ACCEPTED[case])] == []


def test_desired_schema_keys_are_the_agents() -> None:
    """desired.json allows exactly the keys the agent's own check of a document allows (edge_agent/agent/desired.py)."""
    from edge_agent.agent import desired
    schema = json.loads((SCHEMAS / "desired.json").read_text(encoding="utf-8"))
    defs = schema["$defs"]
    local_model, artifact_model = (set(s["properties"]) for s in defs["model"]["oneOf"])
    assert set(schema["properties"]) == set(desired.DOCUMENT_KEYS)
    assert set(defs["overlay"]["properties"]) == set(desired.OVERLAY_KEYS)
    assert set(defs["sourceOverlay"]["properties"]) == set(desired.SOURCE_KEYS)
    assert local_model == set(desired.MODEL_KEYS)
    assert artifact_model == (set(desired.MODEL_KEYS) - {"path"}) | set(desired.ARTIFACT_KEYS)
    assert set(defs["bank"]["oneOf"][1]["properties"]) == set(desired.ARTIFACT_KEYS)
    overlay_models = defs["overlay"]["properties"]["models"]
    assert (overlay_models["minItems"], overlay_models["maxItems"]) == (2, desired.MAX_MODELS)
    assert schema["properties"]["version"]["maximum"] == desired.MAX_VERSION
    assert schema["properties"]["id"]["maxLength"] == desired.MAX_REQUEST_ID
