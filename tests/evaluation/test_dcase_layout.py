"""DCASE layout parsing: development names, evaluation-style names, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import DatasetError
from edge_agent.evaluation.dcase import parse_clip_name, scan_dataset


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _machine(root: Path, name: str, train: list[str], test: list[str]) -> Path:
    for file_name in train:
        _touch(root / name / "train" / file_name)
    for file_name in test:
        _touch(root / name / "test" / file_name)
    return root / name


def test_parse_development_names() -> None:
    clip = parse_clip_name(Path("x/section_00_target_test_anomaly_0015_car_A2_spd_6_mic_2.wav"), "ToyTrain", "test")
    assert (clip.machine, clip.section, clip.domain, clip.split, clip.label) == (
        "ToyTrain", "00", "target", "test", "anomaly")
    assert clip.is_anomaly and clip.is_target
    clip = parse_clip_name(Path("section_03_source_train_normal_0042_vel_9_loc_A.wav"), "bearing", "train")
    assert (clip.section, clip.domain, clip.label) == ("03", "source", "normal")
    assert not clip.is_anomaly and not clip.is_target


def test_evaluation_style_name_parses_but_needs_a_label_for_metrics() -> None:
    clip = parse_clip_name(Path("/data/fan/test/section_00_0042.wav"), "fan", "test")
    assert clip.domain is None and clip.label is None and clip.section == "00"
    with pytest.raises(DatasetError, match=r"section_00_0042\.wav.*no normal/anomaly label"):
        _ = clip.is_anomaly
    with pytest.raises(DatasetError, match=r"section_00_0042\.wav.*no source/target domain"):
        _ = clip.is_target


def test_bad_names_are_errors_naming_the_file() -> None:
    with pytest.raises(DatasetError, match=r"normal_id_00_00000000\.wav: not a DCASE clip name"):
        parse_clip_name(Path("normal_id_00_00000000.wav"), "fan", "train")
    with pytest.raises(DatasetError, match=r"says 'test' but the file lies in train/"):
        parse_clip_name(Path("section_00_source_test_normal_0001.wav"), "fan", "train")


def test_scan_dataset_ignores_non_wav_and_sorts(tmp_path: Path) -> None:
    _machine(tmp_path, "fan",
             ["section_00_source_train_normal_0002_a.wav", "section_00_source_train_normal_0001_a.wav",
              "section_00_target_train_normal_0000_b.wav", "attributes.csv", ".section_00_hidden.wav"],
             ["section_00_source_test_normal_0000_a.wav", "section_00_target_test_anomaly_0001_b.wav",
              "README.md"])
    _machine(tmp_path, "valve", ["section_00_source_train_normal_0000.wav"],
             ["section_00_source_test_anomaly_0000.wav"])
    _touch(tmp_path / "notes.txt")
    dataset = scan_dataset(tmp_path)
    assert list(dataset.machines) == ["fan", "valve"]
    fan = dataset.machines["fan"]
    assert [c.path.name for c in fan.train] == sorted(c.path.name for c in fan.train)
    assert len(fan.train) == 3 and len(fan.test) == 2
    by_domain = fan.train_by_domain("00")
    assert len(by_domain["source"]) == 2 and len(by_domain["target"]) == 1
    assert fan.sections == ["00"]
    assert len(dataset.all_clips()) == 7


def test_a_single_machine_directory_is_accepted(tmp_path: Path) -> None:
    machine_dir = _machine(tmp_path, "pump", ["section_00_source_train_normal_0000.wav"],
                           ["section_00_source_test_normal_0000.wav"])
    dataset = scan_dataset(machine_dir)
    assert list(dataset.machines) == ["pump"]


def test_missing_or_empty_split_names_the_directory(tmp_path: Path) -> None:
    _machine(tmp_path, "fan", ["section_00_source_train_normal_0000.wav"], [])
    with pytest.raises(DatasetError, match=r"fan: machine 'fan' has no test/ directory"):
        scan_dataset(tmp_path)
    (tmp_path / "fan" / "test").mkdir()
    _touch(tmp_path / "fan" / "test" / "scores.csv")
    with pytest.raises(DatasetError, match=r"fan/test: machine 'fan' has no test clips"):
        scan_dataset(tmp_path)


def test_missing_root_and_unknown_machine(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no machine directories"):
        scan_dataset(tmp_path)
    _machine(tmp_path, "fan", ["section_00_source_train_normal_0000.wav"],
             ["section_00_source_test_normal_0000.wav"])
    with pytest.raises(DatasetError, match=r"no machine directory slider \(found: fan\)"):
        scan_dataset(tmp_path, machines=["slider"])
    clip_dir = tmp_path / "fan" / "test"
    with pytest.raises(DatasetError, match="holds clips itself: pass the dataset root"):
        scan_dataset(clip_dir)


def test_real_dcase_sample_parses(dcase_sample: Path) -> None:
    dataset = scan_dataset(dcase_sample)
    assert len(dataset.machines) == 7
    assert len(dataset.all_clips()) == 28
    for machine in dataset.machines.values():
        assert all(c.domain == "source" and c.label == "normal" for c in machine.train)
        assert all(c.label in ("normal", "anomaly") for c in machine.test)
