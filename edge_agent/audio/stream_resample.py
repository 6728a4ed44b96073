"""Resample a live stream block by block, so that overlapping windows are not resampled again each time.

`StreamResampler` feeds a libsoxr stream (the engine and quality of the offline
`edge_agent.audio.resample.resample`): feeding a signal in blocks of any sizes and then calling `flush()` gives
exactly the offline result on the whole signal. soxr holds back the outputs whose filter still needs input
(a few hundred samples, in its own blocks); `peek_tail()` gives them at once, computed as at the end of a
stream, by running a fresh soxr stream over the last `HISTORY` input samples (started on an input sample that
falls on the output grid, so its outputs line up with the stream's; they agree to float32 rounding once the
fresh stream is past its start).
"""

from __future__ import annotations

import numpy as np
import soxr

from edge_agent.audio.resample import QUALITY, ratio

HISTORY = 16384  # input samples kept for peek_tail: soxr holds back fewer than 2 000 outputs at HQ (tested)


class StreamResampler:
    """Resamples one mono stream from in_rate to out_rate, block by block; `reset()` after a gap."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.up, self.down = ratio(self.in_rate, self.out_rate)
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the next block is the first after a gap (as offline, nothing before it)."""
        self.inputs = 0  # input samples received since the start / last reset
        self.outputs = 0  # output samples returned since then
        self._stream = self._new_stream()
        self._history = np.zeros(0, np.float32)
        self._history_start = 0  # input index of _history[0], always on the output grid (a multiple of down)

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the output samples (float32) soxr has completed."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"expected mono audio [samples], got shape {block.shape}")
        self.inputs += block.shape[0]
        if self._stream is None:
            self.outputs += block.shape[0]
            return block
        out = self._stream.resample_chunk(block)
        self.outputs += out.shape[0]
        self._remember(block)
        return np.asarray(out, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The last outputs of the stream, then `reset()`: in all, round(inputs * out_rate / in_rate) samples,
        as many as the offline resampler returns for the whole signal."""
        out = np.zeros(0, np.float32) if self._stream is None else \
            np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), dtype=np.float32)
        self.reset()
        return out

    def peek_tail(self) -> np.ndarray:
        """The outputs `flush()` would return now, without changing the stream: a window can be completed at
        once instead of waiting for soxr's next block."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        fresh = self._new_stream()
        assert fresh is not None
        tail = fresh.resample_chunk(self._history, last=True)
        first = self._history_start * self.up // self.down  # output index of tail[0]
        return np.asarray(tail[self.outputs - first:], dtype=np.float32)

    def _new_stream(self) -> soxr.ResampleStream | None:
        if self.up == self.down:
            return None
        return soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=QUALITY)

    def _remember(self, block: np.ndarray) -> None:
        history = np.concatenate([self._history, block]) if self._history.size else block.copy()
        excess = history.shape[0] - HISTORY
        drop = max(0, excess // self.down * self.down)  # keep the start on the output grid
        self._history = history[drop:]
        self._history_start += drop
