from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from edge_agent.audio.wavio import read_wav, read_wav_info, write_wav
from edge_agent.errors import AudioError


def _raw_wav(path: Path, payload: bytes, code: int, channels: int, rate: int, bits: int,
             extensible: bool = False) -> None:
    block = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, bits)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", code) + bytes(14)
    else:
        fmt = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk with pad byte
    body += b"data" + struct.pack("<I", len(payload)) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_pcm16_round_trip(tmp_path: Path) -> None:
    audio = np.sin(np.linspace(0, 100, 16000)).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", audio, 16000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and back.dtype == np.float32
    np.testing.assert_allclose(back, audio, atol=1 / 32767)
    assert read_wav_info(tmp_path / "a.wav") == (16000, 1, 16, 16000)


def test_float32_stereo_mixdown_and_channel(tmp_path: Path) -> None:
    left = np.full(100, 0.5, np.float32)
    right = np.full(100, -0.25, np.float32)
    write_wav(tmp_path / "s.wav", np.stack([left, right], axis=1), 48000, float32=True)
    mono, rate = read_wav(tmp_path / "s.wav")
    assert rate == 48000
    np.testing.assert_allclose(mono, 0.125)
    np.testing.assert_allclose(read_wav(tmp_path / "s.wav", channel=1)[0], -0.25)
    with pytest.raises(AudioError, match="channel 2"):
        read_wav(tmp_path / "s.wav", channel=2)


@pytest.mark.parametrize("extensible", [False, True])
def test_pcm24_and_extensible(tmp_path: Path, extensible: bool) -> None:
    values = np.array([0, 1 << 22, -(1 << 22), (1 << 23) - 1, -(1 << 23)], dtype=np.int64)
    payload = b"".join(int(v & 0xFFFFFF).to_bytes(3, "little") for v in values)
    _raw_wav(tmp_path / "x.wav", payload, 1, 1, 8000, 24, extensible=extensible)
    audio, rate = read_wav(tmp_path / "x.wav")
    assert rate == 8000
    np.testing.assert_allclose(audio, values / float(1 << 23))


def test_pcm8_and_pcm32(tmp_path: Path) -> None:
    _raw_wav(tmp_path / "u8.wav", bytes([128, 255, 0]), 1, 1, 8000, 8)
    np.testing.assert_allclose(read_wav(tmp_path / "u8.wav")[0], [0, 127 / 128, -1])
    payload = np.array([0, 1 << 30, -(1 << 31)], "<i4").tobytes()
    _raw_wav(tmp_path / "i32.wav", payload, 1, 1, 8000, 32)
    np.testing.assert_allclose(read_wav(tmp_path / "i32.wav")[0], [0, 0.5, -1])


def test_truncated_data_reads_what_is_there(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", np.zeros(1000, np.float32), 16000)
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(data[:-501])  # cuts mid-sample too
    audio, _ = read_wav(tmp_path / "t.wav")
    assert audio.shape == (749,)



def test_truncated_data_is_refused_when_strict(tmp_path: Path) -> None:
    write_wav(tmp_path / "a.wav", np.zeros(1000, np.float32), 16000)
    (tmp_path / "t.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:-500])
    with pytest.raises(AudioError, match="truncated: the header promises") as info:
        read_wav(tmp_path / "t.wav", strict=True)
    assert str(tmp_path / "t.wav") in str(info.value)


@pytest.mark.parametrize(("channels", "rate", "bits", "message"), [
    (1, 1, 16, "sample rate of 1 Hz"), (1, 2_000_000_000, 16, "sample rate of 2000000000 Hz"),
    (65535, 16000, 8, "65535 channels"), (0, 16000, 16, "0 channels"),
])
def test_impossible_headers_are_refused_naming_the_file(tmp_path: Path, channels: int, rate: int, bits: int,
                                                        message: str) -> None:
    path = tmp_path / "bad.wav"
    _raw_wav(path, bytes(4000), 1, channels, rate, bits)
    with pytest.raises(AudioError, match=message) as info:
        read_wav(path)
    assert str(path) in str(info.value)

@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "not a RIFF/WAVE"), (b"RIFF\x00\x00\x00\x00WAVE", "no fmt chunk"), (b"hello world!!", "not a RIFF")],
)
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError, match=message) as info:
        read_wav(path)
    assert str(path) in str(info.value)


def test_unsupported_format_and_missing_file(tmp_path: Path) -> None:
    _raw_wav(tmp_path / "alaw.wav", bytes(10), 6, 1, 8000, 8)
    with pytest.raises(AudioError, match="format code 0x6"):
        read_wav(tmp_path / "alaw.wav")
    with pytest.raises(AudioError, match="cannot read"):
        read_wav(tmp_path / "missing.wav")


def test_reads_real_dcase_clip(dcase_sample: Path) -> None:
    clip = sorted(dcase_sample.glob("fan/train/*.wav"))[0]
    audio, rate = read_wav(clip)
    assert rate == 16000 and audio.shape == (160000,)
    assert 0 < np.abs(audio).max() < 1
