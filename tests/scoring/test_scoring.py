from __future__ import annotations

import numpy as np
import pytest

from edge_agent.errors import BankError, ConfigError, ModelMismatchError
from edge_agent.scoring.bank import MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer, Scorer

from .configs import knn_only


@pytest.fixture
def info(info_factory):
    return info_factory({"layer_4": 1, "layer_8": 1}, default=("layer_8",))


@pytest.fixture
def bank(info) -> MemoryBank:
    # layer_4: S = {0, 1, 3, 7}, T = {10, 12};  layer_8: the same points scaled by 2
    s = np.array([[0.0], [1.0], [3.0], [7.0]])
    t = np.array([[10.0], [12.0]])
    return MemoryBank(info, {"source": {"layer_4": s, "layer_8": 2 * s}, "target": {"layer_4": t, "layer_8": 2 * t}})


@pytest.mark.parametrize(
    ("field", "value"),
    [("normalizer", "knn"), ("metric", "cosine"), ("k_n", 0), ("k_n", 1.5), ("k_n", True), ("ld_k", -1),
     ("ld_reduce", "median"), ("candidates", 0), ("exact_below", -1), ("hnsw_m", 1), ("sigma_fallback", "zero"),
     ("sigma_min_target", 1), ("layers", ()), ("layers", ("a", "a"))],
)
def test_config_validation_names_field_and_value(field: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        ScoringConfig(**{field: value})
    assert info.value.path == f"scoring.{field}"
    assert repr(value) in str(info.value)


def test_config_dict_round_trip_and_unknown_key() -> None:
    cfg = knn_only(normalizer="ld", layers=("layer_8",), candidates=32)
    assert ScoringConfig.from_dict(cfg.to_dict()) == cfg
    assert ScoringConfig.from_dict({"layers": ["a", "b"]}).layers == ("a", "b")
    with pytest.raises(ConfigError, match=r"scoring\.kn: unknown key"):
        ScoringConfig.from_dict({"kn": 3})
    with pytest.raises(ConfigError, match=r"devices\.fan\.scoring\.k_n: must be an integer") as exc:
        ScoringConfig.from_dict({"k_n": 0}, path="devices.fan.scoring")
    assert exc.value.path == "devices.fan.scoring.k_n"


def test_default_layers_and_named_layers(bank: MemoryBank) -> None:
    cfg = knn_only(normalizer="none")
    assert BankScorer.fit(bank, cfg).layers == ("layer_8",)
    both = BankScorer.fit(bank, knn_only(normalizer="none", layers=("layer_4", "layer_8")))
    # layer_8 holds S = {0, 2, 6, 14}, T = {20, 24}
    # x: layer_4 = 5 -> min(2, 5) = 2 ; layer_8 = 20 -> min(6, 0) = 0 ; mean = 1
    emb = {"layer_4": np.array([[5.0]]), "layer_8": np.array([[20.0]])}
    assert both.score_layers(emb) == {"layer_4": [2.0], "layer_8": [0.0]}
    assert both.score(emb).tolist() == [1.0]
    with pytest.raises(ConfigError, match=r"scoring\.layers: not in the bank .* edge-export --layers"):
        BankScorer.fit(bank, knn_only(layers=("layer_9",)))


def test_default_layers_missing_from_bank(info_factory) -> None:
    info = info_factory({"layer_4": 1, "layer_8": 1}, default=("layer_8",))
    only4 = MemoryBank(info, {"source": {"layer_4": np.array([[0.0], [1.0]])}})
    with pytest.raises(ConfigError, match="none of the model's default layers"):
        BankScorer.fit(only4, knn_only())


def test_score_checks_embeddings(bank: MemoryBank) -> None:
    scorer = BankScorer.fit(bank, knn_only())
    with pytest.raises(ConfigError, match="lack layer 'layer_8'"):
        scorer.score({"layer_4": np.zeros((1, 1))})
    with pytest.raises(ModelMismatchError, match=r"layer_8: embeddings of shape \[1, 3\]"):
        scorer.score({"layer_8": np.zeros((1, 3))})


def test_ensemble_is_the_mean_of_scorers(bank: MemoryBank) -> None:
    a = BankScorer.fit(bank, knn_only(normalizer="none", layers=("layer_4",)))
    b = BankScorer.fit(bank, knn_only(normalizer="none", layers=("layer_8",)))
    ens = Scorer([a, b])
    emb = {"layer_4": np.array([[5.0], [11.0]]), "layer_8": np.array([[20.0], [22.0]])}
    # a (layer_4): 5 -> 2, 11 -> 1; b (layer_8): 20 -> 0, 22 -> min(8, 2) = 2
    assert ens.score([emb, emb]).tolist() == [1.0, 1.5]
    assert np.array_equal(ens.loo_scores(), (a.loo_scores() + b.loo_scores()) / 2)
    with pytest.raises(ConfigError, match="2 scorers"):
        ens.score([emb])


def test_ensemble_loo_needs_the_same_refs(bank: MemoryBank, info) -> None:
    other = MemoryBank(info, {"source": {"layer_4": np.arange(3.0)[:, None], "layer_8": np.zeros((3, 1))}})
    with pytest.raises(BankError, match="same clips"):
        Scorer([BankScorer.fit(bank, knn_only(normalizer="none")),
                        BankScorer.fit(other, knn_only(normalizer="none"))]).loo_scores()


def test_state_is_json(bank: MemoryBank) -> None:
    import json

    for name in ("none", "zscore-test", "zscore-domain", "ld", "ld-domain"):
        state = BankScorer.fit(bank, knn_only(normalizer=name)).state()
        assert json.loads(json.dumps(state, allow_nan=False)) == state
        assert state["config"]["normalizer"] == name and state["bank_fingerprint"] == bank.fingerprint()
