"""Encode the catalogue with the item tower, and export the user tower as a numpy UserEncoder.

Both sides get the same output permutation: dims sorted by owner (stable), so each objective's
slice is contiguous in cascade order ``[exposure | click | conversion]``. Inner products are
invariant under a shared permutation, so Σ_t k_t s_t is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from csmf.errors import DataError
from csmf.features import TowerSpec, TowerVocab, Vocab, encode_rows
from csmf.progress import progress_bar
from csmf.towers import Tower, TwoTower
from csmf.user_encoder import UserEncoder


def output_permutation(
    output_owner: np.ndarray, num_objectives: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """(perm, slice_sizes): ``vectors[:, perm]`` puts dims of owner 0 first, then 1, ...;
    slice_sizes[t] = number of dims owned by objective t (may be 0).

    Unowned dims (owner T = ``num_objectives``: freed by the last stage for an objective added
    later) are 0 in every vector; they go last and count in the last slice, so the vector keeps
    its width and layout when ``csmf extend`` later gives them to objective T (whose weight 0
    then scales them: old weightings score bit-identically)."""
    owner = np.asarray(output_owner, dtype=np.int64)
    perm = np.argsort(owner, kind="stable")
    sizes = np.bincount(owner, minlength=num_objectives + 1)
    if len(sizes) > num_objectives + 1:
        raise DataError(
            f"output dims owned by objective {owner.max()}, cascade has {num_objectives}"
        )
    sizes[num_objectives - 1] += sizes[num_objectives]
    return perm, tuple(int(s) for s in sizes[:num_objectives])


def read_table(path: str | Path) -> pa.Table:
    """A Parquet or CSV table (by extension; Parquet otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no table at {path}")
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            return pacsv.read_csv(path, parse_options=opts)
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read table {path}: {exc}") from None


def encode_items(
    model: TwoTower,
    spec: TowerSpec,
    vocab: TowerVocab,
    items: pa.Table,
    perm: np.ndarray,
    batch_size: int = 4096,
    progress: bool = True,
) -> np.ndarray:
    """(N, D) float32 permuted, unscaled item vectors, one row per row of ``items``."""
    if spec.id_column not in items.column_names:
        raise DataError(f"item table lacks id column {spec.id_column!r}; has {items.column_names}")
    names = [spec.id_column, *(f.name for f in spec.fields if f.name in items.column_names)]
    n = items.num_rows
    out = np.empty((n, len(perm)), dtype=np.float32)
    model.eval()
    with (
        torch.inference_mode(),
        progress_bar(n, "encode items", "item", progress) as bar,
    ):
        for start in range(0, n, batch_size):
            chunk = items.slice(start, batch_size)
            columns = {c: chunk.column(c).to_pylist() for c in names}
            inputs = encode_rows(spec, vocab, columns)
            v = model.item({k: torch.from_numpy(a) for k, a in inputs.items()})  # (B, D)
            out[start : start + chunk.num_rows] = v.numpy()[:, perm]
            bar.update(chunk.num_rows)
    return out


def user_encoder_from_model(
    tower: Tower, spec: TowerSpec, vocab: TowerVocab, item_vocab: Vocab, perm: Sequence[int]
) -> UserEncoder:
    """Export a torch user tower: disallowed connections zeroed, final layer permuted."""
    perm = np.asarray(perm, dtype=np.int64)
    tables = [tower.table(n).weight.detach().cpu().numpy().astype(np.float32) for n in tower.inputs]
    layers = []
    last = len(tower.layers) - 1
    for i, layer in enumerate(tower.layers):
        with torch.no_grad():
            w = (layer.weight * layer.connection_mask()).cpu().numpy().T  # (in, out)
            b = layer.bias.detach().cpu().numpy()
        if i == last:
            w, b = w[:, perm], b[perm]
        layers.append((w, b))
    return UserEncoder(
        spec=spec,
        vocab=vocab,
        item_vocab=item_vocab,
        inputs=tower.inputs,
        tables=tables,
        layers=layers,
        activation=tower.cfg.activation,
    )
