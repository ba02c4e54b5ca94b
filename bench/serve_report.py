"""The serving benchmark's results page: one section per catalogue size in
bench/results/serve.md (replaced on rerun), its numbers in serve-<N>.json beside it."""

from __future__ import annotations

import re
from pathlib import Path

from serve_bodies import OPTION_NOTES

from csmf.atomic import atomic_write_text, write_json
from csmf.bundle import Manifest
from csmf.results import run_line, table


def section(
    n: int,
    manifest: Manifest,
    base: dict,
    bare: dict,
    runs: dict,
    batch_res: dict,
    options: dict,
    meta: dict,
    hand: dict | None = None,
    floor: dict | None = None,
) -> str:
    rc, idx = manifest.recall_check, manifest.index
    tuned = " (nprobe tuned)" if idx.tuning else ""
    lines = [
        f"## {n:,} items{tuned}",
        "",
        f"{run_line(meta['run'])} Command `{meta['command']}`; the cores are shared with other "
        "jobs (absolute rates are depressed and vary ±30 % run to run; compare rows within "
        "this section). "
        f"Medians of {meta['rounds']} rounds of {meta['duration']} s; bare, "
        + (f"the service before ({meta['before']}) and " if meta["before"] else "")
        + f"the service at {meta['head']} "
        + (
            "measured one after the other"
            if meta["sequential"]
            else "under load at the same "
            "time (each server its own wrk; CPU per request is each server's own), so the "
            "machine's changing load hits them alike"
        )
        + "; the ratio is service CPU / (bare + interleaved encode+search) per round, median"
        + (
            "; the hand-written ratio is service CPU / the hand-written endpoint's CPU "
            "(bench/serve_handwritten.py: FastAPI + the same encoder and index, same bodies and "
            "results, none of the service's scenarios, request ids, metrics, named errors), per "
            "round, median."
            if hand
            else "."
        ),
        "",
        f"Bundle: {idx.type} {idx.build_params} "
        f"{idx.search_params}, {manifest.dim} dims, slices {list(manifest.slice_sizes)}; "
        f"ANN recall@{rc.k} on weighted queries: min {rc.min_recall:.3f} over "
        + ", ".join(f"{tuple(x.weights)}: {x.recall:.3f}" for x in rc.by_weights),
        "",
        f"In process (one thread): encode {base['encode_us']:.0f} µs/user, raw FAISS search "
        f"{base['search_us']:.0f} µs/query (k=50)"
        + (
            f", measured in {base['parallel']} processes at once like the workers (alone: encode "
            f"{base['alone']['encode_us']:.0f}, search {base['alone']['search_us']:.0f})"
            if "parallel" in base
            else ""
        )
        + f"; interleaved per request (encode, then its search, as a request does them): "
        f"{base['request_us']:.0f} µs (alone: {base.get('alone', base)['request_us']:.0f}). "
        f"Bare endpoint (same stack, bodies and response size, no work): "
        f"{bare['cpu_us_per_req']:.0f} µs server CPU/request at {bare['rps']:.0f} req/s "
        f"(p99 {bare['p99_ms']:.2f} ms). Baseline = bare + interleaved encode+search = "
        f"{meta['baseline_us']:.0f} µs (with the separate-loop numbers instead: "
        f"{bare['cpu_us_per_req'] + base['encode_us'] + base['search_us']:.0f} µs, the last column).",
        "",
    ]
    if floor:
        lines += [
            "The floor endpoint (bench/serve_floor.py) is the least a Python server on this stack "
            "can do and return the same results: uvicorn calling one bare ASGI function, orjson "
            "in, the same lookup, encode and search, the service's pre-serialised item JSON out; "
            "no framework, validation, metrics or request ids. Its ratio to the baseline is how "
            "far `bare + encode + search` measured in pieces sits below any server that does "
            "the work; the service's ratio to it is the price of everything the service adds.",
            "",
        ]
    if meta.get("parity"):
        p_, q_ = meta["parity"], meta["bench_parity"]
        lines += [
            f"Same results: {p_['bodies']} bodies (the first {q_['bodies']:,} mixed ones, then "
            "100 `explain` and 100 `filter` ones) posted to every service, each response compared "
            f"with {p_['reference']}'s (every field but the request id and `took_ms`): "
            + "; ".join(
                f"{name}: {p_['not_identical'][name]} not identical to the last bit, "
                f"{d} with other items or scores differing by more than 1e-4"
                for name, d in p_["differences"].items()
            )
            + f". The {q_['bodies']:,} mixed bodies to the bench servers: "
            + "; ".join(f"{name}: {d} differences" for name, d in q_["differences"].items())
            + " (items and scores within 1e-4).",
            "",
        ]
    enc = meta.get("encoders")
    if enc:
        built = f"{meta['before'].split(',')[0]}'s builder" if meta["before"] else "this tree"
        lines += [
            "The service with `CSMF_ENCODER=onnx` answers from a bundle this tree's builder made "
            f"with `--onnx` (same data, seeds, model and index parameters; every other server "
            f"from the bundle {built} made); its scores differ from numpy's in the last bits "
            "(float32 sums in another order), which reorders near-ties.",
            "",
        ]
        lines += [
            "The user tower three ways, in process, one thread, on the same "
            f"{enc['users']:,} users of the mixed bodies (raw rows → vectors; medians of 3 "
            "interleaved rounds): numpy (`UserEncoder`, the service's default), torch eager (the "
            "checkpoint's tower) and onnxruntime (the bundle's `user_tower.onnx`, "
            "`CSMF_ENCODER=onnx`):",
            "",
            *table(
                [
                    "encoder",
                    "µs/user, one per call (/v1/retrieve)",
                    f"µs/user, {enc['batch_size']} per call (batch)",
                    "max |difference| to numpy",
                ],
                [
                    [
                        k,
                        f"{enc['one_us'][k]:.1f}",
                        f"{enc['batch_us'][k]:.1f}",
                        f"{enc['max_abs_diff_to_numpy'][k]:.1e}",
                    ]
                    for k in enc["one_us"]
                ],
                "lrrr",
            ),  # fmt: skip
            "",
        ]
    lines += [
        "Mixed bodies (5,000: 10 % unknown users, 10 % inline histories, 40 % explicit weights, "
        "10 % `exclude`; `exclude_seen` at its default), 16 connections, k=50:",
        "",
    ]
    separate = bare["cpu_us_per_req"] + base["encode_us"] + base["search_us"]
    servers = {**runs}
    if hand:
        servers["hand-written endpoint"] = hand
    if floor:
        servers["floor endpoint"] = floor
    head = ["server", "req/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx", "server CPU µs/req",
            "ratio to baseline", "server cores used", "CPU split across workers %",
            "ratio, separate-loop baseline", "ratio to hand-written", "ratio to floor"]  # fmt: skip
    lines += table(
        head,
        (
            [name, f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
             f"{r['p99_ms']:.2f}", r["non_2xx"], f"{r['cpu_us_per_req']:.0f}", f"{r['ratio']:.2f}",
             f"{r['server_cores']:.2f}", r["worker_split"] or "-",
             f"{r['cpu_us_per_req'] / separate:.2f}",
             f"{r['hand_ratio']:.2f}" if "hand_ratio" in r else "-",
             f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"]
            for name, r in servers.items()
        ),
    )  # fmt: skip
    if options:
        names = list(next(iter(options.values())))
        lines += [
            "",
            f"What each option costs (medians of {meta['option_rounds']} rounds of "
            f"{meta['option_duration']} s of wrk per row, options interleaved"
            + ("" if meta["sequential"] else ", the servers under load together")
            + "; 2,000 bodies, known users, 16 connections; Δ = CPU µs/request over "
            "`plain` on the same server):",
            "",
        ]
        rows = []
        for opt, per in options.items():
            cells = [f"{opt}: {OPTION_NOTES[opt]}"]
            for s_ in names:
                r, plain = per[s_], options["plain"][s_]
                delta = r["cpu_us_per_req"] - plain["cpu_us_per_req"]
                cells += [f"{r['rps']:.0f}", f"{r['cpu_us_per_req']:.0f}"]
                cells.append("-" if opt == "plain" else f"{delta:+.0f}")
            rows.append(cells)
        lines += table(
            ["bodies"] + [f"{s_} {c}" for s_ in names for c in ("req/s", "CPU µs/req", "Δ µs")],
            rows,
        )
    if batch_res:
        lines += [
            "",
            "Batch endpoint (2 client processes, "
            f"{next(iter(batch_res.values()))['batch_size']} users per call, k=10, 10 s): "
            + "; ".join(
                f"{name}: {r['users_per_s']:.0f} users/s"
                + f" ({r['cpu_us_per_user']:.0f} µs server CPU per user)"
                for name, r in batch_res.items()
            )
            + ".",
        ]
        c = meta.get("batch_ceiling")
        if c:
            lines[-1] += (
                f" Ceiling: the work alone — one batched encode of {c['size']} known users and "
                f"one batched FAISS search (k={c['k']} + |seen|, as the service fetches), in "
                f"{c['procs']} processes at once, no HTTP, no JSON — runs {c['users_per_s']:.0f} "
                f"users/s, {c['procs'] * 1e6 / c['users_per_s']:.0f} µs of CPU per user "
                f"({c['search_share']:.0%} of it in the search)."
            )
    return "\n".join(lines) + "\n"


def write_report(out: Path, n: int, text: str, doc: dict) -> Path:
    """Replace the section for ``n`` items (tuned or not) in ``out``, keeping the others, and
    write its numbers, ``doc``, to serve-<n>[-tuned].json beside it. Returns the JSON path."""
    head = (
        "# Serving benchmark\n\nProduced by `bench/serve.py` (see its docstring for what is measured). "
        "16 connections, wrk on loopback, 5,000 varied bodies, k=50. Where a worker's time goes: "
        "bench/results/profile.md (bench/serve_profile.py, flame graphs before/after).\n\n"
    )
    sections = {}
    if out.exists():
        for block in re.split(r"(?m)^(?=## )", out.read_text()):
            m = re.match(r"## ([\d,]+) items( \(nprobe tuned\))?", block)
            if m:
                sections[(int(m.group(1).replace(",", "")), bool(m.group(2)))] = (
                    block.rstrip() + "\n"
                )
    tuned = "(nprobe tuned)" in text.splitlines()[0]
    sections[(n, tuned)] = text
    atomic_write_text(out, head + "\n".join(sections[k] for k in sorted(sections)))
    return write_json(out.with_name(f"{out.stem}-{n}{'-tuned' if tuned else ''}.json"), doc)
