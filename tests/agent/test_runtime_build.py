"""Building a runtime from a config: errors name the key path; unchanged parts are reused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edge_agent.agent.config import parse_config
from edge_agent.agent.runtime import build_runtime
from edge_agent.errors import ConfigError
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.bank_set import BankSet, load_banks
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import LAYER_HINT

from .agent_helpers import build_bank

MISSING_LAYER = ("not in the bank (it has layer_1, layer_2, the outputs of the export it was enrolled from; "
                 f"{LAYER_HINT})")


def _banks(model: Path, bank_dir: Path) -> BankSet:
    return load_banks(bank_dir, [Encoder(model).member])


def _cfg(tmp_path: Path, model: Path, bank: Path, source_extra: str = ""):  # type: ignore[no-untyped-def]
    (tmp_path / "a.wav").write_bytes(b"")
    return parse_config(f"""
node: n
model: {{path: {model}}}
sources:
  - {{name: fan, type: file, path: a.wav, bank: {bank}{source_extra}}}
""", source="agent.yaml", base_dir=tmp_path)


@pytest.mark.parametrize(("extra", "path"), [
    (", scoring: {normalizer: magic}", "sources[0].scoring.normalizer"),
    (", scoring: {k_n: 0}", "sources[0].scoring.k_n"),
    (", scoring: {layers: [layer_9]}", "sources[0].scoring.layers"),
    (", scoring: {colour: red}", "sources[0].scoring.colour"),
])
def test_scoring_errors_name_the_source_key_path(tmp_path: Path, toy_model: Path, bank_dir: Path, extra: str,
                                                 path: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_runtime(_cfg(tmp_path, toy_model, bank_dir, extra), None)
    assert info.value.path == path and str(info.value).startswith(f"agent.yaml: {path}")


def test_missing_bank_model_or_threshold_are_config_errors(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_runtime(_cfg(tmp_path, toy_model, tmp_path / "nope"), None)
    assert info.value.path == "sources[0].bank" and "nope" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_runtime(_cfg(tmp_path, tmp_path / "missing.onnx", bank_dir), None)
    assert info.value.path == "model.path" and "missing.onnx" in str(info.value)


def test_unchanged_parts_are_reused_and_a_rebuilt_bank_is_reloaded(tmp_path: Path, toy_model: Path,
                                                                  bank_dir: Path) -> None:
    first = build_runtime(_cfg(tmp_path, toy_model, bank_dir), None)
    again = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", threshold: 5.0"), first)
    assert again.models is first.models
    assert again.pipelines["fan"].bank is first.pipelines["fan"].bank
    assert again.pipelines["fan"].source is first.pipelines["fan"].source and again.fresh_sources == []
    assert again.pipelines["fan"].threshold == 5.0 and again.pipelines["fan"].threshold_origin == "config"
    build_bank(toy_model, bank_dir, source_windows=12, seed=4)  # rebuilt on disk, same path
    third = build_runtime(_cfg(tmp_path, toy_model, bank_dir), again)
    assert third.pipelines["fan"].bank is not again.pipelines["fan"].bank
    assert third.pipelines["fan"].bank.count_raw("source") == 12
    moved = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", hop_seconds: 5"), third)
    assert moved.pipelines["fan"].source is not third.pipelines["fan"].source and len(moved.fresh_sources) == 1


def test_a_scoring_error_carries_path_message_and_value_as_fields(tmp_path: Path, toy_model: Path,
                                                                  bank_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {layers: [layer_9]}"), None)
    error = info.value
    assert (error.path, error.message, error.value) == (
        "sources[0].scoring.layers", MISSING_LAYER, "layer_9")
    assert str(error) == (f"agent.yaml: sources[0].scoring.layers: not in the bank (it has layer_1, layer_2, the "
                          f"outputs of the export it was enrolled from; {LAYER_HINT}) (got 'layer_9')")
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, toy_model, bank_dir, ", scoring: {k_n: 0}")
    assert (info.value.path, info.value.message, info.value.value) == (
        "sources[0].scoring.k_n", "must be an integer >= 1", 0)


def test_a_bank_threshold_calibrated_on_other_scores_is_calibrated_again(tmp_path: Path, toy_model: Path,
                                                                        bank_dir: Path) -> None:
    """A config (or an upgrade) that scores otherwise than the bank's calibration gets a threshold calibrated on
    the scores now in force, with the bank's method and quantile; the stored one is kept when they agree."""
    stored = _banks(toy_model, bank_dir).threshold
    assert stored is not None and stored["method"] == "gamma"
    plain = build_runtime(_cfg(tmp_path, toy_model, bank_dir), None).pipelines["fan"]
    assert (plain.threshold, plain.threshold_origin) == (stored["value"], "bank")
    searched_wider = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {hnsw_ef_search: 300}"), None)
    assert searched_wider.pipelines["fan"].threshold_origin == "bank"  # search settings do not change the scores

    first = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {normalizer: none}"), None)
    other = first.pipelines["fan"]
    assert other.threshold_origin == "recalibrated"
    assert other.scorer is not None
    expected = calibrate(other.scorer.loo_scores(), "gamma", stored["quantile"])["value"]
    assert other.threshold == pytest.approx(expected) and other.threshold != pytest.approx(stored["value"])
    assert other.context.threshold == other.threshold
    again = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {normalizer: none}"), first)
    assert again.pipelines["fan"].scorer is other.scorer  # reused, not calibrated again
    assert (again.pipelines["fan"].threshold, again.pipelines["fan"].threshold_origin) == (
        other.threshold, "recalibrated")
    named = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {layers: [layer_1]}"), None)
    assert named.pipelines["fan"].threshold_origin == "bank"  # the default layer, named: the same scores
    both = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {layers: [layer_1, layer_2]}"), None)
    assert both.pipelines["fan"].threshold_origin == "recalibrated"
    pinned = build_runtime(_cfg(tmp_path, toy_model, bank_dir, ", scoring: {normalizer: none}, threshold: 2.5"), None)
    assert (pinned.pipelines["fan"].threshold, pinned.pipelines["fan"].threshold_origin) == (2.5, "config")
    back = build_runtime(_cfg(tmp_path, toy_model, bank_dir), again).pipelines["fan"]
    assert (back.threshold, back.threshold_origin) == (stored["value"], "bank")


def test_threshold_mismatch_names_what_differs(tmp_path: Path, toy_model: Path, bank_dir: Path) -> None:
    banks = _banks(toy_model, bank_dir)
    calibrated = ScoringConfig.from_dict(banks.scoring)
    assert banks.threshold_mismatch(calibrated, [("layer_1",)]) is None
    cause = banks.threshold_mismatch(dataclasses.replace(calibrated, k_n=3), [("layer_2", "layer_1")])
    assert cause is not None
    assert "k_n 1 -> 3" in cause and "layers layer_1 -> layer_1,layer_2" in cause
    unreadable = _banks(toy_model, bank_dir)
    unreadable.scoring = {"normalizer": "magic"}
    cause = unreadable.threshold_mismatch(calibrated, [("layer_1",)])
    assert cause is not None and "not valid here" in cause and "magic" in cause
    unrecorded = _banks(toy_model, bank_dir)
    unrecorded.scoring = None
    assert unrecorded.threshold_mismatch(dataclasses.replace(calibrated, k_n=3), [("layer_1",)]) is None
