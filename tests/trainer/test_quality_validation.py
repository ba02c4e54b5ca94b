"""bench/quality_validation.py's pseudo-test windows: built from train+val only, in time order,
with the returning-visit targets a subset of the window's targets."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trainer.pipeline import prepare

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality_validation.py"


@pytest.fixture(scope="module")
def qv():
    spec = importlib.util.spec_from_file_location("quality_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("window", [(3 / 8, 1 / 8, 5 / 8), (5 / 8, 1 / 8, 1.0), (1 / 2, 0, 3 / 4)])
def test_window_reads_only_train_and_val_in_time_order(qv, tiny_cfg, tiny_data, window):
    full = prepare(tiny_cfg, tiny_data)
    enc, truth = qv.pseudo_test(full, *window)
    ev = full.events
    fit, targets = enc.split.train, enc.split.val
    allowed = set(np.concatenate([full.split.train, full.split.val]).tolist())
    assert set(fit.tolist()) <= allowed and set(targets.tolist()) <= allowed
    assert not set(fit.tolist()) & set(targets.tolist())
    assert len(enc.split.test) == 0
    for u in np.unique(ev.user[targets]):  # every target is no earlier than the user's fit rows
        f, t = fit[ev.user[fit] == u], targets[ev.user[targets] == u]
        if len(f):
            assert ev.ts[f].max() <= ev.ts[t].min()
    # each user's share of fit rows follows the window (rounded per user)
    count = np.bincount(ev.user[list(allowed)], minlength=full.n_users)
    got = np.bincount(ev.user[fit], minlength=full.n_users)
    assert np.all(np.abs(got - count * window[0]) <= 1)
    for t in qv.TARGETS:
        for u, items in truth[f"{t} returning"].items():
            assert set(items.tolist()) <= set(truth[t][u].tolist())


@pytest.mark.parametrize("text", ["5/8:1/8", "0:0:1", "5/8:1/8:5/8", "a:b:c", "1/2:-1/8:1"])
def test_bad_windows_are_refused(qv, text):
    with pytest.raises(argparse.ArgumentTypeError, match="--window"):
        qv.parse_window(text)
