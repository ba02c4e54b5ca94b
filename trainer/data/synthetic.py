"""Seeded synthetic cascade (exposure → click → conversion) with known ground truth.

Generative model (``K`` = factors, ``T`` = topics, ``a(x, y) = x·y / sqrt(K)``, ``ρ = 1 - conflict``):

* **Topics.** ``T`` topics with Zipf-sized item counts and centres ``C_d, C_o, C_r`` (one per
  objective, independent, ``N(0, I_K)``). A latent "of topic t" is ``sqrt(w)·C[t] + sqrt(1-w)·ε``
  (``w = 0.7``), so objects of one topic point roughly the same way.
* **Items.** Topic ``z_i``; exposure factor ``v_d`` of topic ``z_i`` in ``C_d``; click factor
  ``v_o = ρ·v_d + sqrt(1-ρ²)·η_o`` (``η_o`` of topic ``z_i`` in ``C_o``), conversion factor
  ``v_r = ρ·v_o + sqrt(1-ρ²)·η_r``. Within its topic an item has Zipf popularity ``q_i``
  (random rank). Item biases: click ``0.5·quality``, conversion ``-0.5·log(price)``.
* **Users.** Home topics ``h_d, h_o, h_r`` (drawn independently, topic-size weighted);
  ``u_d`` of ``h_d`` in ``C_d``, ``u_o = ρ·u_d + sqrt(1-ρ²)·(latent of h_o in C_o)``,
  ``u_r = ρ·u_o + sqrt(1-ρ²)·(latent of h_r in C_r)``. At conflict 0 the three objectives share
  one direction; at conflict 1 click and conversion tastes are independent of exposure.
  Activity is log-normal (heavy-tailed): a few users make many requests.
* **Exposures.** Requests come one every 10 s. Each picks a user by activity and fills
  ``exposures_per_request`` slots. A slot draws a topic ``t ~ p(t|u) ∝ n_t·exp(β·a(u_d, C_d[t]))``,
  then ``proposals`` items of ``t`` by popularity ``q``, and exposes one of them with probability
  ``∝ exp(τ·a(u_d, v_i))`` (Gumbel-max), skipping items an earlier slot of the request exposed
  (unless every proposal was). That is sampling-importance-resampling from the target
  ``p(i|u,t) ∝ q_i·exp(τ·a(u_d, v_d,i))``: never a softmax over the catalogue, so 1M items are
  as cheap as 1K. Proposals that lost (and are not exposed elsewhere in the request) are the
  request's shown-but-not-exposed ``candidates``.
* **Clicks and conversions.** ``P(click | exposure) = σ(s·a(u_o, v_o) + bias_o,i + b_o)``,
  ``P(conversion | click) = σ(s·a(u_r, v_r) + bias_r,i + b_r)``; converted ⇒ clicked by
  construction. The global biases ``b_o, b_r`` are solved on a pilot sample so that
  exposures : clicks : conversions ≈ 1 : ``ctr`` : ``ctr·cvr`` (default 100 : 10 : 1).
* **Observable features** (what a model can learn from): items ``topic``, ``price_bucket``
  (price quintile), ``tags`` (the 2 of 32 tag directions closest to ``[v_o | v_r]``), ``quality``
  (the click bias plus noise), ``title``; users ``segment`` (closest of 8 directions to ``u_o``),
  ``region`` (closest of 12 to ``u_d``), ``age`` (follows ``u_r``). Exposure taste shows through
  the history.

**Oracle** (``true_scores``): the generator's own expected relevance, in log space.
``exposure``: ``log p(i|u) = log p(z_i|u) + log q_i + τ·a(u_d, v_d,i) - log Z(u, z_i)``, the
target the sampler draws from (exact as ``proposals → ∞``). ``click``: ``log p(i|u) +
log P(click|u,i)`` — expected clicks per slot; ``conversion`` adds ``log P(conversion|click)``.
With ``conditional=True`` only the conditional probability (``P(click|exposure)`` or
``P(conversion|click)``). Ranking items by these scores gives the oracle Recall@N.

Determinism: the output (table contents) depends only on the config without ``chunk_size``:
randomness is drawn per block of 4096 requests from ``SeedSequence([seed, 1, block])``.
Events stream to ``events/part-NNNNN.parquet`` (``chunk_size`` rows each); user ids and item ids
are ``0..n-1`` and equal the rows of ``truth.npz``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from csmf.errors import ConfigError, DataError
from trainer.data.dataset import OBJECTIVES, staged_dataset, write_meta

TOPIC_WEIGHT = 0.7  # share of a latent's variance that comes from its topic centre
BETA = 1.5  # sharpness of p(topic | user)
TAU = 2.0  # sharpness of the within-topic choice among proposals
CLICK_SCALE = 2.0  # logit = scale · a(u, v) + biases
CONVERSION_SCALE = 2.0
ITEM_ZIPF = 0.9  # within-topic popularity ∝ rank^-ITEM_ZIPF
TOPIC_ZIPF = 0.8  # topic sizes ∝ rank^-TOPIC_ZIPF
ACTIVITY_SIGMA = 1.2  # log-normal user activity
N_TAGS, N_SEGMENTS, N_REGIONS, N_PRICE_BUCKETS = 32, 8, 12, 5
BLOCK_REQUESTS = 4096  # unit of randomness: data do not depend on chunk_size
T0, STEP = 1_600_000_000, 10  # request r happens at T0 + STEP·r + jitter in [0, STEP)
PILOT_REQUESTS = 32768


def _opt(help: str, default=MISSING):  # noqa: A002 (the CLI reads metadata["help"])
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SyntheticConfig:
    """What ``csmf data synthetic`` generates; its options are these fields (csmf.cli)."""

    users: int = _opt("Number of users.")
    items: int = _opt("Number of items (catalogue size).")
    exposures: int = _opt("Number of exposure events to generate.")
    seed: int = _opt("Random seed; same seed, same data.", 0)
    conflict: float = _opt(
        "0 = click/conversion tastes equal exposure taste, 1 = independent of it.", 0.5
    )
    factors: int = _opt("Latent dimension K.", 16)
    topics: int = _opt("Item topics; 0 = items // 500 within [4, 256].", 0)
    exposures_per_request: int = _opt("Items exposed per request.", 4)
    proposals: int = _opt("Items proposed per slot; the best is exposed.", 8)
    candidates_per_request: int = _opt(
        "Shown-but-not-exposed items kept per request in candidates.parquet (0 = none).", 0
    )
    ctr: float = _opt("Target clicks per exposure.", 0.1)
    cvr: float = _opt("Target conversions per click.", 0.1)
    cart: float = _opt(
        "Target carts per click; > 0 adds a fourth label, 'carted' (P(cart | click) = "
        "σ(s·a(u_o, v_r) + bias_r,i + b_c): click taste meets conversion appeal), for adding an "
        "objective to a trained cascade (csmf extend). 0 = none; the other labels do not change.",
        0.0,
    )
    chunk_size: int = _opt("Events per events/part-*.parquet file.", 1_000_000)

    def __post_init__(self) -> None:
        for name in ("users", "exposures", "factors", "exposures_per_request", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.items < 2:
            raise ConfigError(f"items must be >= 2, got {self.items}")
        if self.proposals < 2:
            raise ConfigError(f"proposals must be >= 2, got {self.proposals}")
        if self.topics < 0:
            raise ConfigError(f"topics must be >= 0 (0 = auto), got {self.topics}")
        if not 0.0 <= self.conflict <= 1.0:
            raise ConfigError(f"conflict must be in [0, 1], got {self.conflict}")
        for name in ("ctr", "cvr"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.cart < 1.0:
            raise ConfigError(f"cart must be in [0, 1) (0 = no fourth label), got {self.cart}")
        limit = self.exposures_per_request * (self.proposals - 1)
        if not 0 <= self.candidates_per_request <= limit:
            raise ConfigError(
                f"candidates_per_request must be in [0, exposures_per_request·(proposals-1) = "
                f"{limit}], got {self.candidates_per_request}"
            )

    @property
    def n_topics(self) -> int:
        return self.topics or int(np.clip(self.items // 500, 4, 256))

    @property
    def n_requests(self) -> int:
        return -(-self.exposures // self.exposures_per_request)


@dataclass
class Truth:
    """Ground truth of a synthetic dataset; user/item rows are the user/item ids."""

    user: dict[str, np.ndarray]  # objective → (n_users, K) float32
    item: dict[str, np.ndarray]  # objective → (n_items, K) float32
    item_bias: dict[str, np.ndarray]  # exposure: log q_i; click/conversion: item bias, (n_items,)
    bias: dict[str, float]  # global logit bias (exposure: 0)
    scale: dict[str, float]  # affinity scale: exposure τ, click / conversion logit scale
    item_topic: np.ndarray  # (n_items,) int32
    topic_center: np.ndarray  # (T, K) exposure topic centres C_d
    topic_log_prior: np.ndarray  # (T,) log n_t, -inf for empty topics
    beta: float

    @property
    def factors(self) -> int:
        return self.topic_center.shape[1]


@dataclass
class _World:
    truth: Truth
    user_cum: np.ndarray  # (U,) cumulative activity
    topic_order: np.ndarray  # (I,) item ids sorted by topic (then popularity rank)
    item_cum: np.ndarray  # (I,) topic + within-topic cumulative q, in topic_order
    topic_start: np.ndarray  # (T + 1,) segment offsets into topic_order
    users: pa.Table = field(repr=False)
    items: pa.Table = field(repr=False)
    cart_bias: float = 0.0  # global bias of the optional fourth label (SyntheticConfig.cart)


# --------------------------------------------------------------------------- public API


def generate_synthetic(
    cfg: SyntheticConfig, out: str | Path, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Write a synthetic dataset to ``out``; ``progress(n)`` is called as exposures are written.

    Returns the counts written to ``dataset.json``.
    """
    world = _build_world(cfg)
    _calibrate(cfg, world)
    counts = {"users": cfg.users, "items": cfg.items, "exposures": 0, "clicks": 0}
    counts |= {"conversions": 0, "requests": cfg.n_requests, "candidates": 0}
    with staged_dataset(out) as tmp:
        pq.write_table(world.users, tmp / "users.parquet")
        pq.write_table(world.items, tmp / "items.parquet")
        _save_truth(world.truth, tmp / "truth.npz")
        _stream_events(cfg, world, tmp, counts, progress)
        if counts["clicks"] == 0 or counts["conversions"] == 0:
            raise DataError(
                f"synthetic data came out with {counts['clicks']} clicks and "
                f"{counts['conversions']} conversions; raise --exposures, --ctr or --cvr"
            )
        write_meta(tmp, _meta(cfg, world, counts))
    return counts


