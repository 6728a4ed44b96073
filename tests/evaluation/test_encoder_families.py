"""Every encoder family's ONNX file loads in the runtime and evaluates, alone and in an ensemble."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge_agent.evaluation.evaluate import embed_dataset, score_embeddings
from edge_agent.evaluation.synthetic import synthesize_dataset
from edge_agent.model.encoder import Encoder
from edge_agent.scoring.config import ScoringConfig

from ..exported import ExportedModel


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_ds")
    synthesize_dataset(root, machines=("fan",), n_train_source=5, n_train_target=2, n_test_per_class=2, seed=5)
    return root


@pytest.mark.parametrize("family", ["beats", "ced-tiny"])
def test_family_loads_and_evaluates(family: str, tiny_dataset: Path, request: pytest.FixtureRequest) -> None:
    export: ExportedModel = request.getfixturevalue("beats_model" if family == "beats" else "ced_tiny_model")
    encoder = Encoder(export.path, providers=["cpu"])
    assert encoder.info == export.info and encoder.info.sample_rate == 16000
    embeddings = embed_dataset([export.path], tiny_dataset, progress=False, layers="default")
    result = score_embeddings(embeddings, ScoringConfig())
    assert result.models[0]["layers"] == list(export.info.default_layers)
    assert math.isfinite(result.summary.official)
    assert all(np.isfinite(section.scores).all() for section in result.sections)


def test_ensemble_of_two_families(tiny_dataset: Path, ced_tiny_model: ExportedModel,
                                  mn04_random_onnx: Path) -> None:
    paths = [ced_tiny_model.path, mn04_random_onnx]
    both = embed_dataset(paths, tiny_dataset, progress=False, layers="default")
    cfg = ScoringConfig(normalizer="ld-domain")
    ensemble = score_embeddings(both, cfg)
    assert [m["variant"] for m in ensemble.models] == ["ced-tiny", "mn04"]
    singles = [score_embeddings(embed_dataset([p], tiny_dataset, progress=False, layers="default"), cfg)
               for p in paths]
    # the ensemble score is the mean of the members' normalized scores, clip by clip
    expected = (singles[0].sections[0].scores + singles[1].sections[0].scores) / 2
    np.testing.assert_allclose(ensemble.sections[0].scores, expected, rtol=1e-6)
