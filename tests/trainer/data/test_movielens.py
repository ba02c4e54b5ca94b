"""MovieLens-100K: conversion of hand-made atomic files row by row, fetch failures, the real data."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from csmf.errors import DataError
from trainer.data import movielens
from trainer.data.dataset import load_dataset
from trainer.data.movielens import WHEEL, convert_ml100k, fetch_ml100k

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
2\t20\t5\t300
1\t10\t4\t100
1\t30\t3\t300
2\t10\t1\t200
"""
USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
2\t17\tF\tstudent\tV3N4P
1\t56\tM\tretired\t01002
3\t25\tM\twriter\t
4\t18\tF\tartist\t55414
5\t49\tM\tdoctor\t98101
6\t50\tF\tlawyer\t19104
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
30\tHeat\t1995\tAction Crime Thriller
10\tToy Story\t1995\tAnimation Children's Comedy
20\tunkonwn\tunkonwn\tunknown
40\tMetropolis\t1927\tDrama Sci-Fi
"""


def _write_src(folder: Path, inter: str = INTER, user: str = USER, item: str = ITEM) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    src = {}
    for kind, text in (("inter", inter), ("user", user), ("item", item)):
        src[kind] = folder / f"ml-100k.{kind}"
        src[kind].write_text(text)
    return src


def test_convert_tiny_source_gives_exact_rows(tmp_path):
    counts = convert_ml100k(_write_src(tmp_path / "src"), tmp_path / "out")
    out = tmp_path / "out"
    assert counts == {"users": 6, "items": 4, "exposures": 4, "clicks": 2, "conversions": 1}
    # ordered by timestamp; the tie at 300 keeps file order
    assert pq.read_table(out / "events.parquet").to_pylist() == [
        {"user_id": 1, "item_id": 10, "timestamp": 100, "clicked": True, "converted": False,
         "rating": 4},
        {"user_id": 2, "item_id": 10, "timestamp": 200, "clicked": False, "converted": False,
         "rating": 1},
        {"user_id": 2, "item_id": 20, "timestamp": 300, "clicked": True, "converted": True,
         "rating": 5},
        {"user_id": 1, "item_id": 30, "timestamp": 300, "clicked": False, "converted": False,
         "rating": 3},
    ]  # fmt: skip
    assert pq.read_table(out / "users.parquet").to_pylist() == [
        {"user_id": 1, "age_bucket": "56+", "gender": "M", "occupation": "retired",
         "zip_prefix": "0"},
        {"user_id": 2, "age_bucket": "<18", "gender": "F", "occupation": "student",
         "zip_prefix": "other"},
        {"user_id": 3, "age_bucket": "25-34", "gender": "M", "occupation": "writer",
         "zip_prefix": "other"},
        {"user_id": 4, "age_bucket": "18-24", "gender": "F", "occupation": "artist",
         "zip_prefix": "5"},
        {"user_id": 5, "age_bucket": "45-49", "gender": "M", "occupation": "doctor",
         "zip_prefix": "9"},
        {"user_id": 6, "age_bucket": "50-55", "gender": "F", "occupation": "lawyer",
         "zip_prefix": "1"},
    ]  # fmt: skip
    assert pq.read_table(out / "items.parquet").to_pylist() == [
        {"item_id": 10, "genres": ["Animation", "Children's", "Comedy"],
         "year_bucket": "1990s", "title": "Toy Story"},
        {"item_id": 20, "genres": ["unknown"], "year_bucket": "unknown", "title": "unkonwn"},
        {"item_id": 30, "genres": ["Action", "Crime", "Thriller"], "year_bucket": "1990s",
         "title": "Heat"},
        {"item_id": 40, "genres": ["Drama", "Sci-Fi"], "year_bucket": "1920s",
         "title": "Metropolis"},
    ]  # fmt: skip
    schema = pq.read_schema(out / "events.parquet")
    assert [str(schema.field(c).type) for c in ("user_id", "timestamp", "clicked")] == [
        "int64",
        "int64",
        "bool",
    ]
    ds = load_dataset(out)
    assert ds.meta["counts"] == counts
    src_sha = hashlib.sha256((tmp_path / "src" / "ml-100k.inter").read_bytes()).hexdigest()
    assert ds.meta["source"]["files"]["ml-100k.inter"]["sha256"] == src_sha
    assert not list(out.glob(".tmp-*"))


def test_convert_rejects_fractional_ratings(tmp_path):
    inter = INTER.replace("\t4\t100", "\t3.5\t100")
    with pytest.raises(DataError, match=r"ml-100k.inter: column rating has 1 values .*'3.5'"):
        convert_ml100k(_write_src(tmp_path / "src", inter=inter), tmp_path / "out")


def test_convert_rejects_missing_columns(tmp_path):
    user = USER.replace("\tzip_code:token", "")
    with pytest.raises(DataError, match="ml-100k.user: missing column.s. zip_code"):
        convert_ml100k(_write_src(tmp_path / "src", user=user), tmp_path / "out")


def test_failed_conversion_leaves_previous_dataset_untouched(tmp_path):
    out = tmp_path / "out"
    convert_ml100k(_write_src(tmp_path / "good"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    inter = INTER + "9\t10\t5\t400\n"  # user 9 is not in the user file
    with pytest.raises(DataError, match="1 rows have user_id not in users.parquet .e.g. 9."):
        convert_ml100k(_write_src(tmp_path / "bad", inter=inter), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _no_index_env(monkeypatch) -> None:
    """Make pip fail fast and offline: no index, no find-links."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


