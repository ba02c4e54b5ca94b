"""The serving benchmark's in-process measurements: the pieces of its baseline (encode one user,
one raw FAISS search, and the two interleaved as a request does them), the batch endpoint's
ceiling, and the user encoders side by side (numpy, torch eager, onnxruntime)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np


def _in_processes(target, args: list[tuple]) -> list[dict]:
    """``target(*args[i], barrier, out)`` in one spawned process per ``args`` entry; each loads,
    waits at the shared barrier (so the measured parts overlap) and puts one dict on ``out``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args)), ctx.Queue()
    ps = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args]
    for p in ps:
        p.start()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return res


def in_process_parallel(bundle_path: Path, bodies: list[str], procs: int) -> dict:
    """``in_process`` in ``procs`` processes at once (started together after loading): the cost
    of encode + search when every core is busy, as inside a loaded multi-worker server."""
    res = _in_processes(_in_process_child, [(bundle_path, bodies[i::procs]) for i in range(procs)])
    return {k: sum(r[k] for r in res) / procs for k in res[0]}


def _in_process_child(bundle_path: Path, bodies: list[str], barrier, out) -> None:
    out.put(in_process(bundle_path, bodies, barrier=barrier))


def in_process(bundle_path: Path, bodies: list[str], n: int = 3000, barrier=None) -> dict:
    """CPU µs of encode (one user) and raw search (one query, k=50) with varied users/weights."""
    import faiss

    from csmf.bundle import load_bundle

    faiss.omp_set_num_threads(1)
    b = load_bundle(bundle_path, verify=False)
    reqs = [json.loads(x) for x in bodies[:n]]
    n = len(reqs)
    users = []
    for r in reqs:
        got = b.users.get(r["user_id"])
        row, hist = got if got else ({"user_id": r["user_id"]}, [])
        users.append((row, r.get("history", hist)))
    scales = [b.scale(r.get("weights", [1.0, 1.8, 1.2])) for r in reqs]
    b.encoder.encode([users[0][0]], [users[0][1]])
    if barrier is not None:
        barrier.wait()
    reps = 3  # ~1 s of each at 1M items, so parallel copies overlap
    t = time.process_time()
    for _ in range(reps):
        e = [b.encoder.encode([row], [hist]) for row, hist in users]
    encode = (time.process_time() - t) / (n * reps)
    q = [x * s for x, s in zip(e, scales, strict=True)]
    b.index.search(q[0], 50)
    t = time.process_time()
    for _ in range(reps):
        for x in q:
            b.index.search(x, 50)
    search = (time.process_time() - t) / (n * reps)
    # The same work in the order a request does it: encode user i, search its query, next user.
    # Separate loops keep each one's data cache-hot (the encoder's weights, the coarse
    # centroids); interleaved, each search's scan of the inverted lists (~2 MB at 1M items)
    # evicts what the next encode needs, as it does in the server.
    t = time.process_time()
    for _ in range(reps):
        for (row, hist), s in zip(users, scales, strict=True):
            b.index.search(b.encoder.encode([row], [hist]) * s, 50)
    interleaved = (time.process_time() - t) / (n * reps)
    return {"encode_us": encode * 1e6, "search_us": search * 1e6, "request_us": interleaved * 1e6}


def work_us(base: dict) -> float:
    """In-process encode + raw search per request, as the ratio's denominator uses it (the
    interleaved measurement; see ``in_process``)."""
    return base["request_us"]


def batch_ceiling(bundle_path: Path, procs: int, size: int, k: int, calls: int = 12) -> dict:
    """Users/s of the batch endpoint's unavoidable work alone — one batched encode of ``size``
    known users and one batched FAISS search (k, the service's k + |seen| fetch, one OpenMP
    thread) — in ``procs`` processes at once, summed: no server can answer faster on this box."""
    res = _in_processes(_batch_child, [(bundle_path, size, k, calls, i) for i in range(procs)])
    return {
        "users_per_s": sum(r["users_per_s"] for r in res),
        "search_share": float(np.mean([r["search_share"] for r in res])),
        "procs": procs,
        "size": size,
        "k": k,
    }


