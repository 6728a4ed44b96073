"""The feature-statistics term beside the kNN score, and the fusion of members standardized by their own
leave-one-out training scores: what is combined, the threshold calibration that follows the fused score, and
what bank.json keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_agent.errors import ConfigError
from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.calibration import calibrate
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import enroll
from edge_agent.scoring.feature_stats import FeatureStats
from edge_agent.scoring.scorer import BankScorer, Scorer

from .conftest import clustered_points, make_info

DIMS = {"layer_11": 24, "layer_12": 32}


def _bank(seed: int = 0, target: int = 6) -> MemoryBank:
    rng = np.random.default_rng(seed)
    source = {layer: clustered_points(rng, 80, d) for layer, d in DIMS.items()}
    targets = {layer: clustered_points(rng, target, d) + 0.5 for layer, d in DIMS.items()}
    return MemoryBank(make_info(DIMS, default=tuple(DIMS)), {"source": source, "target": targets})


def _queries(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: clustered_points(rng, 30, d) for layer, d in DIMS.items()}


def test_the_statistics_term_sits_beside_each_layers_knn_score() -> None:
    bank = _bank()
    plain = BankScorer.fit(bank, ScoringConfig(feature_stats="off", fusion="mean"))
    added = BankScorer.fit(bank, ScoringConfig(feature_stats="add", feature_stats_eps=1e-3, fusion="mean"))
    assert plain.members == ["layer_11", "layer_12"]
    assert added.members == ["layer_11", "layer_11:stats", "layer_12", "layer_12:stats"]
    x = _queries()
    members = added.score_members(x)
    for layer in DIMS:
        np.testing.assert_allclose(members[layer], plain.score_layers(x)[layer])
        direct = FeatureStats.fit(layer, {d: bank.get_raw(layer, d) for d in ("source", "target")},
                                  1e-3)[0].score(x[layer])
        np.testing.assert_allclose(members[f"{layer}:stats"], direct)
    np.testing.assert_allclose(added.score(x), np.mean(np.stack(list(members.values())), axis=0))
    loo = added.loo_members()
    assert all(v.shape == (86,) for v in loo.values())
    np.testing.assert_allclose(added.loo_scores(), np.mean(np.stack([loo[m] for m in added.members]), axis=0))


@pytest.mark.parametrize("feature_stats", ["off", "add"])
def test_standardized_fusion_weighs_each_member_by_its_own_training_scores(feature_stats: str) -> None:
    bank = _bank()
    scorer = BankScorer.fit(bank, ScoringConfig(feature_stats=feature_stats, fusion="standardized"))
    loo = scorer.loo_members()
    for name, (mean, std) in scorer.fusion.items():
        assert mean == pytest.approx(float(loo[name].mean())) and std == pytest.approx(float(loo[name].std()))
    x = _queries()
    members = scorer.score_members(x)
    expected = np.mean(np.stack([(members[m] - scorer.fusion[m][0]) / scorer.fusion[m][1] for m in scorer.members]),
                       axis=0)
    np.testing.assert_allclose(scorer.score(x), expected)
    fused_loo = scorer.loo_scores()
    assert abs(float(fused_loo.mean())) < 1e-9  # each standardized member has mean 0 over the training refs
    # a member on a 1000x larger scale does not take over the fused score
    scaled = {layer: v * (1000.0 if layer == "layer_12" else 1.0) for layer, v in x.items()}
    big = MemoryBank(bank.info, {d: {layer: bank.get_raw(layer, d) * (1000.0 if layer == "layer_12" else 1.0)
                                     for layer in DIMS} for d in ("source", "target")})
    big_scorer = BankScorer.fit(big, ScoringConfig(feature_stats=feature_stats, fusion="standardized",
                                                   normalizer="none"))
    raw_scorer = BankScorer.fit(big, ScoringConfig(feature_stats=feature_stats, normalizer="none", fusion="mean"))
    z = big_scorer.score_members(scaled)
    share = abs(np.corrcoef(big_scorer.score(scaled), z["layer_12"])[0, 1])
    raw_share = abs(np.corrcoef(raw_scorer.score(scaled), z["layer_12"])[0, 1])
    assert raw_share > 0.999 and share < raw_share


def test_enrollment_calibrates_the_threshold_on_the_fused_score_and_bank_json_keeps_it(tmp_path: Path) -> None:
    bank = _bank()
    info = bank.info
    member = MemberModel(info, "model-sha", "m-0123")
    cfg = ScoringConfig(feature_stats="add", fusion="standardized")
    embeddings = [{d: {layer: bank.get_raw(layer, d) for layer in DIMS} for d in ("source", "target")}]
    enrolled = enroll(tmp_path / "bank", [member], embeddings, bank.names, cfg)
    fitted = BankScorer.fit(bank, cfg)
    expected = calibrate(fitted.loo_scores(), "gamma", 0.99)
    assert enrolled.threshold["value"] == pytest.approx(expected["value"])
    doc = json.loads((tmp_path / "bank" / "bank.json").read_text())
    state = doc["scorer_state"]
    assert set(state["fusion"]) == {"layer_11", "layer_11:stats", "layer_12", "layer_12:stats"}
    assert all("feature_stats" in state["layers"][layer] for layer in DIMS)
    # loaded back: the stored statistics are used, and the scores are the ones fitted
    loaded = MemoryBank.load(tmp_path / "bank", expect=info)
    again = Scorer.fit([loaded], cfg)
    x = _queries()
    np.testing.assert_allclose(again.score([x]), fitted.score(x), rtol=1e-6)
    stored = again.members[0].fusion
    assert set(stored) == set(fitted.fusion)
    assert all(stored[m] == pytest.approx(fitted.fusion[m]) for m in stored)
    # another fusion setting: the stored statistics do not apply, they are computed again
    other = Scorer.fit([loaded], ScoringConfig(feature_stats="add", fusion="mean"))
    assert other.members[0].fusion == {}


def test_the_defaults_add_the_statistics_term_at_floor_1_and_standardize_the_members() -> None:
    """Chosen on development data (docs/evaluation.md, quality study); `off` and `mean` give the plain kNN mean."""
    default = ScoringConfig()
    assert (default.feature_stats, default.feature_stats_eps, default.fusion) == ("add", 1.0, "standardized")
    scorer = BankScorer.fit(_bank(), default)
    assert scorer.members == ["layer_11", "layer_11:stats", "layer_12", "layer_12:stats"]
    assert set(scorer.fusion) == set(scorer.members)
    assert abs(float(scorer.loo_scores().mean())) < 1e-9


def test_a_bank_too_small_for_the_statistics_term_scores_by_its_knn_scores_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    tiny = MemoryBank(make_info(DIMS, default=tuple(DIMS)),
                      {"source": {layer: clustered_points(rng, 2, d) for layer, d in DIMS.items()}})
    with caplog.at_level("WARNING"):
        scorer = BankScorer.fit(tiny, ScoringConfig())
    assert scorer.members == ["layer_11", "layer_12"] and scorer.feature_stats == {}
    skipped = [r.getMessage() for r in caplog.records if "feature_stats_skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("finite leave-one-out" in m for m in skipped)
    assert np.all(np.isfinite(scorer.score(_queries())))
    plain = BankScorer.fit(tiny, ScoringConfig(feature_stats="off"))
    np.testing.assert_allclose(scorer.score(_queries()), plain.score(_queries()))
    # malformed refs are still an error, not a skipped term
    with pytest.raises(ValueError, match="eps"):
        FeatureStats.fit("layer_11", {"source": tiny.get_raw("layer_11", "source")}, eps=0.0)


def test_unknown_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"scoring\.feature_stats"):
        ScoringConfig(feature_stats="maybe")
    with pytest.raises(ConfigError, match=r"scoring\.fusion"):
        ScoringConfig.from_dict({"fusion": "max"})
    with pytest.raises(ConfigError, match=r"scoring\.feature_stats"):
        ScoringConfig.from_dict({"feature_stats": 0})


def test_an_unquoted_yaml_off_or_on_turns_the_statistics_term_off_or_on() -> None:
    """YAML 1.1 reads `feature_stats: off` as false: the documented spelling must work unquoted."""
    assert ScoringConfig.from_dict(yaml.safe_load("feature_stats: off")).feature_stats == "off"
    assert ScoringConfig.from_dict(yaml.safe_load("feature_stats: no")).feature_stats == "off"
    assert ScoringConfig.from_dict(yaml.safe_load("feature_stats: on")).feature_stats == "add"
    assert ScoringConfig.from_dict({"feature_stats": "off"}).feature_stats == "off"


def test_a_bank_whose_target_is_a_single_ref_still_gets_its_statistics_term() -> None:
    scorer = BankScorer.fit(_bank(target=1), ScoringConfig(feature_stats="add", fusion="standardized"))
    assert np.all(np.isfinite(scorer.score(_queries()))) and np.all(np.isfinite(scorer.loo_scores()))


def test_the_statistics_term_can_be_limited_to_some_layers() -> None:
    scorer = BankScorer.fit(_bank(), ScoringConfig(feature_stats="add", feature_stats_layers=("layer_12",)))
    assert scorer.members == ["layer_11", "layer_12", "layer_12:stats"]
    assert ScoringConfig.from_dict({"feature_stats_layers": ["layer_12"]}).feature_stats_layers == ("layer_12",)
    with pytest.raises(ConfigError, match=r"scoring\.feature_stats_layers"):
        BankScorer.fit(_bank(), ScoringConfig(feature_stats="add", feature_stats_layers=("layer_3",)))
    with pytest.raises(ConfigError, match=r"scoring\.feature_stats_layers"):
        ScoringConfig(feature_stats_layers=())


def test_the_statistics_floor_is_a_setting_and_a_stored_term_with_another_floor_is_fitted_again(
        tmp_path: Path) -> None:
    bank = _bank()
    wide = ScoringConfig(feature_stats="add", feature_stats_eps=1.0)
    scorer = BankScorer.fit(bank, wide)
    direct = FeatureStats.fit("layer_12", {d: bank.get_raw("layer_12", d) for d in ("source", "target")}, 1.0)[0]
    assert scorer.feature_stats["layer_12"].eps == 1.0
    np.testing.assert_allclose(scorer.score_members(_queries())["layer_12:stats"], direct.score(_queries()["layer_12"]))
    # a floor at the typical std lifts the small stds: the term is no longer the one with a floor of 1e-3
    narrow = BankScorer.fit(bank, ScoringConfig(feature_stats="add", feature_stats_eps=1e-3))
    assert not np.allclose(narrow.score_members(_queries())["layer_12:stats"], direct.score(_queries()["layer_12"]))
    member = MemberModel(bank.info, "model-sha", "m-0123")
    embeddings = [{d: {layer: bank.get_raw(layer, d) for layer in DIMS} for d in ("source", "target")}]
    enroll(tmp_path / "bank", [member], embeddings, bank.names, wide)
    loaded = MemoryBank.load(tmp_path / "bank", expect=bank.info)
    again = Scorer.fit([loaded], ScoringConfig(feature_stats="add", feature_stats_eps=0.3))
    assert again.members[0].feature_stats["layer_12"].eps == 0.3
    assert Scorer.fit([loaded], wide).members[0].feature_stats["layer_12"].eps == 1.0
    for bad in (0, -1.0, float("nan"), float("inf"), 11.0, True, "0.3"):
        with pytest.raises(ConfigError, match=r"scoring\.feature_stats_eps"):
            ScoringConfig.from_dict({"feature_stats_eps": bad})
