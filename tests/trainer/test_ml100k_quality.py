"""MovieLens-100K with the default config (configs/ml-100k.toml) on `make demo`'s shorter
schedule (4 epochs per stage, 2 of accuracy recovery: what a new user trains first, at about half
the time of the full schedule, which costs 0.005 Recall@50 — bench/results/train-scale.md): every
view and the fused score beat the popularity rankings on test clicks and test conversions.

Training time is not asserted here (the machine is shared; a timed unit test is noise): it is
recorded by `python -m bench.harness.report` (runs/<name>/report.md) — 45–50 s per seed on 2 idle cores."""

from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data.movielens import convert_ml100k, fetch_ml100k
from trainer.pipeline import eval_run, train_run

ROOT = Path(__file__).resolve().parents[2]
DEMO_SCHEDULE = ["train.epochs=4", "train.ar_epochs=2"]  # the Makefile's DEMO_SET


@pytest.mark.slow
def test_default_config_beats_popularity_on_ml100k(tmp_path):
    data = tmp_path / "ml-100k"
    convert_ml100k(fetch_ml100k(), data)  # cached under $CSMF_CACHE_DIR or ~/.cache/csmf
    cfg = load_config(ROOT / "configs" / "ml-100k.toml", DEMO_SCHEDULE)
    train_run(cfg, data, tmp_path / "run", log=lambda _: None, progress=False)
    result = eval_run(tmp_path / "run")
    for target in ("click", "conversion"):
        m = result["metrics"][target]
        for ranker in ("exposure", "click", "conversion", "fused"):
            assert m[ranker]["recall"] > m["popularity (exposures)"]["recall"], (target, ranker, m)
            if (ranker, target) != ("exposure", "conversion"):
                # popularity by clicks is the stronger baseline for conversions; the exposure
                # view only ties it there (3 seeds: 0.333 ± 0.008 vs 0.330), the others beat it
                assert m[ranker]["recall"] > m["popularity (clicks)"]["recall"], (target, ranker)
