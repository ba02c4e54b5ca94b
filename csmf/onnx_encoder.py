"""The bundle's user tower run by onnxruntime (``CSMF_ENCODER=onnx``;
docs/design.md#the-user-tower-as-onnx).

``user_tower.onnx`` (written by ``csmf export onnx`` or ``csmf build-index --onnx``,
index_builder/onnx_export.py) computes what :meth:`UserEncoder.forward` computes from the same
index arrays: the model's inputs in :attr:`UserEncoder.inputs` order (``id`` and ``cat:<f>``
(B,) int64; ``multi:<f>`` and ``history`` (B, L) int64, 0 = padding; ``num`` (B, F) float32 last)
→ ``user_vector`` (B, D), final layer permuted like the index. Batch and every L are dynamic.
Raw rows still become index arrays here, in numpy (vocabulary lookups are not a graph's job).

No torch here either: onnxruntime alone runs the graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csmf.errors import BundleError
from csmf.user_encoder import UserEncoder

ONNX_FILE = "user_tower.onnx"
OUTPUT_NAME = "user_vector"
ENCODERS = ("numpy", "onnx")  # CSMF_ENCODER: what runs the user tower in the service


def onnx_input_names(encoder: UserEncoder) -> list[str]:
    """The graph's input names, in the order of its arguments: the tower's inputs with ':' made
    '__' ('cat:seg' → 'cat__seg'), then ``num`` if the tower has numeric features."""
    names = [n.replace(":", "__") for n in encoder.inputs]
    return names + (["num"] if encoder.num_numeric else [])


def import_onnxruntime():
    """onnxruntime, or a BundleError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BundleError(
            f"the onnx user encoder needs onnxruntime, which this install lacks ({exc}): "
            "pip install 'csmf-retrieval[onnx]' (or set CSMF_ENCODER=numpy)"
        ) from None
    return onnxruntime


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session on ``path``: ``threads`` intra-op threads (1 by default, as the
    service runs one worker per core), graph optimisations on."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a bad or missing file
        raise BundleError(f"cannot load ONNX user tower {path}: {exc}") from None


class OnnxUserEncoder:
    """Raw user features + history → permuted user vectors (n, D) float32, like
    :class:`UserEncoder` (whose spec, vocabularies and input encoding it shares), with the tower
    itself run by onnxruntime."""

    def __init__(self, encoder: UserEncoder, path: str | Path, threads: int = 1) -> None:
        self.numpy_encoder = encoder
        self.spec = encoder.spec
        self.vocab = encoder.vocab
        self.item_vocab = encoder.item_vocab
        self.inputs = encoder.inputs
        self.dim = encoder.dim
        self.path = Path(path)
        self.session = onnx_session(path, threads)
        self._feeds = list(zip(onnx_input_names(encoder), [*encoder.inputs, "num"], strict=False))
        self._check_signature()

    def _check_signature(self) -> None:
        got = [i.name for i in self.session.get_inputs()]
        want = [name for name, _ in self._feeds]
        if got != want:
            raise BundleError(
                f"ONNX user tower {self.path} takes inputs {got}, the bundle's encoder gives "
                f"{want}: the file was exported from another tower"
            )
        out = self.session.get_outputs()
        width = out[0].shape[-1] if out and out[0].shape else None
        if len(out) != 1 or out[0].name != OUTPUT_NAME or width != self.dim:
            raise BundleError(
                f"ONNX user tower {self.path} must output {OUTPUT_NAME!r} of width {self.dim}, "
                f"got {[(o.name, o.shape) for o in out]}"
            )

    def encode_inputs(
        self, rows: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[str]] | None = None
    ) -> dict[str, np.ndarray]:
        return self.numpy_encoder.encode_inputs(rows, histories)

    def forward(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Encoded inputs (as :func:`csmf.features.encode_rows` returns them) → (n, D)."""
        feeds = {name: inputs[key] for name, key in self._feeds}
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def encode(
        self, rows: Sequence[Mapping[str, Any]], histories: Sequence[Sequence[str]] | None = None
    ) -> np.ndarray:
        """(n, D) float32 user vectors; ``rows[i]`` may be empty (the cold-start vector)."""
        return self.forward(self.encode_inputs(rows, histories))

    def cold_start(self) -> np.ndarray:
        return self.encode([{}], [()])[0]