def _batch_child(bundle_path: Path, size: int, k: int, calls: int, seed: int, barrier, out):
    import faiss

    from csmf.bundle import load_bundle

    faiss.omp_set_num_threads(1)
    b = load_bundle(bundle_path, verify=False)
    ids = b.users.ids
    rng = random.Random(seed)
    scale = b.scale([1.0, 1.8, 1.2])
    barrier.wait()
    enc = search = 0.0
    for _ in range(calls):
        users = [b.users.get(u) for u in rng.sample(ids, size)]
        t = time.process_time()
        e = b.encoder.encode([r for r, _ in users], [h for _, h in users])
        t1 = time.process_time()
        fetch = k + max(len(h) for _, h in users)  # exclude_seen's fetch, as the service does
        b.search(e * scale, fetch)
        t2 = time.process_time()
        enc, search = enc + t1 - t, search + t2 - t1
    out.put({"users_per_s": size * calls / (enc + search), "search_share": search / (enc + search)})


def encoders(bundle_path: Path, bodies: list[str], n: int = 1000, size: int = 500) -> dict:
    """CPU µs per user of the three ways to run the user tower on the same users (the mixed
    bodies': known and unknown users, inline histories), raw rows → vectors inside each timing:
    numpy (``UserEncoder``, the service's default), torch eager (the bench run's checkpoint
    tower, permuted like the bundle) and onnxruntime (the bundle's user_tower.onnx, what
    ``CSMF_ENCODER=onnx`` runs), one user per call as /v1/retrieve encodes and ``size`` per call
    as the batch endpoint does; each one thread, the three interleaved over 3 rounds, medians.
    Also the largest difference of each to numpy."""
    import torch

    from csmf.bundle import ENCODER_FILE, load_bundle, read_manifest
    from csmf.checkpoint import load_checkpoint
    from csmf.onnx_encoder import ONNX_FILE, OnnxUserEncoder
    from csmf.user_encoder import UserEncoder

    torch.set_num_threads(1)
    b = load_bundle(bundle_path, verify=False)
    numpy_enc = UserEncoder.load(bundle_path / ENCODER_FILE)
    onnx_enc = OnnxUserEncoder(numpy_enc, bundle_path / ONNX_FILE)
    model = load_checkpoint(bundle_path.parent / "run").build_model().eval()
    perm = torch.as_tensor(read_manifest(bundle_path).output_permutation)

    def torch_encode(rows, hists):
        inputs = numpy_enc.encode_inputs(rows, hists)
        with torch.inference_mode():
            return model.user({k: torch.from_numpy(v) for k, v in inputs.items()})[:, perm].numpy()

    users = []
    for body in bodies[:n]:
        r = json.loads(body)
        got = b.users.get(r["user_id"])
        row, hist = got if got else ({"user_id": r["user_id"]}, [])
        users.append((row, r.get("history", hist)))
    rows, hists = [u[0] for u in users], [u[1] for u in users]
    ways = {"numpy": numpy_enc.encode, "torch": torch_encode, "onnxruntime": onnx_enc.encode}
    ref = numpy_enc.encode(rows, hists)
    diff = {k: float(np.abs(f(rows, hists) - ref).max()) for k, f in ways.items()}
    one: dict[str, list[float]] = {k: [] for k in ways}
    many: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(3):
        for k, f in ways.items():
            t = time.process_time()
            for row, hist in users:
                f([row], [hist])
            one[k].append((time.process_time() - t) / len(users) * 1e6)
            t = time.process_time()
            for start in range(0, len(users), size):
                f(rows[start : start + size], hists[start : start + size])
            many[k].append((time.process_time() - t) / len(users) * 1e6)
    return {
        "one_us": {k: float(np.median(v)) for k, v in one.items()},
        "batch_us": {k: float(np.median(v)) for k, v in many.items()},
        "batch_size": size,
        "users": len(users),
        "max_abs_diff_to_numpy": diff,
    }