def test_fetch_without_index_is_one_clear_line(tmp_path, monkeypatch):
    _no_index_env(monkeypatch)
    with pytest.raises(DataError) as info:
        fetch_ml100k(tmp_path)
    msg = str(info.value)
    assert msg.startswith("could not download recbole==1.2.1 from the package index (pip said: ")
    assert f"put {WHEEL} into {tmp_path / 'wheels'}" in msg
    assert "\n" not in msg


def test_cli_reports_fetch_failure_without_traceback(tmp_path, monkeypatch):
    _no_index_env(monkeypatch)
    cmd = [sys.executable, "-m", "trainer.data.cli", "ml-100k", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [*cmd, "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not download recbole==1.2.1 from the package index")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_checksum_mismatch_names_file_and_remedy(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / WHEEL, "w") as zf:
        for kind in ("inter", "user", "item"):
            zf.writestr(f"recbole/dataset_example/ml-100k/ml-100k.{kind}", "not the data\n")
    with pytest.raises(DataError, match="checksum mismatch for ml-100k.inter in .*delete .* and"):
        fetch_ml100k(tmp_path)
    assert not (tmp_path / "ml-100k" / "ml-100k.inter").exists()


def test_cached_wheel_is_used_without_pip_and_corrupt_files_re_extracted(
    ml100k_cache, ml100k_src, tmp_path, monkeypatch
):
    real_wheel = ml100k_cache / "wheels" / WHEEL
    if not real_wheel.exists():  # the cache held extracted files only: fetch the wheel itself
        movielens._ensure_wheel(ml100k_cache / "wheels", None)
    (tmp_path / "wheels").mkdir()
    shutil.copy(real_wheel, tmp_path / "wheels" / WHEEL)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    paths = fetch_ml100k(tmp_path)
    paths["inter"].write_text("corrupted")
    paths = fetch_ml100k(tmp_path)
    digest = hashlib.sha256(paths["inter"].read_bytes()).hexdigest()
    assert digest == movielens.SOURCES["inter"][1]


@pytest.mark.slow
def test_real_ml100k_counts_match_the_raw_file(ml100k_dir, ml100k_src):
    ds = load_dataset(ml100k_dir)
    with open(ml100k_src["inter"], newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    ratings = [float(r["rating:float"]) for r in rows]
    expected = {
        "users": 943,
        "items": 1682,
        "exposures": 100_000,
        "clicks": sum(r >= 4 for r in ratings),
        "conversions": sum(r == 5 for r in ratings),
    }
    assert len(ratings) == 100_000
    assert ds.counts() == expected
    assert ds.meta["counts"] == expected
    assert ds.meta["source"]["files"]["ml-100k.item"]["sha256"] == movielens.SOURCES["item"][1]
    assert set(ds.users.column_names) == {"user_id", "age_bucket", "gender", "occupation",
                                          "zip_prefix"}  # fmt: skip
    assert set(ds.items.column_names) == {"item_id", "genres", "year_bucket", "title"}