def load_truth(root: str | Path) -> Truth:
    path = Path(root) / "truth.npz"
    if not path.exists():
        raise DataError(f"{path}: file not found (only synthetic datasets have ground truth)")
    with np.load(path) as z:
        return Truth(
            user={o: z[f"user_{o}"] for o in OBJECTIVES},
            item={o: z[f"item_{o}"] for o in OBJECTIVES},
            item_bias={o: z[f"item_bias_{o}"] for o in OBJECTIVES},
            bias={o: float(z[f"bias_{o}"]) for o in OBJECTIVES},
            scale={o: float(z[f"scale_{o}"]) for o in OBJECTIVES},
            item_topic=z["item_topic"],
            topic_center=z["topic_center"],
            topic_log_prior=z["topic_log_prior"],
            beta=float(z["beta"]),
        )


def true_scores(
    truth: Truth, user_rows: np.ndarray, objective: str, *, conditional: bool = False
) -> np.ndarray:
    """Oracle log-relevance of every item for the given users, ``(n_users, n_items)`` float32.

    See the module docstring for what each objective's score means. Memory is
    ``n_users · n_items`` floats: pass users in batches for big catalogues.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    rows = np.asarray(user_rows, dtype=np.int64)
    out = np.zeros((len(rows), len(truth.item_topic)), np.float32)
    if not conditional or objective == "exposure":
        out += _log_exposure(truth, rows)
    if objective in ("click", "conversion") and not (conditional and objective == "conversion"):
        out += _log_sigmoid(_logits(truth, rows, "click"))
    if objective == "conversion":
        out += _log_sigmoid(_logits(truth, rows, "conversion"))
    return out


# --------------------------------------------------------------------------- the world


def _latent(rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Rows near their topic centre: ``sqrt(w)·centre + sqrt(1-w)·noise``, unit variance."""
    noise = rng.standard_normal(centers.shape)
    return math.sqrt(TOPIC_WEIGHT) * centers + math.sqrt(1 - TOPIC_WEIGHT) * noise


