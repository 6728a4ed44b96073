"""ONNX Runtime session for an exported encoder: provider choice, metadata, embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.audio.resample import resample
from edge_agent.audio.windowing import fit_to_window
from edge_agent.errors import EdgeAsdError, ModelMetadataError
from edge_agent.fsutil import sha256_file
from edge_agent.logs import get_logger
from edge_agent.model_info import INPUT_NAME, MemberModel, ModelInfo

log = get_logger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Map config names ("auto", "tensorrt", "cuda", "cpu") to the ORT providers that exist here.

    Unavailable ones are skipped with a log line; CPU is always the last resort.
    """
    names: list[str] = []
    for item in requested:
        if item == "auto":
            names.extend(n for n in AUTO_ORDER if n not in names)
        elif item in PROVIDER_NAMES:
            if item not in names:
                names.append(item)
        else:
            raise EdgeAsdError(f"unknown execution provider {item!r}; use auto, {', '.join(PROVIDER_NAMES)}")
    chosen = []
    for name in names:
        provider = PROVIDER_NAMES[name]
        if provider in available:
            chosen.append(provider)
        elif "auto" not in requested:
            log.warning("provider_unavailable", provider=name, available=",".join(available),
                        detail=f"{name} is not available in this onnxruntime build; falling back")
    if PROVIDER_NAMES["cpu"] not in chosen:
        chosen.append(PROVIDER_NAMES["cpu"])
    return chosen


class Encoder:
    """A frozen encoder exported by edge-export: fixed-length waveform in, pooled embeddings out."""

    def __init__(
        self,
        path: Path,
        providers: Sequence[str] = ("auto",),
        intra_op_threads: int | None = None,
        allow_spinning: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeAsdError(f"{self.path}: model file not found (export one with edge-export)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # A daemon that runs once per window should not keep a core spinning between windows.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        wanted = choose_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise EdgeAsdError(f"{self.path}: cannot load ONNX model: {exc}") from None
        used = self.session.get_providers()
        if used[0] != wanted[0]:
            log.warning("provider_fallback", model=self.path.name, wanted=wanted[0], used=used[0])
        log.info("model_loaded", model=self.path.name, provider=used[0])
        self.providers = used
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(props, source=str(self.path))
        self._check_graph()
        self.model_sha256 = sha256_file(self.path)
        self.model_id = f"{self.info.variant}-{self.model_sha256[:12]}"

    @property
    def member(self) -> MemberModel:
        """What a bank built with this encoder records about it."""
        return MemberModel(self.info, self.model_sha256, self.model_id)

    def _check_graph(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME]:
            raise ModelMetadataError(f"{self.path}: expected one input {INPUT_NAME!r}, graph has {inputs}")
        if tuple(outputs) != self.info.layers:
            raise ModelMetadataError(
                f"{self.path}: graph outputs {outputs} differ from metadata layers {list(self.info.layers)}"
            )

    def embed(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """windows [batch, window_samples] at the model rate -> {layer: [batch, D]} float32."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if windows.ndim == 1:
            windows = windows[None, :]
        if windows.ndim != 2 or windows.shape[1] != self.info.window_samples:
            raise EdgeAsdError(
                f"{self.path.name}: expected windows of shape [batch, {self.info.window_samples}], "
                f"got {list(windows.shape)}"
            )
        values = self.session.run(list(self.info.layers), {INPUT_NAME: windows})
        return dict(zip(self.info.layers, values, strict=True))

    def prepare(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """A clip at any rate -> one window at the model rate (resampled, cropped or tiled)."""
        return fit_to_window(resample(audio, sample_rate, self.info.sample_rate), self.info.window_samples)

    def embed_clip(self, audio: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        return self.embed(self.prepare(audio, sample_rate)[None, :])
