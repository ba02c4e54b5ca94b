"""Export a bundle's user tower as ONNX (``csmf export onnx``, ``csmf build-index --onnx``;
docs/design.md#the-user-tower-as-onnx).

The source is the bundle's own ``user_encoder.npz`` — exactly what the service encodes with:
disallowed connections already zero, the final layer permuted like the index — rebuilt as a small
torch module and written by ``torch.onnx.export`` (the torch.export-based exporter; the
TorchScript one is deprecated) with a dynamic batch and a dynamic length for every pooled input
(history, multi-hot features). Before the file is published it is run by onnxruntime on a probe
of encoded users — batches of 1 and several, histories of several lengths, all-padding rows —
against the numpy encoder; a difference above ``TOLERANCE`` is an :class:`ExportError` and
nothing is written.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from csmf.atomic import fsync_path
from csmf.errors import BundleError, CsmfError
from csmf.onnx_encoder import OUTPUT_NAME, onnx_input_names, onnx_session
from csmf.user_encoder import UserEncoder

OPSET = 18
TOLERANCE = 1e-5  # max abs difference to the numpy encoder on the probe


class ExportError(CsmfError, RuntimeError):
    """A user tower could not be exported, or its ONNX graph does not compute what it should."""


class ExportedUserTower(nn.Module):
    """A UserEncoder's arrays as a traceable torch module: embedding gathers, a masked mean over
    the non-padding slots of each pooled input (as ``UserEncoder.forward``), the MLP."""

    def __init__(self, encoder: UserEncoder) -> None:
        super().__init__()
        self.pooled = [n == "history" or n.startswith("multi:") for n in encoder.inputs]
        for i, t in enumerate(encoder.tables):
            self.register_buffer(f"table_{i}", torch.from_numpy(t.copy()))  # (rows, D_n)
        for i, (w, b) in enumerate(encoder.layers):
            self.register_buffer(f"weight_{i}", torch.from_numpy(w.copy()))  # (in, out)
            self.register_buffer(f"bias_{i}", torch.from_numpy(b.copy()))
        self.num_layers = len(encoder.layers)
        self.num_numeric = encoder.num_numeric
        self.act = {"relu": torch.relu, "silu": nn.functional.silu}[encoder.activation]

    def forward(self, *xs: Tensor) -> Tensor:
        parts = []
        for i, pooled in enumerate(self.pooled):
            table = getattr(self, f"table_{i}")
            rows = table[xs[i]]  # (B, D_n) or (B, L, D_n)
            if pooled:
                mask = (xs[i] > 0).to(rows.dtype)  # (B, L)
                summed = torch.matmul(mask.unsqueeze(1), rows).squeeze(1)  # (B, D_n)
                rows = summed / mask.sum(1, keepdim=True).clamp(min=1.0)
            parts.append(rows)
        if self.num_numeric:
            parts.append(xs[-1])
        x = torch.cat(parts, dim=1)  # (B, in)
        for i in range(self.num_layers):
            x = x @ getattr(self, f"weight_{i}") + getattr(self, f"bias_{i}")
            if i < self.num_layers - 1:
                x = self.act(x)
        return x  # (B, D)


def probe_inputs(encoder: UserEncoder, batch: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random valid index arrays (pooled inputs (batch, length) with padding; row 0 all padding)
    and numeric values, in the model's input layout."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, table in zip(encoder.inputs, encoder.tables, strict=True):
        rows = table.shape[0]
        if name == "history" or name.startswith("multi:"):
            idx = rng.integers(0, rows, (batch, length)).astype(np.int64)
            idx[0] = 0
        else:
            idx = rng.integers(0, rows, batch).astype(np.int64)
        out[name] = idx
    if encoder.num_numeric:
        out["num"] = rng.normal(0, 1, (batch, encoder.num_numeric)).astype(np.float32)
    return out


def _args(encoder: UserEncoder, inputs: dict[str, np.ndarray]) -> tuple[Tensor, ...]:
    keys = [*encoder.inputs, *(["num"] if encoder.num_numeric else [])]
    return tuple(torch.from_numpy(inputs[k]) for k in keys)


def _dynamic_shapes(encoder: UserEncoder) -> tuple[dict[int, object], ...]:
    batch = torch.export.Dim("batch")
    shapes: list[dict[int, object]] = []
    for name in encoder.inputs:
        if name == "history" or name.startswith("multi:"):
            shapes.append({0: batch, 1: torch.export.Dim(f"len_{name.replace(':', '_')}")})
        else:
            shapes.append({0: batch})
    if encoder.num_numeric:
        shapes.append({0: batch})
    return tuple(shapes)


def export_user_tower(encoder: UserEncoder, out: str | Path) -> float:
    """Write ``encoder``'s tower to ``out`` as ONNX (tmp + fsync + rename), after checking the
    graph against the numpy encoder in onnxruntime; returns the largest difference seen on the
    probe. Raises ExportError."""
    out = Path(out)
    module = ExportedUserTower(encoder).eval()
    example = _args(encoder, probe_inputs(encoder, batch=3, length=5, seed=0))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module,
                example,
                input_names=onnx_input_names(encoder),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(_dynamic_shapes(encoder),),  # forward(*xs): one varargs entry
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            program.save(str(tmp), external_data=False)
        fsync_path(tmp)
        worst = check_parity(encoder, tmp)
        os.replace(tmp, out)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except ImportError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"cannot export the user tower: torch.onnx.export needs {exc.name or 'a module'} "
            f"({exc}); pip install 'csmf-retrieval[onnx]'"
        ) from None
    except BundleError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot export the user tower: {exc}") from None
    except Exception as exc:  # the exporter raises many types; all mean "not exportable"
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"torch.onnx.export failed on the user tower ({len(encoder.inputs)} inputs "
            f"{list(encoder.inputs)}, {len(encoder.layers)} layers): {type(exc).__name__}: {exc}"
        ) from None
    return worst


def check_parity(encoder: UserEncoder, path: str | Path) -> float:
    """Max abs difference between onnxruntime on ``path`` and the numpy encoder over a probe of
    batch sizes and pooled lengths; ExportError above TOLERANCE."""
    session = onnx_session(path)
    names = onnx_input_names(encoder)
    worst = 0.0
    for seed, (batch, length) in enumerate([(1, 1), (1, 7), (4, 3), (64, 50), (9, 1)]):
        inputs = probe_inputs(encoder, batch, length, seed + 1)
        want = encoder.forward(inputs)
        got = session.run([OUTPUT_NAME], dict(zip(names, _args_np(encoder, inputs), strict=True)))
        if got[0].shape != want.shape:
            raise ExportError(
                f"the exported tower gives shape {got[0].shape} for batch {batch}, length "
                f"{length}; the numpy encoder {want.shape}"
            )
        worst = max(worst, float(np.abs(got[0] - want).max()))
    if worst > TOLERANCE:
        raise ExportError(
            f"the exported tower differs from the numpy encoder by up to {worst:.3g} "
            f"(tolerance {TOLERANCE:g}); not written"
        )
    return worst


def _args_np(encoder: UserEncoder, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [inputs[k] for k in [*encoder.inputs, *(["num"] if encoder.num_numeric else [])]]