def _mix(base: np.ndarray, own: np.ndarray, rho: float) -> np.ndarray:
    return rho * base + math.sqrt(max(0.0, 1 - rho * rho)) * own


def _build_world(cfg: SyntheticConfig) -> _World:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    n_u, n_i, k, n_t, rho = cfg.users, cfg.items, cfg.factors, cfg.n_topics, 1 - cfg.conflict
    centers = {o: rng.standard_normal((n_t, k)) for o in OBJECTIVES}

    topic_p = _zipf(n_t, TOPIC_ZIPF)[rng.permutation(n_t)]
    item_topic = rng.choice(n_t, size=n_i, p=topic_p).astype(np.int32)
    sizes = np.bincount(item_topic, minlength=n_t)
    perm = rng.permutation(n_i)  # popularity rank inside a topic is random w.r.t. the id
    topic_order = perm[np.argsort(item_topic[perm], kind="stable")]
    topic_start = np.concatenate(([0], np.cumsum(sizes)))
    rank = np.empty(n_i, np.int64)
    rank[topic_order] = np.arange(n_i) - np.repeat(topic_start[:-1], sizes)
    weight = (rank + 1.0) ** -ITEM_ZIPF
    mass = np.bincount(item_topic, weights=weight, minlength=n_t)
    log_q = np.log(weight) - np.log(mass[item_topic])
    within = np.cumsum(weight[topic_order]) - np.repeat(
        np.concatenate(([0.0], np.cumsum(mass)[:-1])), sizes
    )
    item_cum = item_topic[topic_order] + within / mass[item_topic[topic_order]]

    v_d = _latent(rng, centers["exposure"][item_topic])
    v_o = _mix(v_d, _latent(rng, centers["click"][item_topic]), rho)
    v_r = _mix(v_o, _latent(rng, centers["conversion"][item_topic]), rho)
    quality = rng.standard_normal(n_i)
    log_price = rng.standard_normal(n_i)

    home_p = sizes / sizes.sum()
    homes = {o: rng.choice(n_t, size=n_u, p=home_p) for o in OBJECTIVES}
    u_d = _latent(rng, centers["exposure"][homes["exposure"]])
    u_o = _mix(u_d, _latent(rng, centers["click"][homes["click"]]), rho)
    u_r = _mix(u_o, _latent(rng, centers["conversion"][homes["conversion"]]), rho)
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, n_u)

    with np.errstate(divide="ignore"):
        topic_log_prior = np.log(sizes.astype(np.float64))
    truth = Truth(
        user={o: x.astype(np.float32) for o, x in zip(OBJECTIVES, (u_d, u_o, u_r), strict=True)},
        item={o: x.astype(np.float32) for o, x in zip(OBJECTIVES, (v_d, v_o, v_r), strict=True)},
        item_bias={
            "exposure": log_q.astype(np.float32),
            "click": (0.5 * quality).astype(np.float32),
            "conversion": (-0.5 * log_price).astype(np.float32),
        },
        bias={o: 0.0 for o in OBJECTIVES},
        scale={"exposure": TAU, "click": CLICK_SCALE, "conversion": CONVERSION_SCALE},
        item_topic=item_topic,
        topic_center=centers["exposure"].astype(np.float32),
        topic_log_prior=topic_log_prior,
        beta=BETA,
    )
    users = _user_table(rng, truth)
    items = _item_table(rng, truth, quality, log_price)
    return _World(
        truth=truth,
        user_cum=np.cumsum(activity),
        topic_order=topic_order,
        item_cum=item_cum,
        topic_start=topic_start,
        users=users,
        items=items,
    )


