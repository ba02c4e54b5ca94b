"""Vector indexes behind one interface (docs/design.md#the-index-seam): ``base`` (the VectorIndex
contract), ``faiss`` (Flat / IVF / HNSW / IVF-PQ in the bundle), ``milvus`` (a collection reached by
URI), ``filters`` (the typed attribute-filter language). No torch here: the service imports it."""

from __future__ import annotations

from pathlib import Path

from csmf.errors import BundleError
from csmf.index.base import Capabilities, IndexSpec, RowSet, VectorIndex, Where, check_write

__all__ = [
    "Capabilities",
    "IndexSpec",
    "RowSet",
    "VectorIndex",
    "Where",
    "check_write",
    "open_index",
]


def open_index(spec: IndexSpec, folder: Path, uri: str | None = None) -> VectorIndex:
    """The index a manifest's ``index`` section describes: FAISS files in ``folder``, or a
    Milvus collection at ``uri`` (default: the URI recorded at build time)."""
    if spec.backend == "faiss":
        from csmf.index.faiss import FAISS_TYPES, FaissIndex

        if spec.type not in FAISS_TYPES:
            raise BundleError(
                f"manifest index.type must be one of {FAISS_TYPES}, got {spec.type!r}"
            )
        return FaissIndex.load(
            folder,
            spec.type,
            spec.search_params,
            build_params=spec.build_params,
            item_offset=spec.item_offset,
            exact_below=spec.exact_below,
        )
    from csmf.index.milvus import MilvusIndex  # pymilvus is an optional extra

    return MilvusIndex.connect(spec, uri)
