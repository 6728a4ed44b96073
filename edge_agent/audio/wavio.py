"""WAV files <-> float32 numpy arrays, without extra dependencies.

Reads RIFF/RF64-free WAVE with PCM 8/16/24/32-bit integers or IEEE float 32/64, including
WAVE_FORMAT_EXTENSIBLE. Writes 16-bit PCM or float32.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edge_agent.errors import AudioError
from edge_agent.fsutil import atomic_write
from edge_agent.logs import get_logger

log = get_logger(__name__)

MIN_RATE, MAX_RATE = 100, 384_000  # beyond what any recorder writes
MAX_CHANNELS = 64
_PCM = 0x0001
_FLOAT = 0x0003
_EXTENSIBLE = 0xFFFE


def read_wav_info(path: Path) -> tuple[int, int, int, int]:
    """(sample_rate, channels, bits_per_sample, frames) without reading the samples."""
    fmt, _, data_size = _parse(Path(path), read_data=False)
    rate, channels, bits, _ = fmt
    return rate, channels, bits, data_size // (channels * bits // 8)


def read_wav(path: Path, channel: int | None = None, strict: bool = False) -> tuple[np.ndarray, int]:
    """Samples as float32 in [-1, 1] (mono: channels averaged, or the one `channel`) and the rate.

    A file shorter than its header says is read as far as it goes with a warning, or refused when `strict`
    (the agent's file sources: a truncated recording is a fault to report, not audio to score).
    """
    path = Path(path)
    fmt, data, declared = _parse(path, read_data=True)
    if len(data) < declared:
        message = f"truncated: the header promises {declared} bytes of audio, the file holds {len(data)}"
        if strict:
            raise AudioError(f"{path}: {message}")
        log.warning("wav_truncated", path=path, declared_bytes=declared, bytes=len(data))
    rate, channels, bits, code = fmt
    frame_bytes = channels * bits // 8
    usable = len(data) - len(data) % frame_bytes
    samples = _decode(data[:usable], bits, code, path).reshape(-1, channels)
    if channel is not None:
        if not 0 <= channel < channels:
            raise AudioError(f"{path}: channel {channel} does not exist (file has {channels})")
        return np.ascontiguousarray(samples[:, channel]), rate
    if channels == 1:
        return samples[:, 0].copy(), rate
    return samples.mean(axis=1, dtype=np.float32), rate


def write_wav(path: Path, audio: np.ndarray, sample_rate: int, float32: bool = False) -> None:
    """Write mono [N] or multi-channel [N, C] audio; written to a temp file, then renamed."""
    path = Path(path)
    audio = np.asarray(audio, dtype=np.float32)
    frames = audio.reshape(audio.shape[0], -1)
    channels = frames.shape[1]
    if float32:
        payload, code, bits = frames.astype("<f4").tobytes(), _FLOAT, 32
    else:
        ints = np.clip(np.round(frames * 32767.0), -32768, 32767).astype("<i2")
        payload, code, bits = ints.tobytes(), _PCM, 16
    block = channels * bits // 8
    header = b"RIFF" + struct.pack("<I", 36 + len(payload)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, code, channels, sample_rate,
                                    sample_rate * block, block, bits)
    header += b"data" + struct.pack("<I", len(payload))
    atomic_write(path, header + payload, sync=False)  # test and demo audio: cheap to write again


def _parse(path: Path, read_data: bool) -> tuple[tuple[int, int, int, int], bytes, int]:
    try:
        with open(path, "rb") as fh:
            return _parse_chunks(fh, path, read_data)
    except OSError as exc:
        raise AudioError(f"{path}: cannot read ({exc.strerror})") from None


def _parse_chunks(fh: BinaryIO, path: Path, read_data: bool) -> tuple[tuple[int, int, int, int], bytes, int]:
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioError(f"{path}: not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    while True:
        chunk = fh.read(8)
        if len(chunk) < 8:
            raise AudioError(f"{path}: no data chunk" if fmt else f"{path}: no fmt chunk")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"fmt ":
            fmt = _parse_fmt(fh.read(size), path)
            if size % 2:
                fh.read(1)
        elif cid == b"data":
            if fmt is None:
                raise AudioError(f"{path}: data chunk before fmt chunk")
            streaming = size in (0, 0xFFFFFFFF)  # a recorder that never went back to write the size
            if not read_data:
                return fmt, b"", size
            data = fh.read() if streaming else fh.read(size)
            if not data:
                raise AudioError(f"{path}: empty data chunk")
            return fmt, data, len(data) if streaming else size
        else:
            fh.seek(size + size % 2, os.SEEK_CUR)


def _parse_fmt(body: bytes, path: Path) -> tuple[int, int, int, int]:
    if len(body) < 16:
        raise AudioError(f"{path}: fmt chunk too short")
    code, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
    if code == _EXTENSIBLE:
        if len(body) < 26:
            raise AudioError(f"{path}: WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
        code = struct.unpack("<H", body[24:26])[0]
    if code not in (_PCM, _FLOAT):
        raise AudioError(f"{path}: unsupported WAV format code {code:#x} (PCM or IEEE float only)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{path}: impossible header: {channels} channels (1 to {MAX_CHANNELS})")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{path}: impossible header: a sample rate of {rate} Hz ({MIN_RATE} to {MAX_RATE})")
    if (code == _PCM and bits not in (8, 16, 24, 32)) or (code == _FLOAT and bits not in (32, 64)):
        raise AudioError(f"{path}: unsupported sample width {bits} bits")
    return rate, channels, bits, code


def _decode(data: bytes, bits: int, code: int, path: Path) -> np.ndarray:
    if code == _FLOAT:
        return np.frombuffer(data, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    if bits == 8:
        return (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 16:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if bits == 24:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