def _zipf(n: int, s: float) -> np.ndarray:
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    return w / w.sum()


def _closest(rng: np.random.Generator, x: np.ndarray, n_dirs: int) -> np.ndarray:
    """Index of the random direction (of ``n_dirs``) with the largest dot product, per row."""
    dirs = rng.standard_normal((n_dirs, x.shape[1])).astype(np.float32)
    return np.argmax(x @ dirs.T, axis=1)


def _user_table(rng: np.random.Generator, truth: Truth) -> pa.Table:
    u_d, u_o, u_r = (truth.user[o] for o in OBJECTIVES)
    n, k = u_d.shape
    segment = _closest(rng, u_o, N_SEGMENTS)
    region = _closest(rng, u_d, N_REGIONS)
    age_dir = rng.standard_normal(k)
    age_dir /= np.linalg.norm(age_dir)
    age = np.clip(np.round(38 + 12 * (u_r @ age_dir) + rng.normal(0, 4, n)), 16, 80)
    return pa.table(
        {
            "user_id": pa.array(np.arange(n, dtype=np.int64)),
            "segment": _labels("s", segment, N_SEGMENTS),
            "region": _labels("r", region, N_REGIONS),
            "age": pa.array(age.astype(np.float64)),
        }
    )


def _item_table(
    rng: np.random.Generator, truth: Truth, quality: np.ndarray, log_price: np.ndarray
) -> pa.Table:
    n = len(truth.item_topic)
    n_t = len(truth.topic_center)
    both = np.concatenate([truth.item["click"], truth.item["conversion"]], axis=1)  # (n, 2K)
    tag_dirs = rng.standard_normal((N_TAGS, both.shape[1])).astype(np.float32)
    sim = both @ tag_dirs.T  # (n, N_TAGS)
    top2 = np.argpartition(-sim, 1, axis=1)[:, :2]
    top2 = np.take_along_axis(top2, np.argsort(-np.take_along_axis(sim, top2, 1), 1), 1)
    tag_names = np.asarray([f"g{j:02d}" for j in range(N_TAGS)], dtype=object)
    tags = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
        pa.array(tag_names[top2.ravel()], pa.string()),
    )
    cuts = np.quantile(log_price, np.linspace(0, 1, N_PRICE_BUCKETS + 1)[1:-1])
    price_bucket = np.digitize(log_price, cuts)
    observed_quality = np.round(quality + rng.normal(0, 0.3, n), 3)
    width = len(str(n_t - 1))
    topic_names = np.asarray([f"t{t:0{width}d}" for t in range(n_t)], dtype=object)
    topic = topic_names[truth.item_topic]
    first_tag = tag_names[top2[:, 0]]
    titles = [f"Item {i} ({t}, {g})" for i, t, g in zip(range(n), topic, first_tag, strict=True)]
    return pa.table(
        {
            "item_id": pa.array(np.arange(n, dtype=np.int64)),
            "topic": pa.array(topic, pa.string()),
            "price_bucket": _labels("p", price_bucket, N_PRICE_BUCKETS),
            "tags": tags,
            "quality": pa.array(observed_quality.astype(np.float64)),
            "title": pa.array(titles, pa.string()),
        }
    )


