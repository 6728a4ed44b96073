"""The pooling part of the model contract (edge_agent.model_info): per-output poolings, gem_p, `@` names, old files.

No torch here: this is runtime code, kept beside the exporter tests that produce the metadata.
"""

from __future__ import annotations

import math

import pytest

from edge_agent.errors import ModelMetadataError
from edge_agent.model_info import METADATA_KEYS, ModelInfo, pooled_output_name, split_output_name

LAYERS = ("layer_12", "layer_12@meanstd", "layer_12@max", "layer_12@gem", "embedding")
POOLINGS = ("time-mean", "time-meanstd", "time-max", "gem", "spatial")


def _info(**changes: object) -> ModelInfo:
    base: dict[str, object] = dict(
        family="efficientat", variant="mn04", sample_rate=32000, window_samples=320000, layers=LAYERS,
        dims=(384, 768, 384, 384, 384), default_layers=("layer_12",), checkpoint_sha256="ab" * 32,
        exporter_version="0.2.0", output_poolings=POOLINGS, gem_p=3.0,
    )
    base.update(changes)
    return ModelInfo(**base)  # type: ignore[arg-type]


def _old_metadata() -> dict[str, str]:
    """What exporter 0.1.0 wrote: no output_poolings, no gem_p."""
    props = _info(layers=("layer_11", "layer_12", "embedding"), dims=(384, 384, 384), output_poolings=(),
                  gem_p=None, exporter_version="0.1.0").to_metadata()
    del props["output_poolings"]
    return {**props, "precision": "fp32"}


def test_round_trips_keep_poolings_and_p() -> None:
    info = _info(gem_p=2.5)
    props = info.to_metadata()
    assert props["output_poolings"] == ",".join(POOLINGS) and props["gem_p"] == "2.5"
    assert ModelInfo.from_metadata(props) == info
    assert ModelInfo.from_metadata(props).extra == {}
    assert ModelInfo.from_dict(info.as_dict()) == info
    assert info.as_dict()["output_poolings"] == list(POOLINGS)
    assert [info.output_pooling(name) for name in LAYERS] == list(POOLINGS)
    assert info.dim("layer_12@meanstd") == 768
    with pytest.raises(ModelMetadataError, match="not an output"):
        info.output_pooling("layer_12@bogus")


def test_old_metadata_reads_as_before() -> None:
    props = _old_metadata()
    assert set(METADATA_KEYS) <= set(props) and "output_poolings" not in props and "gem_p" not in props
    info = ModelInfo.from_metadata(props)
    assert info.pooling == "time-mean" and info.gem_p is None
    assert info.output_poolings == ("time-mean",) * 3  # the single recorded pooling for every output
    assert info.extra == {"precision": "fp32"}
    assert "gem_p" not in info.as_dict()
    assert ModelInfo.from_dict(info.as_dict()) == info
    # a bank.json written before (model = as_dict of that time) has no new keys either
    old_dict = {k: v for k, v in info.as_dict().items() if k != "output_poolings"}
    assert ModelInfo.from_dict(old_dict) == info


def test_names_suffixes_and_poolings_must_agree() -> None:
    assert pooled_output_name("layer_3", "time-max", default=False) == "layer_3@max"
    assert pooled_output_name("layer_3", "time-max", default=True) == "layer_3"
    assert split_output_name("layer_3@meanstd") == ("layer_3", "time-meanstd")
    assert split_output_name("layer_3@delta") == ("layer_3", "time-delta")
    assert split_output_name("layer_3") == ("layer_3", None)
    with pytest.raises(ModelMetadataError, match="named for time-max pooling but records gem"):
        _info(output_poolings=("time-mean", "time-meanstd", "gem", "gem", "spatial"))
    with pytest.raises(ModelMetadataError, match="expected <layer>@<one of"):
        _info(layers=("layer_12", "layer_12@median", "layer_12@max", "layer_12@gem", "embedding"))
    with pytest.raises(ModelMetadataError, match="expected <layer>@<one of"):
        _info(layers=("layer_12", "@meanstd", "layer_12@max", "layer_12@gem", "embedding"))
    with pytest.raises(ModelMetadataError, match="differ in length"):
        _info(output_poolings=POOLINGS[:-1])
    with pytest.raises(ModelMetadataError, match="is not one of"):
        _info(output_poolings=("time-mean", "time-meanstd", "time-max", "gem", "median"))


def test_gem_p_is_given_exactly_when_gem_is_used() -> None:
    with pytest.raises(ModelMetadataError, match="gem_p is not given"):
        _info(gem_p=None)
    with pytest.raises(ModelMetadataError, match="no output uses gem"):
        _info(layers=LAYERS[:3], dims=(384, 768, 384), output_poolings=POOLINGS[:3], gem_p=3.0)
    for bad in ("nan", "inf", "0", "-3"):
        with pytest.raises(ModelMetadataError, match="gem_p"):
            ModelInfo.from_metadata({**_info().to_metadata(), "gem_p": bad})
    with pytest.raises(ModelMetadataError, match="malformed"):
        ModelInfo.from_metadata({**_info().to_metadata(), "gem_p": "three"})
    assert math.isclose(ModelInfo.from_metadata({**_info().to_metadata(), "gem_p": "4"}).gem_p or 0.0, 4.0)


def test_mismatch_on_gem_p_only_for_shared_gem_outputs() -> None:
    info = _info()
    assert info.mismatches(_info(gem_p=4.0)) == ["gem_p of layer_12@gem: 3.0 != 4.0"]
    without_gem = _info(layers=LAYERS[:3], dims=(384, 768, 384), output_poolings=POOLINGS[:3], gem_p=None)
    assert not info.mismatches(without_gem)
    # an old file of the same checkpoint (embedding recorded as the export's pooling) stays compatible
    old = ModelInfo.from_metadata({**_old_metadata(), "checkpoint_sha256": "ab" * 32})
    assert not info.mismatches(old) and not old.mismatches(info)
