"""The paper's baselines (MVKE, DMMP, DTML, MOPPR) and RP3β: shapes and served widths, training
lowers the loss, the served query/item vectors give exactly the scores the evaluation ranks by,
and the losses / weights against their formulas written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from trainer.baselines.dmmp import fused_queries
from trainer.baselines.joint import DynamicWeightAverage, distilled_exposures, train_exposures
from trainer.baselines.moppr import batch_grades, graded_softmax_loss, page_views
from trainer.cf_baselines import keep_top_k, rp3beta_weights
from trainer.evaluate import encode_all


@pytest.fixture
def enc(paper_baselines):
    return paper_baselines.enc


@pytest.fixture
def cfg(paper_baselines):
    """The tiny config with 4 epochs per stage (conftest.py's ``paper_baselines``)."""
    return paper_baselines.cfg


def test_mvke_widths_scores_and_training(cfg, enc, paper_baselines):
    model, info = paper_baselines("mvke")  # train_mvke(cfg, enc), shared with test_baselines.py
    assert info["loss"][-1] < info["loss"][0]
    d, k = cfg.model.out_dim, model.n_kernels
    users, items = np.arange(5), np.arange(7)
    with torch.no_grad():
        ub, ib = enc.user_batch(users), enc.item_batch(items)
        kernel_out = model.kernel_outputs(ub).view(5, k, d)
        for t, o in enumerate(model.tasks):
            stage = cfg.objectives.index(o)
            assert model.user(ub, stage).shape == (5, k * d)
            assert model.item(ib, stage).shape == (7, k * d)
            # the paper's score: <sum_k g_tk(i) E_k(u), v_t(i)>
            v = model.item_towers[t](ib)
            g = torch.softmax(model.gate_proj[t](v) @ model.kernels.T / 4.0, dim=1)
            user_for_item = torch.einsum("ik,ukd->uid", g, kernel_out)
            want = (user_for_item * v.unsqueeze(0)).sum(-1)
            got = model.user(ub, stage) @ model.item(ib, stage).T
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    e, v = encode_all(model, enc)
    assert e.shape[1] == v.shape[1] == len(model.tasks) * k * d
    # fused query in one search = sum_t w_t s_t
    w = [1.0, 1.8, 1.2]
    fused = (e * model.task_scale(w)) @ v.T
    per_task = [(e * model.task_scale([t == j for j in range(3)])) @ v.T for t in range(3)]
    torch.testing.assert_close(fused, sum(wt * s for wt, s in zip(w, per_task, strict=True)))


def test_teacher_learns_ctr_and_ctcvr(cfg, enc, paper_baselines):
    ex = train_exposures(enc)
    assert len(ex) == len(enc.split.train)
    assert not (ex.converted & ~ex.clicked).any()  # a conversion is a click
    _, losses = paper_baselines.teacher()  # train_teacher(cfg, enc, shared=1, specific=1)
    assert losses[-1] < losses[0]


def test_dmmp_serves_the_gated_fused_score_in_one_vector(cfg, enc, paper_baselines):
    model, info = paper_baselines("dmmp")  # train_dmmp(cfg, enc)
    assert info["loss"][-1] < info["loss"][0] and info["teacher_loss"][-1] < info["teacher_loss"][0]
    assert sum(info["loss_weights"]) == pytest.approx(2.0)  # DWA keeps the scale of a sum
    out, v = encode_all(model, enc)
    t, d = len(cfg.objectives), cfg.model.out_dim
    assert out.shape[1] == t * d + t and v.shape[1] == d
    weights = cfg.eval.weights
    q = fused_queries(out, weights, t, d)
    assert q.shape == (enc.n_users, d)
    e, alpha = out[:, : t * d].view(-1, t, d), out[:, t * d :]
    torch.testing.assert_close(alpha.sum(1), torch.ones(enc.n_users))
    want = sum(weights[s] * alpha[:, s : s + 1] * (e[:, s] @ v.T) for s in range(t))
    torch.testing.assert_close(q @ v.T, want, rtol=1e-4, atol=1e-5)


def test_dynamic_weight_average_follows_the_loss_ratios():
    dwa = DynamicWeightAverage(2, temperature=1.0)
    for epoch_losses in ([4.0, 1.0], [2.0, 1.0]):
        dwa([torch.tensor(epoch_losses[0]), torch.tensor(epoch_losses[1])])
        dwa.end_epoch()
    r = np.array([0.5, 1.0])  # the first loss halved, the second stalled → more weight
    np.testing.assert_allclose(dwa.weights, 2 * np.exp(r) / np.exp(r).sum())
    assert float(dwa([None, torch.tensor(3.0)])) == pytest.approx(dwa.weights[1] * 3.0)


def test_dtml_student_is_one_vector_and_learns(cfg, enc, paper_baselines):
    model, info = paper_baselines("dtml")  # train_dtml(cfg, enc)
    assert info["loss"][-1] < info["loss"][0]
    e, v = encode_all(model, enc)
    assert e.shape == (enc.n_users, cfg.model.out_dim) and v.shape[1] == cfg.model.out_dim


def test_moppr_page_views_carry_grades_and_candidates(enc):
    pv = page_views(enc)
    ev, rows = enc.events, enc.split.train
    assert len(pv) == len(np.unique(ev.request[rows]))
    assert set(np.unique(pv.grade)) <= {0, 1, 2, 3} and (pv.grade == 0).any()
    # the grade of every train event is 1 + clicked + converted (max within its page view)
    r = rows[0]
    p = int(np.flatnonzero(pv.user == ev.user[r])[0])
    assert pv.hist_end[p] >= 0
    lo, hi = pv.ptr[: len(pv)], pv.ptr[1:]
    assert (hi > lo).all()
    grades = 1 + ev.clicked[rows].astype(int) + ev.converted[rows].astype(int)
    assert pv.grade[pv.grade >= 1].sum() <= grades.sum()  # duplicates collapse to their max


def test_graded_softmax_equals_its_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    grade = torch.tensor([[3, 1, 0, -1, -1, 2], [-1, 2, 1, 1, 0, -2]])
    weights = [1.0, 1.8, 1.2]
    want = 0.0
    for g, w in enumerate(weights, start=1):
        terms = []
        for r in range(2):
            neg = [j for j in range(6) if -1 <= grade[r, j] < g]
            for i in range(6):
                if grade[r, i] >= g:
                    denom = torch.logsumexp(logits[r, [i, *neg]], 0)
                    terms.append(denom - logits[r, i])
        if terms:
            want += w * torch.stack(terms).mean()
    torch.testing.assert_close(graded_softmax_loss(logits, grade, weights), want)


def test_moppr_batches_and_training(cfg, enc, paper_baselines):
    pv = page_views(enc)
    cols, grade, exposed, n_exposed = batch_grades(pv, np.arange(3), enc.n_items, False)
    assert grade.shape == (3, len(cols)) and (np.diff(cols) > 0).all()
    for r in range(3):  # each page view's own items carry their grade, the rest are level -1
        own = pv.item[pv.ptr[r] : pv.ptr[r + 1]]
        assert (grade[r, np.searchsorted(cols, own)] == pv.grade[pv.ptr[r] : pv.ptr[r + 1]]).all()
        assert (np.delete(grade[r], np.searchsorted(cols, own)) == -1).all()
    assert n_exposed == int((pv.grade[: pv.ptr[3]] >= 1).sum())
    model, info = paper_baselines("moppr")  # train_moppr(cfg, enc)
    assert info["loss"][-1] < info["loss"][0]


def test_rp3beta_is_the_three_step_walk():
    rng = np.random.default_rng(0)
    dense = (rng.random((7, 5)) < 0.5).astype(np.float32)
    dense[0, 0] = 1.0
    x = sp.csr_matrix(dense)
    alpha, beta = 0.7, 0.3
    du, di = dense.sum(1), dense.sum(0)
    want = np.zeros((5, 5))
    for i in range(5):
        for j in range(5):
            if i == j or di[j] == 0:
                continue
            walk = sum(
                (dense[u, i] / di[i]) ** alpha * (dense[u, j] / du[u]) ** alpha
                for u in range(7)
                if dense[u, i] and dense[u, j]
            )
            want[i, j] = walk / di[j] ** beta
    np.testing.assert_allclose(rp3beta_weights(x, alpha, beta), want, rtol=1e-6, atol=1e-12)
    top = keep_top_k(want.T, 2).T  # each source item keeps its 2 largest targets
    assert ((top > 0).sum(1) <= 2).all()


def test_distilled_exposures_are_drawn_by_the_teachers_value(cfg, enc, paper_baselines):
    teacher, _ = paper_baselines.teacher()  # train_teacher(cfg, enc, shared=1, specific=1)
    dist = distilled_exposures(teacher, enc, cfg)
    assert len(dist.value) == len(enc.split.train) and (dist.value > 0).all()
    ex = dist.examples
    torch.testing.assert_close(float(ex.item_prob.sum()), 1.0, rtol=1e-5, atol=1e-5)
    # an exposure's value is the teacher's fused probability of that pair
    idx = np.arange(4)
    ctr, cvr = teacher.logits(
        enc.user_batch(ex.user[idx], ex.hist_end[idx]), enc.item_batch(ex.item[idx])
    )
    k = dict(zip(cfg.objectives, cfg.eval.weights, strict=True))
    p = torch.sigmoid(ctr)
    want = (k["click"] * p + k["conversion"] * p * torch.sigmoid(cvr)) / (
        k["click"] + k["conversion"]
    )
    np.testing.assert_allclose(dist.value[:4], want.double().numpy(), rtol=1e-5)
    draws = np.bincount(dist.draw(np.random.default_rng(0), 200_000), minlength=len(dist.value))
    top, low = int(np.argmax(dist.value)), int(np.argmin(dist.value))
    assert draws[top] > draws[low]