def _labels(prefix: str, codes: np.ndarray, n: int) -> pa.Array:
    names = np.asarray([f"{prefix}{j}" for j in range(n)], dtype=object)
    return pa.array(names[codes], pa.string())


# --------------------------------------------------------------------------- sampling


@dataclass
class _Block:
    request_id: np.ndarray  # (R,)
    user: np.ndarray  # (R,)
    timestamp: np.ndarray  # (R,)
    exposed: np.ndarray  # (R, S) item ids
    losers: np.ndarray  # (R, S·(M-1)) item ids
    logit_o: np.ndarray  # (R, S) click logit without the global bias
    logit_r: np.ndarray  # (R, S) conversion logit without the global bias
    u_click: np.ndarray  # (R, S) uniforms for the click draw
    u_conv: np.ndarray  # (R, S) uniforms for the conversion draw


def _sample_block(
    cfg: SyntheticConfig, w: _World, rng: np.random.Generator, first_request: int, n_req: int
) -> _Block:
    t = w.truth
    n_s, n_m, n_t = cfg.exposures_per_request, cfg.proposals, len(t.topic_center)
    inv_sqrt_k = 1.0 / math.sqrt(t.factors)
    rows = np.arange(n_req)

    user = np.searchsorted(w.user_cum, rng.random(n_req) * w.user_cum[-1], side="right")
    user = np.minimum(user, len(w.user_cum) - 1)
    u_d = t.user["exposure"][user]  # (R, K)

    # topic per slot: inverse CDF of p(t|u), all rows at once by offsetting row r into [r, r+1)
    logit = t.topic_log_prior + t.beta * inv_sqrt_k * (u_d @ t.topic_center.T)  # (R, T)
    p = np.exp(logit - logit.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    flat = (cdf + rows[:, None]).ravel()
    draw = (rng.random((n_req, n_s)) + rows[:, None]).ravel()
    pos = np.minimum(np.searchsorted(flat, draw, side="right"), flat.size - 1)
    topic = (pos - np.repeat(rows * n_t, n_s)).reshape(n_req, n_s)  # (R, S)

    # proposals inside the topic by popularity: item_cum runs over [t, t+1) for topic t
    value = topic[..., None] + rng.random((n_req, n_s, n_m))
    idx = np.searchsorted(w.item_cum, value, side="right")
    idx = np.clip(idx, w.topic_start[topic][..., None], w.topic_start[topic + 1][..., None] - 1)
    cand = w.topic_order[idx]  # (R, S, M)

    # choose one per slot ∝ exp(τ·a(u_d, v_d)) with the Gumbel-max trick
    v_d = t.item["exposure"][cand].reshape(n_req, n_s * n_m, -1)  # (R, S·M, K)
    aff = (v_d @ u_d[:, :, None]).reshape(n_req, n_s, n_m) * inv_sqrt_k
    gumbel = -np.log(-np.log(rng.random((n_req, n_s, n_m)) + 1e-300))
    score = t.scale["exposure"] * aff + gumbel  # (R, S, M)
    win = np.empty((n_req, n_s), np.int64)
    exposed = np.empty((n_req, n_s), np.int64)
    for j in range(n_s):  # a feed shows an item once: skip proposals an earlier slot exposed
        taken = (cand[:, j, :, None] == exposed[:, None, :j]).any(axis=2)  # (R, M)
        slot = np.where(taken & ~taken.all(axis=1, keepdims=True), -np.inf, score[:, j])
        win[:, j] = np.argmax(slot, axis=1)
        exposed[:, j] = cand[rows, j, win[:, j]]
    lost = np.arange(n_m) != win[..., None]  # (R, S, M)
    losers = cand[lost].reshape(n_req, n_s * (n_m - 1))

    logit_o = _pair_logits(t, user, exposed, "click")
    logit_r = _pair_logits(t, user, exposed, "conversion")
    jitter = rng.integers(0, STEP, n_req)
    request_id = first_request + rows
    return _Block(
        request_id=request_id.astype(np.int64),
        user=user.astype(np.int64),
        timestamp=(T0 + STEP * request_id + jitter).astype(np.int64),
        exposed=exposed.astype(np.int64),
        losers=losers.astype(np.int64),
        logit_o=logit_o,
        logit_r=logit_r,
        u_click=rng.random((n_req, n_s)),
        u_conv=rng.random((n_req, n_s)),
    )


def _pair_logits(t: Truth, user: np.ndarray, items: np.ndarray, objective: str) -> np.ndarray:
    """Logit without the global bias for (R,) users and their (R, S) items."""
    u = t.user[objective][user]  # (R, K)
    v = t.item[objective][items]  # (R, S, K)
    aff = (v @ u[:, :, None])[..., 0] / math.sqrt(t.factors)  # (R, S)
    return t.scale[objective] * aff + t.item_bias[objective][items]


def _block_rng(cfg: SyntheticConfig, stream: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, stream, block]))


