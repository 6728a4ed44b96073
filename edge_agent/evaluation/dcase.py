"""The DCASE Task 2 dataset layout: ROOT/<machine>/{train,test}/section_XX_<domain>_<split>_<label>_*.wav.

Development-set names carry domain and label, e.g.
`section_00_target_test_anomaly_0015_car_A2_spd_6_mic_2.wav`. Evaluation-set test names carry
neither (`section_00_0042.wav`): such clips parse with `domain`/`label` = None, and whatever needs a
label asks `Clip.require_label()`, which raises a DatasetError naming the file.
Files that are not .wav (CSV attribute tables, READMEs) and hidden files are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.errors import DatasetError
from edge_agent.scoring.bank import DOMAINS

SPLITS = ("train", "test")

_NAME = re.compile(
    r"^section_(?P<section>\d+)_"
    r"(?:(?P<domain>source|target)_)?"
    r"(?:(?P<split>train|test)_)?"
    r"(?:(?P<label>normal|anomaly)_)?"
    r"(?P<rest>.*)\.wav$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Clip:
    machine: str
    section: str  # "00", as in the file name
    domain: str | None  # "source" | "target" | None (evaluation-set names)
    split: str  # "train" | "test" (the directory it lies in)
    label: str | None  # "normal" | "anomaly" | None (evaluation-set names)
    path: Path

    @property
    def is_anomaly(self) -> bool:
        return self.require_label() == "anomaly"

    @property
    def is_target(self) -> bool:
        return self.require_domain() == "target"

    def require_label(self) -> str:
        if self.label is None:
            raise DatasetError(f"{self.path}: the file name carries no normal/anomaly label "
                               "(an evaluation-set clip?); evaluation needs labelled test clips")
        return self.label

    def require_domain(self) -> str:
        if self.domain is None:
            raise DatasetError(f"{self.path}: the file name carries no source/target domain")
        return self.domain


def parse_clip_name(path: Path, machine: str, split: str) -> Clip:
    """Read section, domain and label from a clip's file name; the split is its directory."""
    match = _NAME.match(path.name)
    if match is None:
        raise DatasetError(f"{path}: not a DCASE clip name (expected "
                           "section_XX_<source|target>_<train|test>_<normal|anomaly>_*.wav)")
    named_split = match["split"].lower() if match["split"] else None
    if named_split is not None and named_split != split:
        raise DatasetError(f"{path}: the name says {named_split!r} but the file lies in {split}/")
    return Clip(
        machine=machine,
        section=match["section"],
        domain=match["domain"].lower() if match["domain"] else None,
        split=split,
        label=match["label"].lower() if match["label"] else None,
        path=path,
    )


@dataclass(frozen=True)
class MachineClips:
    machine: str
    root: Path
    train: tuple[Clip, ...]
    test: tuple[Clip, ...]

    @property
    def sections(self) -> list[str]:
        return sorted({clip.section for clip in (*self.train, *self.test)})

    def train_by_domain(self, section: str | None = None) -> dict[str, list[Clip]]:
        """Training clips per domain; names without a domain count as source (one condition)."""
        out: dict[str, list[Clip]] = {domain: [] for domain in DOMAINS}
        for clip in self.train:
            if section is None or clip.section == section:
                out[clip.domain or "source"].append(clip)
        return out

    def test_clips(self, section: str | None = None) -> list[Clip]:
        return [clip for clip in self.test if section is None or clip.section == section]


@dataclass(frozen=True)
class Dataset:
    root: Path
    machines: dict[str, MachineClips] = field(default_factory=dict)

    def all_clips(self) -> list[Clip]:
        return [clip for m in self.machines.values() for clip in (*m.train, *m.test)]


def _wav_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".wav")


def scan_machine(machine_dir: Path, machine: str | None = None) -> MachineClips:
    name = machine or machine_dir.name
    clips: dict[str, tuple[Clip, ...]] = {}
    for split in SPLITS:
        split_dir = machine_dir / split
        if not split_dir.is_dir():
            raise DatasetError(f"{machine_dir}: machine {name!r} has no {split}/ directory")
        files = _wav_files(split_dir)
        if not files:
            raise DatasetError(f"{split_dir}: machine {name!r} has no {split} clips (*.wav)")
        clips[split] = tuple(parse_clip_name(path, name, split) for path in files)
    return MachineClips(machine=name, root=machine_dir, train=clips["train"], test=clips["test"])


def scan_dataset(root: Path | str, machines: Iterable[str] | None = None) -> Dataset:
    """Every machine directory under `root` (or the named ones); `root` may itself be one machine."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        candidates = {root.name: root}  # ROOT is a single machine directory
    else:
        candidates = {p.name: p for p in sorted(root.iterdir())
                      if p.is_dir() and not p.name.startswith(".")}
    if machines is not None:
        wanted = list(machines)
        missing = [m for m in wanted if m not in candidates]
        if missing:
            raise DatasetError(f"{root}: no machine directory {', '.join(missing)} "
                               f"(found: {', '.join(candidates) or 'none'})")
        candidates = {m: candidates[m] for m in wanted}
    if not candidates:
        hint = "; it holds clips itself: pass the dataset root above the machine directories" \
            if _wav_files(root) else ""
        raise DatasetError(f"{root}: no machine directories (expected ROOT/<machine>/{{train,test}}/*.wav){hint}")
    return Dataset(root=root, machines={name: scan_machine(path, name) for name, path in candidates.items()})
