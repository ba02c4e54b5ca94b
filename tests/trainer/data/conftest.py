"""Fixtures for the data adapters: the real MovieLens-100K (fetched once, cached) and a small
synthetic dataset. The builder of hand-made dataset folders, ``make_dataset``, is shared with the
reliability suite: tests/fixtures/datasets.py."""

from __future__ import annotations

from pathlib import Path

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