def _calibrate(cfg: SyntheticConfig, w: _World) -> None:
    """Solve the global click / conversion biases on a pilot sample for the target rates."""
    n_req = min(PILOT_REQUESTS, max(cfg.n_requests, 256))
    pilot = _sample_block(cfg, w, _block_rng(cfg, 2, 0), 0, n_req)
    l_o, l_r = pilot.logit_o.ravel(), pilot.logit_r.ravel()
    b_o = _solve_bias(l_o, np.ones_like(l_o), cfg.ctr)
    b_r = _solve_bias(l_r, _sigmoid(l_o + b_o), cfg.cvr)
    w.truth.bias["click"], w.truth.bias["conversion"] = b_o, b_r
    if cfg.cart:
        l_c = _cart_logits(w.truth, pilot.user, pilot.exposed).ravel()
        w.cart_bias = _solve_bias(l_c, _sigmoid(l_o + b_o), cfg.cart)


def _cart_logits(t: Truth, user: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The fourth label's logit without its global bias: the user's click taste against the
    item's conversion appeal, (R, S)."""
    u = t.user["click"][user]  # (R, K)
    v = t.item["conversion"][items]  # (R, S, K)
    aff = (v @ u[:, :, None])[..., 0] / math.sqrt(t.factors)
    return t.scale["conversion"] * aff + t.item_bias["conversion"][items]


def _solve_bias(logits: np.ndarray, weights: np.ndarray, target: float) -> float:
    """Bisection for b with weighted mean σ(logits + b) = target (monotone in b)."""
    lo, hi = -40.0, 40.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        rate = np.average(_sigmoid(logits + mid), weights=weights)
        lo, hi = (mid, hi) if rate < target else (lo, mid)
    return 0.5 * (lo + hi)


def _stream_events(
    cfg: SyntheticConfig,
    w: _World,
    tmp: Path,
    counts: dict[str, int],
    progress: Callable[[int], None] | None,
) -> None:
    events_dir = tmp / "events"
    events_dir.mkdir()
    events_out = _PartWriter(events_dir, cfg.chunk_size)
    cand_out = _CandidateWriter(tmp / "candidates.parquet", cfg.chunk_size)
    b_o, b_r = w.truth.bias["click"], w.truth.bias["conversion"]
    left = cfg.exposures
    for block, first in enumerate(range(0, cfg.n_requests, BLOCK_REQUESTS)):
        n_req = min(BLOCK_REQUESTS, cfg.n_requests - first)
        s = _sample_block(cfg, w, _block_rng(cfg, 1, block), first, n_req)
        clicked = s.u_click < _sigmoid(s.logit_o + b_o)
        converted = clicked & (s.u_conv < _sigmoid(s.logit_r + b_r))
        n = min(left, clicked.size)  # the last request may be cut short
        n_s = cfg.exposures_per_request
        columns = {}
        if cfg.cart:  # its own random stream: the other labels are those of cart = 0
            u_cart = _block_rng(cfg, 3, block).random(s.exposed.shape)
            carted = clicked & (
                u_cart < _sigmoid(_cart_logits(w.truth, s.user, s.exposed) + w.cart_bias)
            )
            columns["carted"] = pa.array(carted.ravel()[:n])
            counts["carts"] = counts.get("carts", 0) + int(carted.ravel()[:n].sum())
        clicked, converted = clicked.ravel()[:n], converted.ravel()[:n]
        events_out.add(
            pa.table(
                {
                    "user_id": pa.array(np.repeat(s.user, n_s)[:n]),
                    "item_id": pa.array(s.exposed.ravel()[:n]),
                    "timestamp": pa.array(np.repeat(s.timestamp, n_s)[:n]),
                    "clicked": pa.array(clicked),
                    "converted": pa.array(converted),
                    "request_id": pa.array(np.repeat(s.request_id, n_s)[:n]),
                    **columns,
                }
            )
        )
        left -= n
        counts["exposures"] += n
        counts["clicks"] += int(clicked.sum())
        counts["conversions"] += int(converted.sum())
        if cfg.candidates_per_request:
            cand = _candidates(s, cfg.candidates_per_request)
            cand_out.add(cand)
            counts["candidates"] += cand.num_rows
        if progress:
            progress(n)
    events_out.close()
    cand_out.close()


def _candidates(s: _Block, n_keep: int) -> pa.Table:
    """Up to ``n_keep`` distinct losers per request that the request did not expose."""
    pool = s.losers  # (R, P)
    exposed_here = (pool[:, :, None] == s.exposed[:, None, :]).any(axis=2)
    order = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, order, axis=1)
    dup_sorted = np.zeros_like(pool, dtype=bool)
    dup_sorted[:, 1:] = sorted_pool[:, 1:] == sorted_pool[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    ok = ~exposed_here & ~dup
    keep = ok & (np.cumsum(ok, axis=1) <= n_keep)
    return pa.table(
        {
            "request_id": pa.array(np.broadcast_to(s.request_id[:, None], pool.shape)[keep]),
            "item_id": pa.array(pool[keep]),
        }
    )


class _PartWriter:
    """Buffers tables and writes ``part-NNNNN.parquet`` files of exactly ``rows`` rows."""

    def __init__(self, folder: Path, rows: int) -> None:
        self.folder, self.rows = folder, rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts = 0

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows:
            self._flush(self.rows)

    def close(self) -> None:
        if self.buffered or self.parts == 0:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer)
        pq.write_table(table.slice(0, n), self.folder / f"part-{self.parts:05d}.parquet")
        self.parts += 1
        rest = table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows


