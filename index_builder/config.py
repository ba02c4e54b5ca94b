"""Build configuration: one frozen dataclass, validated at construction, written into the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from csmf.errors import ConfigError
from csmf.index.faiss import FAISS_TYPES, FaissSpec

BACKENDS = ("faiss", "milvus")
MILVUS_TYPES = ("flat", "ivf", "hnsw")  # → Milvus FLAT, IVF_FLAT, HNSW


@dataclass(frozen=True)
class BuildConfig:
    index: str = field(
        default="ivf",
        metadata={
            "help": "flat = exact; hnsw / ivf = approximate, checked by the recall floor; ivfpq = "
            "compressed codes for catalogues past memory (FAISS only)",
            "choices": FAISS_TYPES,
        },
    )
    backend: str = field(
        default="faiss",
        metadata={
            "help": "faiss = index files in the bundle; milvus = a collection at --uri",
            "choices": BACKENDS,
        },
    )
    uri: str | None = field(
        default=None,
        metadata={"help": "milvus: a Milvus Lite file (*.db) or http://host:19530 (Standalone)"},
    )
    collection: str = field(
        default="csmf_items",
        metadata={"help": "milvus: alias moved to each new bundle's versioned collection"},
    )
    pq_m: int | None = field(
        default=None, metadata={"help": "ivfpq: sub-quantizers (code bytes); None = dim / 4"}
    )
    pq_bits: int | None = field(
        default=None, metadata={"help": "ivfpq: bits per code; None = 8 (fewer for tiny data)"}
    )
    opq: bool = field(default=False, metadata={"help": "ivfpq: learn an OPQ rotation first"})
    rerank: int = field(
        default=0,
        metadata={"help": "ivfpq: re-rank rerank·k PQ candidates with exact vectors; 0 = off"},
    )
    exact_below: float | None = field(
        default=None,
        metadata={
            "help": "a filter allowing less than this share of items searches exactly over the "
            "allowed rows; None = measured default (HNSW 10 %, flat 5 %, IVF 0.2·sqrt(nprobe/"
            "nlist) capped at 5 %: 3.2 % at 100k items, 1.4 % at 1M; bench/results/"
            "index-backends.md)"
        },
    )
    filter_columns: tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "comma-separated item columns filterable at serving ('' = none); default: "
            "every scalar item feature column (categorical / numeric) the item table holds"
        },
    )
    hnsw_m: int = field(default=32, metadata={"help": "HNSW graph degree M"})
    ef_construction: int = field(default=200, metadata={"help": "HNSW efConstruction"})
    ef_search: int = field(default=128, metadata={"help": "HNSW efSearch used at serving"})
    nlist: int | None = field(
        default=None, metadata={"help": "IVF lists; None = by catalogue size"}
    )
    nprobe: int = field(default=32, metadata={"help": "IVF lists probed at serving"})
    ivf_train_per_list: int = field(
        default=128, metadata={"help": "k-means training points per IVF list (subsampled)"}
    )
    center: str = field(
        default="auto",
        metadata={
            "help": "index item vectors minus their mean (ranking-exact; the bundle adds q·mean back "
            "to scores): auto = for hnsw, whose graph degrades on IP data with a common offset",
            "choices": ("auto", "on", "off"),
        },
    )
    recall_floor: float = field(default=0.95, metadata={"help": "min weighted recall@k to publish"})
    tune: bool = field(
        default=False,
        metadata={
            "help": "lower nprobe / ef_search (never raise) to the smallest value whose weighted "
            "recall on a separate sample of users reaches recall_floor + tune_margin"
        },
    )
    tune_margin: float = field(
        default=0.01, metadata={"help": "headroom above the floor when tuning"}
    )
    recall_k: int = field(default=50, metadata={"help": "k of the recall check"})
    recall_queries: int = field(default=1000, metadata={"help": "snapshot users used as queries"})
    batch_size: int = field(default=4096, metadata={"help": "items per encoding batch"})
    history: str = field(
        default="train",
        metadata={
            "help": "snapshot history: the run's train split ('train') or every event ('all')",
            "choices": ("train", "all"),
        },
    )
    threads: int = field(default=0, metadata={"help": "FAISS/torch threads; 0 = all cores"})
    seed: int = field(default=0, metadata={"help": "seed for k-means and query sampling"})
    allow_unknown_items: bool = field(
        default=False,
        metadata={"help": "index item ids the checkpoint has no embedding for, as cold items"},
    )
    allow_dataset_change: bool = field(
        default=False,
        metadata={"help": "build although the dataset's fingerprint differs from training's"},
    )
    onnx: bool = field(
        default=False,
        metadata={
            "help": "also write the user tower as ONNX (user_tower.onnx, checksummed like every "
            "bundle file) for CSMF_ENCODER=onnx; needs the onnx extra"
        },
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        types = FAISS_TYPES if self.backend == "faiss" else MILVUS_TYPES
        if self.index not in types:
            raise ConfigError(
                f"index must be one of {types} for backend {self.backend}, got {self.index!r}"
            )
        if self.backend == "milvus" and not self.uri:
            raise ConfigError("backend milvus needs a uri (a Milvus Lite *.db file or http://...)")
        if self.backend == "faiss" and self.uri:
            raise ConfigError(f"uri is for backend milvus, got uri {self.uri!r} with faiss")
        if self.filter_columns is not None:
            object.__setattr__(self, "filter_columns", tuple(self.filter_columns))
        if self.backend == "faiss":
            self.faiss_spec()  # validates the FAISS-specific options
        positive = {
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
            "ivf_train_per_list": self.ivf_train_per_list,
            "recall_k": self.recall_k,
            "recall_queries": self.recall_queries,
            "batch_size": self.batch_size,
        }
        for name, v in positive.items():
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError(f"nlist must be >= 1 (or unset for automatic), got {self.nlist}")
        if not 0.0 <= self.tune_margin <= 1.0:
            raise ConfigError(f"tune_margin must be in [0, 1], got {self.tune_margin}")
        if not 0.0 <= self.recall_floor <= 1.0:
            raise ConfigError(f"recall_floor must be in [0, 1], got {self.recall_floor}")
        if self.center not in ("auto", "on", "off"):
            raise ConfigError(f"center must be 'auto', 'on' or 'off', got {self.center!r}")
        if self.history not in ("train", "all"):
            raise ConfigError(f"history must be 'train' or 'all', got {self.history!r}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")

    @property
    def centered(self) -> bool:
        return self.center == "on" or (self.center == "auto" and self.index == "hnsw")

    def faiss_spec(self) -> FaissSpec:
        """The FAISS build parameters (validates the IVF-PQ options)."""
        return FaissSpec(
            kind=self.index,
            hnsw_m=self.hnsw_m,
            ef_construction=self.ef_construction,
            ef_search=self.ef_search,
            nlist=self.nlist,
            nprobe=self.nprobe,
            train_per_list=self.ivf_train_per_list,
            pq_m=self.pq_m,
            pq_bits=self.pq_bits,
            opq=self.opq,
            rerank=self.rerank,
            exact_below=self.exact_below,
            centered=self.centered,
            seed=self.seed,
        )

    def milvus_spec(self):  # -> csmf.index.milvus.MilvusSpec (pymilvus imported only here)
        """The Milvus build parameters: FLAT / IVF_FLAT / HNSW with this config's knobs."""
        from csmf.index.milvus import MilvusSpec

        build: dict[str, Any] = {}
        search: dict[str, Any] = {}
        if self.index == "ivf":
            build = {"nlist": self.nlist} if self.nlist else {}
            search = {"nprobe": self.nprobe}
        elif self.index == "hnsw":
            build = {"M": self.hnsw_m, "efConstruction": self.ef_construction}
            search = {"ef": self.ef_search}
        return MilvusSpec(
            uri=self.uri, alias=self.collection, kind=self.index, build_params=build,
            search_params=search,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
