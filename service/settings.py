"""Service settings, read from ``CSMF_*`` environment variables (pydantic-settings).

One :class:`Settings` instance is built by the caller (``csmf serve`` or a test) and passed into
:func:`service.main.create_app`; nothing in the service reads a global settings object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from csmf.onnx_encoder import import_onnxruntime


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSMF_", extra="ignore", frozen=True)

    bundle: Path = Field(description="bundle folder to serve (written by `csmf build-index`)")
    index_uri: str | None = Field(
        None,
        description="vector engine URI for a Milvus-backed bundle (e.g. http://milvus:19530); "
        "unset = the URI the bundle was built with. FAISS bundles ignore it",
    )
    encoder: Literal["numpy", "onnx"] = Field(
        "numpy",
        description="what runs the user tower: numpy (user_encoder.npz), or onnx (the bundle's "
        "user_tower.onnx in onnxruntime, from `csmf build-index --onnx`; needs onnxruntime). "
        "numpy by measurement (bench/results/serve.md)",
    )
    verify_bundle: bool = Field(
        True, description="check every bundle file's SHA-256 at startup and on reload"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token for /admin/*; the admin API is disabled when unset"
    )
    redis_url: str | None = Field(
        None,
        description="Redis for scenarios (and features if feature_store=redis); unset = embedded",
    )
    redis_prefix: str = Field("csmf:", description="prefix of every Redis key and channel")
    feature_store: Literal["bundle", "redis"] = Field(
        "bundle",
        description="bundle: the bundle's user snapshot; redis: snapshot overlaid by live Redis data",
    )
    scenarios_file: Path = Field(
        Path(".cache/csmf/scenarios.json"),
        description="embedded weight store file (used when redis_url is unset)",
    )
    control_dir: Path | None = Field(
        None,
        description="folder shared by the workers of one server, set by `csmf serve`: a reload in "
        "one worker is announced there and followed by the others",
    )
    default_k: int = Field(50, ge=1, description="k when a request gives none")
    max_k: int = Field(1000, ge=1, description="largest k a request may ask for")
    max_batch: int = Field(1000, ge=1, description="most users in one /v1/retrieve/batch call")
    max_item_batch: int = Field(
        1000, ge=1, description="most items in one PUT/DELETE /admin/items call"
    )
    items_visible_timeout_s: float = Field(
        2.0, gt=0, description="an item write is acknowledged once every live replica applied "
        "it; 503 if one has not within this time (the write is durable and still applied)"
    )  # fmt: skip
    truncate_item_log: bool = Field(
        False, description="drop the item log's records that a compacted bundle folded in, once "
        "every replica heard from in the last 30 s serves such a bundle. Off by default: a bundle "
        "rebuilt from the source tables (csmf daily, build-index) replays the whole log to get "
        "the written items back, and refuses to load once their records are gone"
    )  # fmt: skip
    max_body_bytes: int = Field(4 << 20, ge=1024, description="larger request bodies get 413")
    sync_interval_s: float = Field(
        0.25, gt=0, le=1.0, description="how often stores poll Redis/the file for a change"
    )
    redis_timeout_s: float = Field(0.5, gt=0, description="socket timeout of Redis calls")
    batch_threads: int = Field(
        1,
        ge=1,
        description="FAISS OpenMP threads per batch search. 1 by measurement: with a worker per "
        "core, concurrent batches already fill the cores and extra threads oversubscribe them "
        "(1M items, 2 workers, 2 clients: 6.4k users/s with 1, 5.5k with 2); raise it for a lone "
        "batch client on an otherwise idle machine",
    )

    metrics_scenario_labels: Literal["name", "hash", "none"] = Field(
        "name",
        description="the `scenario` label on /metrics (which is unauthenticated): the scenario "
        "name; `hash`: h- + 10 hex digits of its SHA-256 (stable across replicas); `none`: every "
        "named scenario counted as `_named` and the per-scenario weight gauge left out",
    )

    feedback_key: SecretStr | None = Field(
        None,
        description="key that signs request ids (POST /v1/feedback verifies them on any replica); "
        "unset = a random key created once in Redis (with redis_url) or in feedback.key beside "
        "the scenarios file, never derived from admin_token (see service/feedback_key.py)",
    )
    feedback_ttl_s: float = Field(
        7 * 86400.0, gt=0, description="feedback is accepted this long after the retrieve"
    )
    event_log_dir: Path | None = Field(
        None,
        description="folder of the served/feedback event log (events/part-*.parquet, the dataset "
        "schema); unset = no log (counters on /metrics still work)",
    )
    event_log_rotate_s: float = Field(
        60.0, gt=0, description="a log part is written at least this often"
    )
    event_log_rotate_rows: int = Field(
        100_000, ge=1, description="... or when it holds this many rows"
    )
    event_log_sync_s: float = Field(
        0.2,
        ge=0,
        description="accepted events are fsynced to the log's spool at least this often: a crash "
        "(kill -9, power cut) loses at most this window; 0 = fsync every batch of entries",
    )
    event_log_queue: int = Field(
        100_000, ge=1, description="queued log entries before new ones are dropped (and counted)"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        if self.feature_store == "redis" and not self.redis_url:
            raise ValueError("feature_store=redis needs CSMF_REDIS_URL")
        if self.encoder == "onnx":  # at startup, not on the first request
            import_onnxruntime()
        return self
