"""Malformed datasets through the real `csmf train` entry point: one ``error:`` line naming the file
(full path), the column and the row count, exit code 2, never a traceback.

Each case runs ``csmf.cli.main(["train", ...])`` in process (what ``python -m csmf.cli train``
calls; a subprocess per case would cost ~10 s of torch import each), and one case runs as a real
``python -m csmf.cli train`` subprocess to prove the process-level behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from csmf import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "synthetic.toml"
EMPTY_EVENTS = pa.table(
    {
        "user_id": pa.array([], pa.int64()),
        "item_id": pa.array([], pa.int64()),
        "timestamp": pa.array([], pa.int64()),
        "clicked": pa.array([], pa.bool_()),
        "converted": pa.array([], pa.bool_()),
    }
)


def _not_utf8(values: list[bytes]) -> pa.Array:
    """A parquet string column holding bytes that are not UTF-8 (parquet does not check)."""
    return pa.array(values, pa.binary()).view(pa.string())


# name → (make_dataset overrides, file, what the message must also say)
CASES = {
    "missing column": (
        {"events": {"clicked": None}},
        "events.parquet",
        ["missing required column(s) clicked", "5 rows"],
    ),
    "wrong dtype": (
        {"events": {"timestamp": [1.5, 2.0, 3.0, 4.0, 5.0]}},
        "events.parquet",
        ["column timestamp must be an integer (int64), got double", "5 rows"],
    ),
    "converted without clicked": (
        {"events": {"clicked": [False, False, True, True, False]}},
        "events.parquet",
        ["1 rows have converted=true but clicked=false", "rows 0", "5 rows"],
    ),
    "empty file": ({"events": EMPTY_EVENTS}, "events.parquet", ["no rows"]),
    "duplicate ids": (
        {"items": {"item_id": [10, 11, 11, 13]}},
        "items.parquet",
        ["1 rows duplicate an earlier item_id (e.g. 11)", "4 rows"],
    ),
    "non-UTF-8 ids": (
        {
            "events": {"user_id": _not_utf8([b"a", b"a", b"\xff\xfe", b"c", b"c"])},
            "users": {"user_id": ["a", "b", "c"]},
        },
        "events.parquet",
        ["column user_id has 1 ids that are not valid UTF-8", "rows 2", "5 rows"],
    ),
    "ids as raw bytes": (
        {
            "events": {"user_id": pa.array([b"a", b"a", b"b", b"c", b"c"], pa.binary())},
            "users": {"user_id": pa.array([b"a", b"b", b"c"], pa.binary())},
        },
        "events.parquet",
        ["column user_id must be int64 or string, got binary", "5 rows"],
    ),
}


def _train(data: Path, out: Path) -> list[str]:
    return ["train", "--config", str(CONFIG), "--data", str(data), "--out", str(out)]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_dataset_is_one_clear_error_line(case, make_dataset, tmp_path, capsys):
    overrides, file, says = CASES[case]
    data = make_dataset(**overrides)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*_train(data, tmp_path / "run"), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"error: {data / file}: " in lines[0], lines[0]  # the full path of the file
    for part in says:
        assert part in lines[0], (part, lines[0])
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_malformed_dataset_from_the_command_line(make_dataset, tmp_path, report):
    """The real process: `python -m csmf.cli train` on a dataset with non-UTF-8 ids."""
    overrides, file, says = CASES["non-UTF-8 ids"]
    data = make_dataset(**overrides)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "csmf.cli", *_train(data, tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data / file}: "), p.stderr
    assert all(part in lines[0] for part in says)
    report.add(
        "Bad data (dataset loader through `csmf train`)",
        {
            "malformed datasets": f"{len(CASES)}: " + ", ".join(CASES),
            "exit code / stderr": "2 / one `error:` line each (no traceback)",
            "example (non-UTF-8 ids)": "`" + lines[0].replace(str(data), "<data>") + "`",
            "time to the error, real process (torch import included)": f"{took:.1f} s",
        },
    )
