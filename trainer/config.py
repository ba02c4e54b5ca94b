"""Training configuration: frozen dataclasses loaded from TOML plus ``--set section.key=value``
overrides, validated at construction and stored (as a plain dict) in every checkpoint.

Sections follow the paper: ``[cascade]`` holds CPP / AR (§4.2–4.3, §5.1.3: tau = 0.75),
``[loss]`` the sampled softmax with log-Q and the AML margin (§4.4: eta = 1.8), ``[train]`` the
optimisation budget, ``[split]`` and ``[eval]`` the protocol of §5.1.4, ``[model]`` the towers
(:class:`csmf.towers.ModelConfig`) and ``[features]`` the feature spec (:mod:`csmf.features`).
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import csmf.objectives as funnel
from csmf.errors import ConfigError
from csmf.features import FeatureSpec
from csmf.towers import ModelConfig
from csmf.weights import DEFAULT_OBJECTIVES, DEFAULT_WEIGHTS

PRUNING = ("cpp", "fixed", "random")
FREED_INIT = ("warm", "reinit")
AML_UPSTREAM = ("prob", "logit")
NEGATIVES = ("in-batch", "catalogue")
TRAIN_HISTORY = ("before", "others")
DEVICES = ("auto", "cpu", "cuda")
ID_TABLES = ("row-wise", "dense")
DATA_MODES = ("auto", "memory", "stream")


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class CascadeConfig:
    """The CSMF stage loop: train → CPP → AR → freeze → next (docs/design.md#the-cascade)."""

    objectives: tuple[str, ...] = _help(
        "cascade order; stage t trains on positives of objectives[t]", DEFAULT_OBJECTIVES
    )
    pruning: str = _help(
        "'cpp' (cumulative percentile), 'fixed' (least important fraction tau, 'w/o CPP') or "
        "'random' (CPP's count per layer, units drawn at random)",
        "cpp",
    )
    tau: float = _help("CPP: free units whose cumulative importance is <= tau (paper 0.75)", 0.75)
    min_keep: int = _help("guard rail: units per layer that stay with the stage", 2)
    min_free: int = _help("guard rail: units per layer freed for the next stage", 1)
    accuracy_recovery: bool = _help("AR: fine-tune kept units after CPP ('w/o AR' if false)", True)
    rho: float = _help("AR: fraction of the stage's training positives used", 1.0)
    freed_init: str = _help("freed units start 'warm' (keep values) or 'reinit'", "warm")
    last_tau: float = _help(
        "CPP tau of the last stage: > 0 frees its least important units (then AR) and leaves them "
        "unowned, zeroed, for an objective added later (csmf extend); 0 = the paper (the last "
        "stage keeps every unit)",
        0.0,
    )
    labels: dict = field(
        default_factory=dict,
        metadata={
            "help": "objectives added to the funnel's (csmf extend): name → the bool events "
            "column marking their positives, e.g. {cart = 'carted'}"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.labels, dict):
            raise ConfigError(f"cascade.labels must be a table name → column, got {self.labels!r}")
        for name, column in self.labels.items():
            funnel.define(name, column)
        object.__setattr__(self, "objectives", funnel.check_cascade(self.objectives))
        _in_range("cascade.last_tau", self.last_tau, 0.0, 1.0, open_high=True)
        _choice("cascade.pruning", self.pruning, PRUNING)
        _choice("cascade.freed_init", self.freed_init, FREED_INIT)
        _in_range("cascade.tau", self.tau, 0.0, 1.0, open_low=True, open_high=True)
        _in_range("cascade.rho", self.rho, 0.0, 1.0, open_low=True)
        if self.min_keep < 1 or self.min_free < 0:
            raise ConfigError(
                f"cascade.min_keep must be >= 1 and min_free >= 0, "
                f"got {self.min_keep}, {self.min_free}"
            )


@dataclass(frozen=True)
class LossConfig:
    """Sampled softmax over in-batch negatives (docs/design.md#loss-and-aml) and the AML margin."""

    temperature: float = _help("softmax temperature: logits are s_t / temperature", 0.2)
    log_q: bool = _help("subtract log sampling probability of each in-batch item", True)
    extra_negatives: int = _help("uniformly sampled catalogue negatives shared by a batch", 0)
    request_negatives: int = _help(
        "exposure stage: unexposed candidates of the same request per example (if data has them)",
        4,
    )
    page_negatives: int = _help(
        "exposure stage: up to this many items shown but not clicked in the example's own page "
        "view (train events sharing its request_id; never its positive) as extra negatives, "
        "besides the in-batch ones: the CSMF paper's exposure-stage negatives. Needs events "
        "with a request_id (synthetic data has them, MovieLens-100K does not) held in memory "
        "(not train.data = 'stream') and loss.negatives = 'in-batch'; 0 = off",
        0,
    )
    negatives: str = _help(
        "'in-batch': sampled softmax over the batch's positives (+ extra/request negatives), "
        "log-Q corrected; 'catalogue': exact softmax over every item (no sampling, no log-Q) — "
        "affordable for catalogues up to ~100k items",
        "in-batch",
    )
    aml: bool = _help("adaptive margin at stages t >= 1 ('w/o AML' if false)", True)
    sigma: float = _help("AML base margin, in logit units", 0.1)
    eta: float = _help("AML: extra weight when upstream disagrees (paper 1.8)", 1.8)
    aml_upstream: str = _help(
        "stage >= 2 upstream score: 'prob' = product of upstream sigmoid probabilities (paper), "
        "'logit' = previous stage's logit (stage 1 always uses s_0's logit)",
        "prob",
    )

    def __post_init__(self) -> None:
        _in_range("loss.temperature", self.temperature, 0.0, None, open_low=True)
        _choice("loss.aml_upstream", self.aml_upstream, AML_UPSTREAM)
        _choice("loss.negatives", self.negatives, NEGATIVES)
        counts = (self.extra_negatives, self.request_negatives, self.page_negatives)
        if min(counts) < 0:
            raise ConfigError(
                "loss.extra_negatives, loss.request_negatives and loss.page_negatives must be "
                f">= 0, got {', '.join(map(str, counts))}"
            )
        if self.page_negatives and self.negatives == "catalogue":
            raise ConfigError(
                f"loss.page_negatives = {self.page_negatives} needs loss.negatives = 'in-batch': "
                "the 'catalogue' softmax already has every item as a negative"
            )
        if self.eta < 1.0:
            raise ConfigError(f"loss.eta must be >= 1 (disagreement costs more), got {self.eta}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation budget. ``epochs``/``lr`` hold one value for every stage or one per stage."""

    batch_size: int = _help("examples per step (in-batch negatives = batch_size - 1)", 1024)
    lr: tuple[float, ...] = _help("Adam learning rate, one value or one per stage", (2e-3,))
    epochs: tuple[int, ...] = _help("epochs per stage, one value or one per stage", (10,))
    ar_epochs: int = _help("epochs of accuracy recovery over the rho subset", 6)
    weight_decay: float = _help("L2 on trainable entries only (frozen entries never decay)", 0.0)
    seed: int = _help("seed for init, batching and sampling", 0)
    threads: int = _help(
        "torch intra-op threads; 0 = torch's default (one per core). Set 1 when another "
        "CPU-heavy job shares the machine: two 2-thread trainings on 2 cores ran ~10x slower "
        "(OpenMP oversubscription), while alone 2 threads are only ~1.3x faster than 1",
        0,
    )
    history: tuple[str, ...] = _help(
        "history visible to a training example, one value or one per stage: 'before' = the "
        "user's train events strictly earlier than it (next-item); 'others' = all of the user's "
        "train events but the target (set completion, what evaluation sees: the whole train "
        "history)",
        ("before",),
    )
    history_dropout: tuple[float, ...] = _help(
        "probability of blanking each history item of a training example (denoising; 0 = off), "
        "one value or one per stage; never applied when encoding users for evaluation or serving",
        (0.0,),
    )
    device: str = _help(
        "'auto' (CUDA when torch sees a GPU, else CPU), 'cpu' or 'cuda'; under torchrun each "
        "process uses cuda:LOCAL_RANK",
        "auto",
    )
    id_tables: str = _help(
        "'row-wise': id tables get row-sparse gradients and SparseAdam (lazy Adam), so a step "
        "touches only the rows its batch looked up and costs the same at 10M rows as at 10k; "
        "'dense': whole-table gradients and Adam (the earlier path, kept for comparison: its step "
        "cost grows with the table)",
        "row-wise",
    )
    prefetch: int = _help(
        "batches prepared ahead of the step by a background thread (Parquet decoding, id lookup, "
        "shuffling); 0 = in the training loop",
        2,
    )
    restore_each_step: bool = _help(
        "belt and braces: copy frozen entries back after every step (verified per stage anyway)",
        False,
    )
    save_moments: bool = _help(
        "keep each stage's final Adam moments in the run folder (moments.pt: about twice the id "
        "tables' size) so a warm start continues the optimisation (warm.moments)",
        True,
    )
    data: str = _help(
        "'memory' reads every event into RAM; 'stream' reads Parquet row groups per epoch through "
        "a bounded shuffle buffer (trainer.data.stream: RSS independent of the event count); "
        "'auto' streams when the dataset has more than stream_above events",
        "auto",
    )
    stream_above: int = _help("'auto' streams datasets with more events than this", 5_000_000)
    max_steps: int = _help(
        "cap on optimizer steps per epoch (0 = none): for benchmarks and smoke runs", 0
    )
    cache_examples: int = _help(
        "streaming: a stage with at most this many train positives per process is read once and "
        "shuffled in memory every epoch (~40 B an example) instead of re-reading every event per "
        "epoch to find them (clicks are ~10 %, conversions ~1 % of the events); 0 = always stream",
        4_000_000,
    )
    shuffle_buffer: int = _help(
        "streaming: examples held in the shuffle buffer per process (memory ~40 B each)", 262_144
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _as_tuple(self.lr, float, "train.lr"))
        object.__setattr__(self, "epochs", _as_tuple(self.epochs, int, "train.epochs"))
        object.__setattr__(self, "history", _as_tuple(self.history, str, "train.history"))
        object.__setattr__(
            self, "history_dropout", _as_tuple(self.history_dropout, float, "train.history_dropout")
        )
        for h in self.history:
            _choice("train.history", h, TRAIN_HISTORY)
        _choice("train.device", self.device, DEVICES)
        _choice("train.id_tables", self.id_tables, ID_TABLES)
        if self.prefetch < 0:
            raise ConfigError(f"train.prefetch must be >= 0, got {self.prefetch}")
        _choice("train.data", self.data, DATA_MODES)
        if self.cache_examples < 0:
            raise ConfigError(f"train.cache_examples must be >= 0, got {self.cache_examples}")
        if self.stream_above < 0 or self.shuffle_buffer < 1 or self.max_steps < 0:
            raise ConfigError(
                "train.stream_above and train.max_steps must be >= 0 and train.shuffle_buffer "
                f">= 1, got {self.stream_above}, {self.max_steps}, {self.shuffle_buffer}"
            )
        if not all(0.0 <= p < 1.0 for p in self.history_dropout):
            raise ConfigError(
                f"train.history_dropout must be in [0, 1), got {list(self.history_dropout)}"
            )
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size must be >= 2, got {self.batch_size}")
        if self.threads < 0:
            raise ConfigError(f"train.threads must be >= 0 (0 = torch default), got {self.threads}")
        if any(v <= 0 for v in self.lr):
            raise ConfigError(f"train.lr must be > 0, got {list(self.lr)}")
        if any(v < 0 for v in self.epochs) or self.ar_epochs < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"train.epochs/ar_epochs/weight_decay must be >= 0, got {list(self.epochs)}, "
                f"{self.ar_epochs}, {self.weight_decay}"
            )

    def stage_lr(self, stage: int) -> float:
        return _of_stage(self.lr, stage)

    def stage_epochs(self, stage: int) -> int:
        return _of_stage(self.epochs, stage)

    def stage_history(self, stage: int) -> tuple[str, float]:
        """(history mode, history dropout) of stage ``stage``."""
        return _of_stage(self.history, stage), _of_stage(self.history_dropout, stage)


def _of_stage(values: tuple, stage: int):
    """A per-stage setting's value at ``stage``: one value serves every stage."""
    return values[stage] if len(values) > 1 else values[0]


@dataclass(frozen=True)
class SplitConfig:
    """Per-user time split (trainer.data.dataset.split_by_time)."""

    val_frac: float = _help("latest-but-test fraction of each user's events for validation", 0.1)
    test_frac: float = _help("latest fraction of each user's events for test", 0.2)
    min_events: int = _help("users with fewer events stay entirely in train", 3)
    test_from: int = _help(
        "unix time > 0: a global time split instead — events at or after it are test, the latest "
        "val_frac of the events before it validation (csmf.split); 0 = the per-user split",
        0,
    )

    def __post_init__(self) -> None:
        if self.test_from < 0:
            raise ConfigError(f"split.test_from must be a unix time >= 0, got {self.test_from}")
        _in_range("split.val_frac", self.val_frac, 0.0, 1.0, open_high=True)
        _in_range("split.test_frac", self.test_frac, 0.0, 1.0, open_high=True)
        if self.val_frac + self.test_frac >= 1 or self.min_events < 1:
            raise ConfigError(
                "split needs val_frac + test_frac < 1 and min_events >= 1, got "
                f"{self.val_frac} + {self.test_frac}, {self.min_events}"
            )


@dataclass(frozen=True)
class EvalConfig:
    n: int = _help("cut-off N of Recall@N / nDCG@N", 50)
    weights: tuple[float, ...] = _help("fused-score weight per objective", DEFAULT_WEIGHTS)
    val_users: int = _help("max validation users scored per stage (0 = all)", 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.n < 1:
            raise ConfigError(f"eval.n must be >= 1, got {self.n}")


WARM_TRAIN = ("owned", "tables", "touched", "ids", "new-rows")
WARM_MOMENTS = ("carry", "fresh")


@dataclass(frozen=True)
class WarmConfig:
    """``csmf train --from RUN``: fine-tune each stage's own units on the new events
    (trainer/warm.py; docs/design.md#warm-start)."""

    epochs: tuple[int, ...] = _help(
        "epochs per stage over the new events, one or one per stage. ML-100K chose 2 at 5x "
        "train.lr (configs/ml-100k.toml; bench/results/continual-ml-100k-choice.md): +11.0 % "
        "against a full retrain, where 10 epochs at train.lr gave +12.7 % with five times the steps",
        (2,),
    )
    lr: tuple[float, ...] = _help(
        "learning rate per stage; () = train.lr. A warm start moves only the id rows its "
        "events name (warm.train = 'ids'), and few steps need a larger rate",
        (),
    )
    replay: float = _help(
        "older train positives mixed in per new one (rehearsal against forgetting); 0 = only "
        "the new events",
        0.0,
    )
    train: str = _help(
        "what each stage fine-tunes among the units it owns: 'owned' (every one: tables and "
        "layers), 'tables' (embedding rows the new events look up, the catalogue softmax's "
        "negatives included; layers stay), 'touched' ('tables', but an item's id row moves only "
        "if a new positive names it: the catalogue's other items stay), 'ids' (only id rows, the "
        "active users' and the named items', and rows grown since: category and history rows, "
        "which every user shares, stay), 'new-rows' (only the "
        "rows this update added, for users and items first seen; everything else stays). "
        "'ids' beat the others on half of the test window's users (bench/results/"
        "continual-ml-100k-choice.md; docs/design.md#warm-start)",
        "ids",
    )

    moments: str = _help(
        "'carry': each stage's optimizer starts from the --from run's final Adam moments "
        "(moments.pt; trainer/moments.py), so entries move as in continued training; 'fresh': a "
        "new Adam, whose first steps move every entry it touches by about lr. The two tied on "
        "the validation window (bench/results/continual-ml-100k-validation-4.md)",
        "fresh",
    )

    def __post_init__(self) -> None:
        if self.moments not in WARM_MOMENTS:
            raise ConfigError(f"warm.moments must be one of {WARM_MOMENTS}, got {self.moments!r}")
        object.__setattr__(self, "epochs", _as_tuple(self.epochs, int, "warm.epochs"))
        empty = isinstance(self.lr, list | tuple) and len(self.lr) == 0  # () = train.lr
        lr = () if empty else _as_tuple(self.lr, float, "warm.lr")
        object.__setattr__(self, "lr", lr)
        if not self.epochs or any(e < 0 for e in self.epochs):
            raise ConfigError(f"warm.epochs must be one or more counts >= 0, got {self.epochs}")
        if any(not x > 0 for x in self.lr):
            raise ConfigError(f"warm.lr values must be > 0, got {self.lr}")
        if self.replay < 0:
            raise ConfigError(f"warm.replay must be >= 0, got {self.replay}")
        if self.train not in WARM_TRAIN:
            raise ConfigError(f"warm.train must be one of {WARM_TRAIN}, got {self.train!r}")

    def stage_epochs(self, stage: int) -> int:
        return _of_stage(self.epochs, stage)

    def stage_lr(self, stage: int, train: TrainConfig) -> float:
        return _of_stage(self.lr, stage) if self.lr else train.stage_lr(stage)


SECTIONS = {
    "cascade": CascadeConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "split": SplitConfig,
    "eval": EvalConfig,
    "warm": WarmConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs besides the data; ``to_dict()`` goes into the checkpoint."""

    features: FeatureSpec = field(default_factory=FeatureSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)

    def __post_init__(self) -> None:
        t = len(self.cascade.objectives)
        if self.model.num_objectives != t:  # the model always has one owner per stage
            object.__setattr__(
                self, "model", ModelConfig(**{**asdict(self.model), "num_objectives": t})
            )
        per_stage = (
            ("train.lr", self.train.lr),
            ("train.epochs", self.train.epochs),
            ("train.history", self.train.history),
            ("train.history_dropout", self.train.history_dropout),
            ("warm.epochs", self.warm.epochs),
            ("warm.lr", self.warm.lr or self.train.lr),
        )
        for name, values in per_stage:
            if len(values) not in (1, t):
                raise ConfigError(
                    f"{name} needs 1 or {t} values (one per stage), got {list(values)}"
                )
        if self.loss.page_negatives and self.train.data == "stream":
            raise ConfigError(
                f"loss.page_negatives = {self.loss.page_negatives} needs the events in memory "
                "(train.data = 'memory' or 'auto'): the streamed path does not index page views"
            )
        if (
            self.warm.moments == "carry"
            and self.warm.train in ("touched", "ids", "new-rows")
            and self.train.id_tables == "dense"
        ):
            raise ConfigError(
                f"warm.train = {self.warm.train!r} with warm.moments = 'carry' needs "
                "train.id_tables = 'row-wise': dense Adam steps a row its carried moments hold "
                "even at zero gradient, so rows that must stay would move"
            )
        if len(self.eval.weights) != t:
            raise ConfigError(
                f"eval.weights needs one weight per objective {list(self.cascade.objectives)}, "
                f"got {list(self.eval.weights)}"
            )

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.cascade.objectives

    def to_dict(self) -> dict[str, Any]:
        d = {name: asdict(getattr(self, name)) for name in SECTIONS}
        d["model"] = self.model.to_dict()
        d["features"] = _spec_to_config(self.features)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        known = {"features", "model", *SECTIONS}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; expected {sorted(known)}"
            )
        kwargs: dict[str, Any] = {
            "features": FeatureSpec.from_dict(d.get("features", {})),
            "model": _build("model", ModelConfig, d.get("model", {}), skip={"num_objectives"}),
        }
        for name, klass in SECTIONS.items():
            kwargs[name] = _build(name, klass, d.get(name, {}))
        return cls(**kwargs)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML config (or the defaults if ``path`` is None) and apply ``section.key=value``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return config_from_dict(raw, overrides)


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """A config dict (a TOML file's, or a checkpoint's ``train_config``) with ``--set`` changes."""
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        apply_override(raw, item)
    return RunConfig.from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``train.lr=0.001`` → raw["train"]["lr"] = 0.001. Values are parsed as TOML (so lists,
    booleans and numbers work); anything that is not valid TOML is taken as a string."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(section: str, klass: type, values: Mapping[str, Any], skip: set[str] = frozenset()):
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    names = {f.name for f in fields(klass)} - skip
    unknown = set(values) - names - skip  # skipped keys are derived (e.g. num_objectives)
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown key(s) {sorted(unknown)}; expected {sorted(names)}"
        )
    hints = get_type_hints(klass)
    for k, v in values.items():
        if k not in skip:
            _check_type(f"{section}.{k}", v, hints[k])
    try:
        return klass(**{k: v for k, v in values.items() if k not in skip})
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from None


_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _fits(value: Any, kind: type) -> bool:
    if kind is float:  # TOML's 1 is an int: fine where a number is expected
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_type(key: str, value: Any, hint: Any) -> None:
    """``value`` (from TOML or ``--set``) against the dataclass field's type: ``--set
    train.batch_size=2.5`` is an error naming the key, the value and the type expected, not a
    2.5-example batch. ``tuple[X, ...]`` fields take one X or a list of them."""
    if get_origin(hint) is tuple:
        kind = get_args(hint)[0]
        items = value if isinstance(value, list | tuple) else [value]
        if all(_fits(v, kind) for v in items):
            return
        expected = f"{_KIND[kind]} or a list of them"
    elif hint in _KIND:
        if _fits(value, hint):
            return
        expected = _KIND[hint]
    else:
        return  # nested specs validate themselves
    got = "a string" if isinstance(value, str) else type(value).__name__
    raise ConfigError(f"{key} must be {expected}, got {value!r} ({got})")


def _spec_to_config(spec: FeatureSpec) -> dict[str, Any]:
    """FeatureSpec → the ``[features]`` table shape FeatureSpec.from_dict accepts."""
    d = spec.to_dict()
    return {
        "user": {k: v for k, v in d["user"].items() if v is not None},
        "item": {k: v for k, v in d["item"].items() if v is not None},
        "display": list(d.get("display", ())),
    }


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    values = value if isinstance(value, list | tuple) else (value,)
    try:
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a {kind.__name__} or a list of them, got {value!r}"
        ) from None
    if not out:
        raise ConfigError(f"{name} must not be empty")
    return out


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _in_range(
    name: str,
    value: float,
    low: float,
    high: float | None,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    ok = (value > low if open_low else value >= low) and (
        high is None or (value < high if open_high else value <= high)
    )
    if not ok:
        lo, hi = ("(" if open_low else "["), (")" if open_high or high is None else "]")
        raise ConfigError(
            f"{name} must be in {lo}{low}, {high if high is not None else 'inf'}{hi}, got {value}"
        )
