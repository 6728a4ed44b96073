"""Resample a live stream block by block, so that overlapping windows are not resampled again each time.

`StreamResampler` keeps the last input samples that the next outputs still read, and computes each
output sample once, with the filter and code of the offline `edge_agent.audio.resample.resample`:
feeding a signal in blocks of any sizes and then calling `flush()` gives the offline result on the
whole signal (equal up to float32 rounding). Output sample n stands for input time n / out_rate (the
filter delay is compensated); it is returned once the input it reads has arrived, i.e. about
`latency` input samples after the input sample at that time (30 samples, 0.6 ms, for 48 kHz -> 16 kHz).
"""

from __future__ import annotations

import numpy as np

from edge_agent.audio.resample import half_length, newest_input, padding_after, phase_length, polyphase, ratio


class StreamResampler:
    """Resamples one mono stream from in_rate to out_rate, block by block; `reset()` after a gap."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.up, self.down = ratio(self.in_rate, self.out_rate)
        self._per_phase = phase_length(self.up, self.down)
        self._pad = padding_after(self.up, self.down)
        self._half = half_length(self.up, self.down)
        self.latency = newest_input(0, self.up, self.down)  # input samples an output waits for
        self.reset()

    def reset(self) -> None:
        """Start a new stream: the next block is the first after a gap (zeros before it, as offline)."""
        self.inputs = 0  # input samples received since the start / last reset
        self.outputs = 0  # output samples returned since then
        self._first = -self._per_phase  # input index of _buf[0]; negative indices are leading zeros
        self._buf = np.zeros(self._per_phase, np.float64)

    def process(self, block: np.ndarray) -> np.ndarray:
        """Feed the next input samples; returns the output samples (float32) whose input is complete."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 1:
            raise ValueError(f"expected mono audio [samples], got shape {block.shape}")
        if self.up == self.down:
            self.inputs += block.shape[0]
            self.outputs += block.shape[0]
            return block
        self.inputs += block.shape[0]
        # Outputs n with newest_input(n) < inputs: n * down + half_len < inputs * up.
        ready = -(-(self.inputs * self.up - self._half) // self.down)
        return self._emit(block, max(ready, self.outputs))

    def flush(self) -> np.ndarray:
        """The last outputs of the stream (zeros assumed after it, as offline), then `reset()`.

        After process(...) of all blocks and flush(), the outputs add up to ceil(inputs * out_rate / in_rate)
        samples, as many as the offline resampler returns for the whole signal.
        """
        if self.up == self.down:
            self.reset()
            return np.zeros(0, np.float32)
        out = self._emit(np.zeros(0, np.float32), -(-self.inputs * self.up // self.down))
        self.reset()
        return out

    def peek_tail(self) -> np.ndarray:
        """The outputs `flush()` would return now (zeros assumed after the input so far), without changing the
        stream: a window can be completed at once instead of waiting `latency` samples for the next block."""
        if self.up == self.down:
            return np.zeros(0, np.float32)
        saved = (self.inputs, self.outputs, self._first, self._buf.copy())
        try:
            return self._emit(np.zeros(0, np.float32), -(-self.inputs * self.up // self.down))
        finally:
            self.inputs, self.outputs, self._first, self._buf = saved

    def _emit(self, block: np.ndarray, end: int) -> np.ndarray:
        count = end - self.outputs
        kept = self._buf.shape[0]
        padded = np.zeros(kept + block.shape[0] + self._pad, np.float64)
        padded[:kept] = self._buf
        padded[kept:kept + block.shape[0]] = block
        out = polyphase(padded, self._first, self.outputs, count, self.up, self.down) if count > 0 \
            else np.zeros(0, np.float32)
        self.outputs = end
        # Keep what the next output reads: from newest_input(end) - per_phase + 1 on.
        keep_from = newest_input(end, self.up, self.down) - self._per_phase + 1
        drop = min(max(0, keep_from - self._first), kept + block.shape[0])
        self._buf = padded[drop:kept + block.shape[0]].copy()
        self._first += drop
        return out

