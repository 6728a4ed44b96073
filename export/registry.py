"""Encoder families by export NAME. Adding a family (EAT, M2D, dasheng) is one module plus one line here.

A family module provides:
    FAMILY: str                       # "efficientat" | "beats" | "ced" (ModelInfo.family)
    VARIANTS: tuple[str, ...]         # export NAMEs it serves, e.g. ("mn04", "mn10", ...)
    def available_layers(variant: str) -> tuple[str, ...]
    def default_layers(variant: str) -> tuple[str, ...]   # scoring defaults, documented with evidence
    def default_exported_layers(variant: str) -> tuple[str, ...]
    def build(variant: str, layers: Sequence[str], pooling: str | export.pooling.Poolings,
              checkpoint: Path | None, seed: int = 0) -> export.base.ExportableEncoder
        # layers are block names (layer_<i>, embedding); with a Poolings of several modes each block
        # gives one output per mode (export.pooling.Poolings.outputs names them)
        # checkpoint None = random init (seed); a wrong/mismatching checkpoint raises
        # export.base.CheckpointError naming the file and the first mismatching keys
    def write_random_checkpoint(path: Path, variant: str, seed: int = 0) -> None
        # a file in the official on-disk key layout, random weights with perturbed norms/biases
"""

from __future__ import annotations

import importlib
from types import ModuleType

# export NAME prefix -> module path. Lookup is by exact variant membership, see family_for().
FAMILY_MODULES = (
    "export.efficientat",
    "export.beats",
    "export.ced",
)


def _load(module_path: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name == module_path:
            return None
        raise


def families() -> dict[str, ModuleType]:
    """All importable family modules by variant NAME."""
    found: dict[str, ModuleType] = {}
    for path in FAMILY_MODULES:
        module = _load(path)
        if module is None:
            continue
        for variant in module.VARIANTS:
            found[variant] = module
    return found


def family_for(name: str) -> ModuleType:
    known = families()
    if name not in known:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