class _CandidateWriter:
    """Streams candidates into one ``candidates.parquet``, a row group per ``rows`` rows."""

    def __init__(self, path: Path, rows: int) -> None:
        self.path, self.rows = path, rows
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows:
            self._flush()

    def close(self) -> None:
        if self.buffer:
            self._flush()
        if self.writer is not None:
            self.writer.close()

    def _flush(self) -> None:
        table = pa.concat_tables(self.buffer)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table, row_group_size=max(self.rows, 1))
        self.buffer, self.buffered = [], 0


# --------------------------------------------------------------------------- truth & scores


def _save_truth(t: Truth, path: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for o in OBJECTIVES:
        arrays[f"user_{o}"] = t.user[o]
        arrays[f"item_{o}"] = t.item[o]
        arrays[f"item_bias_{o}"] = t.item_bias[o]
        arrays[f"bias_{o}"] = np.float64(t.bias[o])
        arrays[f"scale_{o}"] = np.float64(t.scale[o])
    arrays |= {
        "item_topic": t.item_topic,
        "topic_center": t.topic_center,
        "topic_log_prior": t.topic_log_prior,
        "beta": np.float64(t.beta),
    }
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _logits(t: Truth, rows: np.ndarray, objective: str) -> np.ndarray:
    """Full (n_users, n_items) logit of ``click`` or ``conversion``."""
    aff = (t.user[objective][rows] @ t.item[objective].T) / math.sqrt(t.factors)
    return t.scale[objective] * aff + t.item_bias[objective] + t.bias[objective]


def _log_exposure(t: Truth, rows: np.ndarray) -> np.ndarray:
    """log p(i|u) = log p(z_i|u) + log q_i + τ·a(u_d, v_i) - log Z(u, z_i), (n, I) float64."""
    u_d = t.user["exposure"][rows].astype(np.float64)
    inv_sqrt_k = 1.0 / math.sqrt(t.factors)
    topic_logit = t.topic_log_prior + t.beta * inv_sqrt_k * (u_d @ t.topic_center.T)  # (n, T)
    log_p_topic = topic_logit - _logsumexp(topic_logit, axis=1)[:, None]
    within = t.item_bias["exposure"] + t.scale["exposure"] * inv_sqrt_k * (
        u_d @ t.item["exposure"].T
    )  # (n, I)
    log_z = np.full(topic_logit.shape, -np.inf)
    order = np.argsort(t.item_topic, kind="stable")
    present = np.unique(t.item_topic)
    starts = np.searchsorted(t.item_topic[order], present)
    sorted_within = within[:, order]
    peak = np.maximum.reduceat(sorted_within, starts, axis=1)  # (n, T_present)
    sizes = np.diff(np.append(starts, len(order)))
    summed = np.add.reduceat(np.exp(sorted_within - np.repeat(peak, sizes, axis=1)), starts, axis=1)
    log_z[:, present] = np.log(summed) + peak
    z = t.item_topic
    return log_p_topic[:, z] + within - log_z[:, z]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return (np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak).squeeze(axis)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _meta(cfg: SyntheticConfig, w: _World, counts: dict[str, int]) -> dict:
    t = w.truth
    return {
        "name": "synthetic",
        "source": "trainer.data.synthetic (seeded cascade generator with ground truth)",
        "counts": counts,
        "rates": {
            "ctr": counts["clicks"] / max(counts["exposures"], 1),
            "cvr": counts["conversions"] / max(counts["clicks"], 1),
            **({"cart": counts["carts"] / max(counts["clicks"], 1)} if "carts" in counts else {}),
        },
        "generator": asdict(cfg)
        | {
            "n_topics": cfg.n_topics,
            "bias_click": t.bias["click"],
            "bias_conversion": t.bias["conversion"],
            "bias_cart": w.cart_bias,
            "topic_weight": TOPIC_WEIGHT,
            "beta": BETA,
            "tau": TAU,
            "click_scale": CLICK_SCALE,
            "conversion_scale": CONVERSION_SCALE,
            "item_zipf": ITEM_ZIPF,
            "topic_zipf": TOPIC_ZIPF,
            "activity_sigma": ACTIVITY_SIGMA,
            "block_requests": BLOCK_REQUESTS,
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
