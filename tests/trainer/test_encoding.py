"""Histories never leak the target (or anything at or after it); evaluation sees all train events."""

import numpy as np

from trainer.encoding import OFFSET, stage_examples


def test_training_history_is_strictly_earlier_train_events(trained):
    enc = trained.enc
    ev, hist = enc.events, enc.history
    ex = stage_examples(enc, "exposure")
    train = set(enc.split.train.tolist())
    rng = np.random.default_rng(0)
    for k in rng.choice(len(ex), 200, replace=False):
        u = ex.user[k]
        got = hist.gather(ex.user[k : k + 1], ex.hist_end[k : k + 1])[0].numpy()
        got = got[got > 0]
        # the same thing computed naively from the raw event table
        row = next(r for r in enc.split.train if ev.user[r] == u and ev.item[r] == ex.item[k])
        earlier = [r for r in sorted(train) if ev.user[r] == u and ev.ts[r] < ev.ts[row]]
        earlier.sort(key=lambda r: (ev.ts[r], r))
        want = ev.item[earlier][-hist.max_len :] + OFFSET
        assert sorted(got.tolist()) == sorted(want.tolist())
        assert ex.item[k] + OFFSET not in got or (ev.item[earlier] == ex.item[k]).any()


def test_eval_history_is_the_latest_train_events(trained):
    enc = trained.enc
    ev = enc.events
    users = np.arange(enc.n_users)
    batch = enc.user_batch(users)["history"].numpy()  # (U, L)
    for u in users[:10]:
        rows = [r for r in enc.split.train if ev.user[r] == u]
        rows.sort(key=lambda r: (ev.ts[r], r))
        want = ev.item[rows][-enc.history.max_len :] + OFFSET
        got = batch[u][batch[u] > 0]
        assert sorted(got.tolist()) == sorted(want.tolist())
    assert not set(enc.split.test.tolist()) & set(enc.split.train.tolist())


def test_item_prob_is_frequency_among_stage_positives(trained):
    enc = trained.enc
    ex = stage_examples(enc, "click")
    counts = np.bincount(ex.item, minlength=enc.n_items)
    assert np.allclose(ex.item_prob.numpy(), counts / counts.sum())
    assert enc.events.clicked[enc.split.train].sum() == len(ex)
