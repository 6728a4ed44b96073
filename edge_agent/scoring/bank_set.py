"""The memory banks of a model set: one bank per member model, loaded and saved as one unit.

One model (the usual case) uses a plain bank directory (bank.py format), so banks already on devices
keep working. Several models (an ensemble) use an ensemble directory (docs/method.md "Ensemble banks"):

    DIR/ensemble.json          format_version, kind, created_at, members [{model_id, variant,
                               model_sha256, model, subdir, content_hash}], scoring, threshold
    DIR/<subdir>/bank.json ... one ordinary MemoryBank per member

Every member bank holds the same windows in the same order (same clip names), so the set's
leave-one-out scores are the mean of the members' and its threshold is calibrated on them. Either
layout is written to a temp dir, fsynced and swapped in whole: a reader sees the old set or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.clock import iso_time
from edge_agent.errors import BankError, ConfigError, EdgeAsdError, ModelMismatchError
from edge_agent.fsutil import (
    read_directory_consistently,
    replacing_directory,
    write_synced,
)
from edge_agent.model_info import MemberModel, ModelInfo, ensemble_id
from edge_agent.scoring.bank import BANK_JSON, DOMAINS, MemoryBank
from edge_agent.scoring.config import ScoringConfig
from edge_agent.scoring.scorer import BankScorer, stored_state_current

ENSEMBLE_JSON = "ensemble.json"
FORMAT_VERSION = 1
KIND = "ensemble"


def is_ensemble_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ENSEMBLE_JSON).is_file()


class BankSet:
    """The banks of a model set, in the order of its models, with the set's threshold and scoring config."""

    def __init__(self, banks: Sequence[MemoryBank], models: Sequence[MemberModel],
                 threshold: dict[str, Any] | None, scoring: dict[str, Any] | None,
                 created_at: str | None = None, path: Path | None = None) -> None:
        if not banks or len(banks) != len(models):
            raise BankError(f"{len(banks)} bank(s) for {len(models)} model(s): a bank set needs one bank per model")
        names = banks[0].names
        for bank in banks[1:]:
            if bank.names != names:
                raise BankError("the member banks of an ensemble must hold the same windows in the same order")
        self.banks = list(banks)
        self.models = list(models)
        self.threshold = threshold
        self.scoring = scoring
        self.created_at = created_at
        self.path = path

    @property
    def names(self) -> dict[str, list[str]]:
        return self.banks[0].names

    @property
    def model_id(self) -> str:
        return ensemble_id([m.model_id for m in self.models])

    def count_raw(self, domain: str) -> int:
        return self.banks[0].count_raw(domain)

    def count(self, domain: str) -> int:
        return self.banks[0].count(domain)

    def threshold_mismatch(self, cfg: ScoringConfig, layers: Sequence[Sequence[str]]) -> str | None:
        """Why the stored threshold does not fit scores computed with `cfg` over `layers` (one tuple per member),
        or None when it was calibrated on such scores (or the set records no scoring config to tell)."""
        if self.scoring is None:
            return None
        try:
            stored = ScoringConfig.from_dict(self.scoring).statistics_key()
        except ConfigError as exc:
            return f"its recorded scoring config is not valid here ({exc})"
        now = cfg.statistics_key()
        differ = [f"{key} {stored[key]!r} -> {now[key]!r}" for key in now if stored[key] != now[key]]
        for bank, used in zip(self.banks, layers, strict=True):
            then = (bank.scorer_state or {}).get("layers")
            if isinstance(then, dict) and sorted(then) != sorted(used):
                differ.append(f"layers {','.join(sorted(then))} -> {','.join(sorted(used))}")
            if bank.scorer_state and not stored_state_current(bank.scorer_state, bank):
                differ.append(f"statistics of scorer state version {bank.scorer_state.get('version')!r}")
        return "; ".join(differ) or None

    def content_hash(self) -> str:
        """One model: its bank's content hash. Several: independent of member order, sha256 over the
        sorted (model sha256, member content hash) pairs."""
        if len(self.banks) == 1:
            return self.banks[0].content_hash()
        digest = hashlib.sha256(b"edge-asd ensemble\n")
        for line in sorted(f"{m.model_sha256}:{b.content_hash()}" for m, b in zip(self.models, self.banks,
                                                                                     strict=True)):
            digest.update(line.encode() + b"\n")
        return digest.hexdigest()


