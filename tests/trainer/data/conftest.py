"""Fixtures for the data adapters: the real MovieLens-100K (fetched once, cached), a small synthetic
dataset, and a builder for hand-made dataset folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data.movielens import convert_ml100k, default_cache_dir, fetch_ml100k
from trainer.data.synthetic import SyntheticConfig, generate_synthetic

SMALL_SYNTHETIC = SyntheticConfig(
    users=300, items=1_000, exposures=40_000, seed=7, candidates_per_request=3, chunk_size=15_000
)


@pytest.fixture(scope="session")
def ml100k_cache() -> Path:
    """The real cache ($CSMF_CACHE_DIR or ~/.cache/csmf): downloads the wheel on first use only."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def ml100k_src(ml100k_cache: Path) -> dict[str, Path]:
    return fetch_ml100k(ml100k_cache)


@pytest.fixture(scope="session")
def ml100k_dir(ml100k_src: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ml-100k")
    convert_ml100k(ml100k_src, out)
    return out


@pytest.fixture(scope="session")
def small_config() -> SyntheticConfig:
    """The config ``small_synthetic`` was generated with."""
    return SMALL_SYNTHETIC


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(SMALL_SYNTHETIC, out)
    return out


def _base_tables() -> dict[str, dict]:
    """A valid 3-user, 4-item dataset (every objective has positives)."""
    return {
        "events": {
            "user_id": [1, 1, 2, 3, 3],
            "item_id": [10, 11, 10, 12, 13],
            "timestamp": [100, 200, 150, 300, 310],
            "clicked": [True, False, True, True, False],
            "converted": [True, False, False, False, False],
            "request_id": [1, 2, 3, 4, 4],
        },
        "users": {"user_id": [1, 2, 3], "segment": ["a", "b", "a"], "age": [20.0, 30.0, 40.0]},
        "items": {
            "item_id": [10, 11, 12, 13],
            "topic": ["x", "y", "x", "z"],
            "tags": [["p"], ["p", "q"], [], ["q"]],
            "title": ["A", "B", "C", "D"],
        },
    }


MakeDataset = Callable[..., Path]


@pytest.fixture
def make_dataset(tmp_path: Path) -> MakeDataset:
    """``make_dataset(events=..., users=..., items=..., candidates=..., parts=0)`` writes a
    dataset folder; each table is the valid base with the given columns replaced (a value of
    ``None`` drops the column; ``pa.Table`` values are written as given). ``parts > 0`` writes
    events as ``events/part-*.parquet`` split into that many files."""
    counter = iter(range(1_000_000))

    def build(
        *,
        events: dict | pa.Table | None = None,
        users: dict | pa.Table | None = None,
        items: dict | pa.Table | None = None,
        candidates: dict | pa.Table | None = None,
        parts: int = 0,
    ) -> Path:
        root = tmp_path / f"ds{next(counter)}"
        root.mkdir()
        base = _base_tables()
        tables = {
            name: _table(base[name], override)
            for name, override in (("events", events), ("users", users), ("items", items))
        }
        if candidates is not None:
            tables["candidates"] = _table({}, candidates)
        for name, table in tables.items():
            if name == "events" and parts:
                (root / "events").mkdir()
                step = -(-table.num_rows // parts)
                for p in range(parts):
                    pq.write_table(
                        table.slice(p * step, step), root / "events" / f"part-{p:05d}.parquet"
                    )
            else:
                pq.write_table(table, root / f"{name}.parquet")
        return root

    return build


def _table(base: dict, override: dict | pa.Table | None) -> pa.Table:
    if isinstance(override, pa.Table):
        return override
    cols = dict(base)
    for k, v in (override or {}).items():
        if v is None:
            cols.pop(k, None)
        else:
            cols[k] = v
    return pa.table(cols)
