"""Change the refs of a saved bank set on the device: add named windows to a domain, remove refs by name, or
replace a domain, then recalibrate and save atomically (operator feedback and on-site learning).

Every ref has a name in bank.json (`names`), so what feedback added can be found and undone by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.errors import BankError
from edge_agent.model_info import MemberModel
from edge_agent.scoring.bank import DOMAINS, MixupSpec
from edge_agent.scoring.bank_set import BankSet
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.enrollment import Enrolled, enroll

# Per member model, {layer: float32 [N, D]}: the same N windows embedded by every member.
MemberEmbeddings = Sequence[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Calibration:
    method: str = "gamma"
    quantile: float = 0.99


def edit_banks(bank_dir: Path, banks: BankSet, scoring: ScoringConfig, calibration: Calibration, *,
               add_domain: str | None = None, add: MemberEmbeddings | None = None, add_names: Sequence[str] = (),
               remove: Callable[[str], bool] | None = None, replace_domain: str | None = None) -> Enrolled:
    """The banks of `banks` with refs removed (`remove(name)` true), a domain emptied (`replace_domain`), and
    `add` appended to `add_domain` under `add_names`; recalibrated, written to `bank_dir` and loaded back.

    The source domain must keep at least one ref; MemMixup settings are kept.
    """
    if add is not None:
        if add_domain not in DOMAINS:
            raise BankError(f"unknown bank domain {add_domain!r}; expected one of {', '.join(DOMAINS)}")
        if len(add) != len(banks.banks):
            raise BankError(f"{len(add)} embedding sets for {len(banks.banks)} member banks")
        counts = {len(arr) for member in add for arr in member.values()}
        if counts != {len(add_names)}:
            raise BankError(f"{len(add_names)} names for embeddings of {sorted(counts)} windows")
    names = banks.names
    taken = {n for domain in DOMAINS for n in names[domain]}
    clash = [n for n in add_names if n in taken]
    if clash:
        raise BankError(f"the bank already holds refs named {clash[:3]}")
    keep = {domain: np.array([not (remove is not None and remove(n)) and domain != replace_domain
                              for n in names[domain]], dtype=bool) for domain in DOMAINS}
    new_names = {domain: [n for n, k in zip(names[domain], keep[domain], strict=True) if k] for domain in DOMAINS}
    embeddings: list[dict[str, dict[str, np.ndarray]]] = []
    for i, bank in enumerate(banks.banks):
        member: dict[str, dict[str, np.ndarray]] = {}
        for domain in DOMAINS:
            member[domain] = {layer: bank.get_raw(layer, domain)[keep[domain]] for layer in bank.layers}
            if add is not None and domain == add_domain:
                missing = [layer for layer in bank.layers if layer not in add[i]]
                if missing:
                    raise BankError(f"the added windows lack layer(s) {missing} of member {i}")
                member[domain] = {layer: np.concatenate([member[domain][layer],
                                                         np.asarray(add[i][layer], dtype=np.float32)])
                                  for layer in bank.layers}
        embeddings.append(member)
    if add is not None and add_domain is not None:
        new_names[add_domain] = new_names[add_domain] + list(add_names)
    if not new_names["source"]:
        raise BankError(f"{bank_dir}: the edit would leave no source refs")
    mixup: MixupSpec | None = banks.banks[0].mixup
    models: list[MemberModel] = banks.models
    return enroll(bank_dir, models, embeddings, new_names, scoring, mixup=mixup,
                  threshold_method=calibration.method, threshold_quantile=calibration.quantile)


def build_new_banks(bank_dir: Path, models: Sequence[MemberModel], source: MemberEmbeddings, names: Sequence[str],
                    scoring: ScoringConfig, calibration: Calibration) -> Enrolled:
    """A bank set from scratch: `source` (per member {layer: [N, D]}) as the source domain, no target refs."""
    embeddings = [{"source": {layer: np.asarray(arr, dtype=np.float32) for layer, arr in member.items()}}
                  for member in source]
    return enroll(bank_dir, models, embeddings, {"source": list(names), "target": []}, scoring,
                  threshold_method=calibration.method, threshold_quantile=calibration.quantile)