def _subdir(index: int, variant: str) -> str:
    return f"m{index}_{re.sub(r'[^A-Za-z0-9_.-]', '-', variant)}"


def save_banks(directory: str | os.PathLike[str], scorers: Sequence[BankScorer], models: Sequence[MemberModel],
               threshold: dict[str, Any] | None, scoring: dict[str, Any] | None,
               member_thresholds: Sequence[dict[str, Any] | None] | None = None) -> Path:
    """Write every member bank (with its scorer's statistics) and, for several, ensemble.json; swap in whole.

    `threshold` is the set's (calibrated on the mean leave-one-out scores); `member_thresholds` are
    stored in the member banks, so each member directory is also a usable single-model bank.
    """
    dest = Path(directory)
    if len(scorers) != len(models) or not scorers:
        raise BankError(f"{dest}: a bank set needs one scorer per model, at least one")
    if len(scorers) == 1:
        return scorers[0].save(dest, threshold=threshold, model_sha256=models[0].model_sha256)
    member_thresholds = list(member_thresholds) if member_thresholds is not None else [None] * len(scorers)
    with replacing_directory(dest) as tmp:
        members = []
        for i, (scorer, model, member_threshold) in enumerate(zip(scorers, models, member_thresholds,
                                                                   strict=True)):
            subdir = _subdir(i, model.info.variant)
            scorer.save(tmp / subdir, threshold=member_threshold, model_sha256=model.model_sha256)
            members.append({"model_id": model.model_id, "variant": model.info.variant,
                            "model_sha256": model.model_sha256, "model": model.info.as_dict(),
                            "subdir": subdir, "content_hash": scorer.bank.content_hash()})
        doc = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "created_at": iso_time(timespec="seconds"),
            "members": members,
            "scoring": scoring,
            "threshold": threshold,
        }
        try:
            text = json.dumps(doc, indent=1, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BankError(f"{dest / ENSEMBLE_JSON}: threshold or scoring is not JSON: {exc}") from None
        write_synced(tmp / ENSEMBLE_JSON, text.encode())
    return dest


def read_ensemble_json(path: Path, fd: int | None = None) -> dict[str, Any]:
    """ensemble.json, checked for format and member entries; BankError names the file."""
    where = path / ENSEMBLE_JSON
    try:
        if fd is None:
            raw = where.read_bytes()
        else:
            file_fd = os.open(ENSEMBLE_JSON, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(file_fd, "rb") as fh:
                raw = fh.read()
    except FileNotFoundError:
        if (path / BANK_JSON).is_file():
            raise BankError(f"{path}: a single-model bank (bank.json), not an ensemble bank ({ENSEMBLE_JSON}); "
                            "give one model, or enroll an ensemble with several --model") from None
        raise BankError(f"{where}: missing (no ensemble bank there)") from None
    except OSError as exc:
        raise BankError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BankError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BankError(f"{where}: top level is not an object")
    if doc.get("format_version") != FORMAT_VERSION or doc.get("kind") != KIND:
        raise BankError(f"{where}: format_version {doc.get('format_version')!r} / kind {doc.get('kind')!r}; "
                        f"this agent reads {FORMAT_VERSION} / {KIND!r}")
    members = doc.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise BankError(f"{where}: members must be a list of at least two entries")
    seen: set[str] = set()
    for i, m in enumerate(members):
        keys = ("model_id", "variant", "model_sha256", "model", "subdir", "content_hash")
        if not isinstance(m, dict) or any(k not in m for k in keys):
            raise BankError(f"{where}: members[{i}] needs {', '.join(keys)}")
        sub = m["subdir"]
        if not isinstance(sub, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", sub) or sub in (".", "..") \
                or sub in seen:
            raise BankError(f"{where}: members[{i}].subdir {sub!r} is not a plain, unique directory name")
        seen.add(sub)
    return doc


def load_banks(directory: str | os.PathLike[str], models: Sequence[MemberModel]) -> BankSet:
    """Read and validate the banks of these models, with clear errors when the directory holds the other
    layout. Several models: each must match exactly one member by ONNX sha256 (in any order; the result
    follows `models`), and a missing or extra model is a ModelMismatchError naming ensemble.json."""
    path = Path(directory)
    if len(models) > 1:
        return read_directory_consistently(path, lambda fd: _load_ensemble_once(path, fd, models), "ensemble bank")
    if is_ensemble_dir(path):
        doc = read_ensemble_json(path)
        ids = ", ".join(m["model_id"] for m in doc["members"])
        raise ModelMismatchError(f"{path / ENSEMBLE_JSON}: an ensemble bank of {len(doc['members'])} models "
                                 f"({ids}); give every member model, not one")
    (model,) = models
    bank = MemoryBank.load(path, expect=model.info, model_sha256=model.model_sha256)
    scoring = (bank.scorer_state or {}).get("config")
    return BankSet([bank], [model], bank.threshold, scoring, bank.created_at, path)


def _load_ensemble_once(path: Path, fd: int, models: Sequence[MemberModel]) -> BankSet:
    doc = read_ensemble_json(path, fd)
    where = path / ENSEMBLE_JSON
    members: list[dict[str, Any]] = doc["members"]
    by_sha = {m["model_sha256"]: m for m in members}
    given = {m.model_sha256 for m in models}
    missing = [m for m in members if m["model_sha256"] not in given]
    extra = [m for m in models if m.model_sha256 not in by_sha]
    if missing or extra or len(models) != len(members):
        parts = []
        if missing:
            parts.append("no model given for member(s) " + ", ".join(
                f"{m['model_id']} ({m['variant']})" for m in missing))
        if extra:
            parts.append("model(s) not in the ensemble: " + ", ".join(f"{m.model_id} ({m.info.variant})"
                                                                    for m in extra))
        if not parts:
            parts.append(f"{len(models)} models given for {len(members)} members")
        raise ModelMismatchError(f"{where}: the models given do not match the ensemble's members "
                                 f"({', '.join(m['model_id'] for m in members)}): " + "; ".join(parts))
    banks = []
    for model in models:
        member = by_sha[model.model_sha256]
        try:
            stored = ModelInfo.from_dict(member["model"])
        except EdgeAsdError as exc:
            raise BankError(f"{where}: member {member['model_id']}: {exc}") from None
        model.info.require_compatible(stored, f"ensemble member {member['model_id']} in {where}")
        bank = MemoryBank.load(path / member["subdir"], expect=model.info, model_sha256=model.model_sha256)
        if bank.content_hash() != member["content_hash"]:
            raise BankError(f"{path / member['subdir']}: content does not match {where} (content_hash differs)")
        banks.append(bank)
    try:
        return BankSet(banks, models, doc.get("threshold"), doc.get("scoring"), str(doc.get("created_at")), path)
    except BankError as exc:
        raise BankError(f"{where}: {exc}") from None


def describe_banks(path: Path) -> dict[str, Any]:
    """A summary for `edge-agent info DIR`, from the files alone (no model needed)."""
    if not is_ensemble_dir(path):
        bank = MemoryBank.load(path)
        return {"bank": str(path), "model": bank.info.as_dict(), "model_sha256": bank.model_sha256,
                "layers": list(bank.layers), "counts": {d: bank.count(d) for d in DOMAINS},
                "threshold": bank.threshold, "created_at": bank.created_at, "content_hash": bank.content_hash(),
                "scoring": (bank.scorer_state or {}).get("config")}
    doc = read_ensemble_json(path)
    members = []
    banks = []
    for m in doc["members"]:
        bank = MemoryBank.load(path / m["subdir"])
        banks.append(bank)
        members.append({"model_id": m["model_id"], "variant": m["variant"], "model_sha256": m["model_sha256"],
                        "subdir": m["subdir"], "layers": list(bank.layers),
                        "member_threshold": (bank.threshold or {}).get("value"),
                        "content_hash": bank.content_hash()})
        if bank.content_hash() != m["content_hash"]:
            raise BankError(f"{path / m['subdir']}: content does not match {path / ENSEMBLE_JSON}")
    first = banks[0]
    return {"bank": str(path), "kind": KIND, "model": ensemble_id([m["model_id"] for m in doc["members"]]),
            "members": members, "counts": {d: first.count(d) for d in DOMAINS},
            "threshold": doc.get("threshold"), "created_at": doc.get("created_at"), "scoring": doc.get("scoring")}
