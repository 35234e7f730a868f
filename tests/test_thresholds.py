"""eval.tune_threshold: the robust cut, what the export stores, and eval/predict using it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launcher.config import load_config
from launcher.errors import ConfigError
from launcher.tasks import classification as clf

from conftest import CONFIGS, FAST, TINY, check, launcher


def _binary_logits(p_positive: np.ndarray) -> torch.Tensor:
    """Two-class logits whose softmax gives these positive-class probabilities."""
    p = torch.as_tensor(p_positive, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], -1).float()


def test_plateau_middle_not_the_single_best_point():
    grid = clf.TUNE_GRID
    # A broad plateau from 0.30 to 0.60 and one lucky point at 0.80 that beats it by 0.005
    # (within the tolerance) would pull an arg-max rule to 0.80; the plateau rule stays on
    # the broad run around the best point only when it is connected to it.
    scores = np.where((grid >= 0.30) & (grid <= 0.60), 0.90, 0.70)
    assert clf.plateau_middle(scores) == pytest.approx(0.45)
    spiked = scores.copy()
    spiked[np.isclose(grid, 0.80)] = 0.905
    assert clf.plateau_middle(spiked) == pytest.approx(0.80)  # isolated: the spike is its own plateau
    bridged = spiked.copy()
    bridged[(grid > 0.60) & (grid < 0.80)] = 0.897  # within 0.01 of the best: one plateau 0.30..0.80
    assert clf.plateau_middle(bridged) == pytest.approx(0.55)
    assert clf.TUNE_GRID.min() >= 0.1 and clf.TUNE_GRID.max() <= 0.9  # a limited range


def test_half_stays_unless_it_is_clearly_worse():
    grid = clf.TUNE_GRID
    near = np.where(grid <= 0.40, 0.86, 0.855)  # 0.5 within 0.01 of the best: not worth moving
    assert clf.choose_cut(near) == 0.5
    far = np.where(grid <= 0.40, 0.86, 0.80)  # 0.5 clearly worse: the plateau 0.10..0.40
    assert clf.choose_cut(far) == pytest.approx(0.25)
    assert far[np.isclose(grid, 0.25)][0] > far[np.isclose(grid, 0.5)][0]


def test_binary_cut_finds_positives_the_half_rule_misses():
    rng = np.random.default_rng(0)
    neg = rng.uniform(0.01, 0.15, 300)
    pos = rng.uniform(0.22, 0.45, 30)  # all below 0.5: the plain rule finds none
    logits = _binary_logits(np.concatenate([neg, pos]))
    labels = torch.tensor([0] * 300 + [1] * 30)
    names = ["fair", "unfair"]
    cut = clf.tune_cuts(logits, labels, names)
    assert neg.max() < cut < pos.min()
    tuned = clf.compute_metrics(logits, labels, names, clf.cut_vector(cut, names, False))
    plain = clf.compute_metrics(logits, labels, names)
    assert tuned["macro_f1"] == 1.0 and plain["f1/unfair"] == 0.0
    # The default rule (cuts None) is the argmax rule.
    assert plain == clf.compute_metrics(logits, labels, names, None)


def test_a_binary_cut_stays_at_half_when_validation_holds_one_class():
    """With no unfair clause in validation, raising the cut only trades the absent class away
    (macro-F1 over fair and an empty unfair): it moved to 0.86 on 50 fair rows. It keeps 0.5,
    as a multi-label category with no validation positive does; so with no fair clause."""
    rng = np.random.default_rng(2)
    scores = rng.uniform(0.3, 0.7, 50)
    logits, names = _binary_logits(scores), ["fair", "unfair"]
    for only in (0, 1):
        assert clf.tune_cuts(logits, torch.tensor([only] * 50), names) == 0.5
    mixed = torch.tensor([0] * 45 + [1] * 5)  # (with both classes it still tunes: the test above)
    assert clf.tune_cuts(_binary_logits(np.concatenate([scores[:45] * 0.2, scores[45:] * 0.8])), mixed, names) != 0.5


def test_multilabel_cuts_per_category_and_unseen_category_keeps_half():
    rng = np.random.default_rng(1)
    n = 200
    truth = np.zeros((n, 3), dtype=bool)
    truth[:20, 0] = True          # category a: positives score 0.3..0.4, negatives < 0.2
    truth[20:40, 1] = True        # category b: positives score 0.7..0.8, negatives < 0.6
    probs = np.zeros((n, 3))
    probs[:, 0] = np.where(truth[:, 0], rng.uniform(0.3, 0.4, n), rng.uniform(0.0, 0.2, n))
    probs[:, 1] = np.where(truth[:, 1], rng.uniform(0.7, 0.8, n), rng.uniform(0.0, 0.6, n))
    probs[:, 2] = rng.uniform(0.0, 0.3, n)  # category c: no validation positive
    logits = torch.logit(torch.as_tensor(probs).clamp(1e-6, 1 - 1e-6)).float()
    labels = torch.as_tensor(truth, dtype=torch.float)
    names = ["a", "b", "c"]
    cuts = clf.tune_cuts(logits, labels, names)
    assert set(cuts) == set(names) and cuts["c"] == 0.5
    assert probs[~truth[:, 0], 0].max() < cuts["a"] < probs[truth[:, 0], 0].min()
    assert probs[~truth[:, 1], 1].max() < cuts["b"] < probs[truth[:, 1], 1].min()
    tuned = clf.compute_metrics(logits, labels, names, clf.cut_vector(cuts, names, True))
    assert tuned["f1/a"] == tuned["f1/b"] == 1.0
    assert tuned["f1/none"] > clf.compute_metrics(logits, labels, names)["f1/none"]


def test_multilabel_cuts_never_lower_the_macro_f1_they_are_tuned_for():
    """Each category's cut was tuned for its own F1: B below has no signal (every probability
    0.30-0.45), so predicting B on every clause lifted its F1 from 0 and emptied `none`. The
    exported rule scored macro-F1 0.608 where 0.5 scored 0.647, on the rows it was tuned on."""
    g = torch.Generator().manual_seed(0)
    n = 400
    labels = torch.zeros(n, 2)
    labels[:40, 0] = 1
    labels[40:80, 1] = 1
    a = torch.where(labels[:, 0] > 0, torch.full((n,), 0.9), torch.full((n,), 0.1))
    b = 0.3 + 0.15 * torch.rand(n, generator=g)
    logits = torch.logit(torch.stack([a, b], 1))
    names = ["A", "B"]
    cuts = clf.tune_cuts(logits, labels, names)
    plain = clf.compute_metrics(logits, labels, names)
    tuned = clf.compute_metrics(logits, labels, names, clf.cut_vector(cuts, names, True))
    assert tuned["macro_f1"] >= plain["macro_f1"], (cuts, tuned, plain)
    for name in names:  # every cut that moved earns its place in the whole
        if cuts[name] != 0.5:
            back = clf.compute_metrics(logits, labels, names, clf.cut_vector(cuts | {name: 0.5}, names, True))
            assert back["macro_f1"] < tuned["macro_f1"], name


def test_the_joint_score_a_multilabel_cut_is_tuned_on_is_evaluations_macro_f1():
    """tune_cuts scores each category's cuts without re-evaluating every column (k passes, not
    k squared: 100 categories took 55 s): at every grid point it equals compute_metrics."""
    rng = np.random.default_rng(3)
    n, k = 300, 5
    truth = rng.random((n, k)) < np.array([0.02, 0.1, 0.3, 0.0, 0.05])
    # (and rows that all have a category, topic data: the none column counts only at the cuts
    # that leave a row predicted with none)
    every = truth.copy()
    every[~every.any(1), 2] = True
    for truth, lift in ((truth, rng.uniform(0.2, 0.9, (n, k))), (every, np.where(rng.random((n, k)) < 0.9, 0.6, 0.3))):
        probs = np.clip(truth * lift + rng.uniform(0, 0.5, (n, k)), 1e-4, 1 - 1e-4)
        logits = torch.logit(torch.as_tensor(probs)).float()
        labels = torch.as_tensor(truth, dtype=torch.float)
        names = list("abcde")
        cuts = np.array([0.5, 0.3, 0.6, 0.5, 0.45])
        p = clf.probabilities(logits, True).numpy()
        for j in range(k):
            scores = clf.joint_macro_f1(p, truth, cuts, j)
            for g, score in zip(clf.TUNE_GRID, scores):
                held = cuts.copy()
                held[j] = g
                assert score == pytest.approx(clf.compute_metrics(logits, labels, names, held)["macro_f1"], abs=1e-12), (j, g)


def test_a_stored_per_category_rule_names_what_the_model_cannot_apply(tmp_path):
    """launcher.json's per-category cuts on a multi-label model: an unknown category (its cut
    was ignored: a renamed label) or a value that is no cut is one line; a rule over some of
    its categories is kept (the others keep 0.5)."""
    names, path = ["a", "b", "none"], tmp_path / "launcher.json"
    assert clf.checked_threshold({"a": 0.3}, names, True, path) == {"a": 0.3}
    assert clf.checked_threshold(0.4, names, True, path) == 0.4 and clf.checked_threshold(None, names, False, path) is None
    for bad, said in (({"a": 0.3, "c": 0.2, "B": 0.1}, "'B', 'c' not among the model's categories (a, b, none)"),
                      ({"a": 0.3, "b": 1}, "'b': 1 is not a cut strictly between 0 and 1"),
                      ({"a": None}, "'a': null is not"), ([0.3], "[0.3] is not a cut")):
        with pytest.raises(ConfigError) as e:
            clf.checked_threshold(bad, names, True, path)
        assert str(e.value).startswith(f"MODEL_DIR: {path}: threshold: {said}"), str(e.value)
    # a rule on a model that picks the likeliest of 3 classes was ignored; 0.5, as launcher writes, is kept
    for rule in ({"a": 0.3}, 0.3):
        with pytest.raises(ConfigError, match="a cut is for a binary or multi-label model; this one picks the likeliest of 3"):
            clf.checked_threshold(rule, names, False, path)
    assert clf.checked_threshold(0.5, names, False, path) == 0.5


def test_prediction_record_follows_the_cut():
    probs = torch.tensor([0.7, 0.3])
    names = ["fair", "unfair"]
    assert clf.prediction_record(probs, names, False)["label"] == "fair"
    assert clf.prediction_record(probs, names, False, np.array([0.25]))["label"] == "unfair"
    ml = clf.prediction_record(torch.tensor([0.3, 0.6]), ["a", "b"], True, np.array([0.2, 0.7]))
    assert ml["labels"] == ["a"]


def test_tune_threshold_is_for_classification_only():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "train" / "sft_tiny.yaml", ["eval.tune_threshold=true"])
    assert "eval.tune_threshold: only for task classification" in e.value.problems


@pytest.mark.slow
def test_tuned_export_is_what_eval_and_predict_use(tmp_path):
    """A short run tunes the cut on validation: launcher.json stores it, the final metrics
    carry both rules, and `launcher eval` / `predict` apply the stored cut."""
    trained = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "tuned", *FAST,
                             "train.max_steps=30", "eval.every_steps=10", "eval.tune_threshold=true"))
    run = tmp_path / "tuned"
    meta = json.loads((run / "model" / "launcher.json").read_text())
    cut = meta["threshold"]
    assert meta["threshold_tuned"] is True and 0.1 <= cut <= 0.9
    summary = json.loads((run / "final_metrics.json").read_text())
    after = summary["after"]
    assert {"macro_f1", "macro_f1@0.5", "micro_f1@0.5"} <= set(after)
    assert f"decision threshold tuned on validation for macro-F1: {cut} (macro_f1 {after['macro_f1']:.4f}; " \
           f"at 0.5: {after['macro_f1@0.5']:.4f})" in trained.stdout
    # Tuned on the best evaluation's outputs kept with its snapshot (an earlier step than the
    # last): its loss is the one the run logged, not rounded through float32 on the way.
    assert summary["exported_step"] < summary["step"]
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert after["loss"] == next(r["eval/loss"] for r in logged if r["step"] == summary["exported_step"] and "eval/loss" in r)
    data = run / "data" / "validation.jsonl"
    fresh = json.loads(check(launcher("eval", str(run / "model"), "--data", str(data))).stdout)
    assert fresh["macro_f1"] == pytest.approx(after["macro_f1"], abs=1e-9)
    assert fresh["macro_f1@0.5"] == pytest.approx(after["macro_f1@0.5"], abs=1e-9)
    # The tuned rule is at least as good as 0.5 on the set it was tuned on.
    assert fresh["macro_f1"] >= fresh["macro_f1@0.5"]

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    (tmp_path / "in.txt").write_text("\n".join(r["text"] for r in rows) + "\n")

    def predict() -> list[dict]:
        check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")))
        return [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]

    preds = predict()
    assert [p["label"] for p in preds] == ["unfair" if p["probs"]["unfair"] > cut else "fair" for p in preds]

    # A checkpoint was sealed before the cut was tuned: it holds the 0.5 rule, says so, and its
    # export says so too (before, it claimed a tuned rule and applied 0.5 as if tuned).
    ckpt = run / "checkpoints" / "step-000030"  # the last step's, evaluated at 0.5 as "last"
    assert json.loads((ckpt / "skeleton" / "launcher.json").read_text())["threshold_tuned"] is False
    out = check(launcher("export", str(ckpt), str(tmp_path / "from_ckpt"))).stdout
    assert out.rstrip().endswith("; decision rule: 0.5 (eval.tune_threshold tunes a cut only at the run's end, into "
                                  "its model/launcher.json)")
    assert json.loads((tmp_path / "from_ckpt" / "launcher.json").read_text())["threshold_tuned"] is False
    plain = json.loads(check(launcher("eval", str(tmp_path / "from_ckpt"), "--data", str(data))).stdout)
    last = json.loads((run / "final_metrics.json").read_text())["last"]
    # The training plot's classes are the labels, not the 0.5 rule's columns beside them.
    from launcher.report import per_class_f1

    assert sorted(per_class_f1(after)) == ["fair", "unfair"]
    assert plain["macro_f1"] == pytest.approx(last["macro_f1"], abs=1e-9) and "macro_f1@0.5" not in plain
    # A skeleton an older launcher wrote with a tuned cut: its export holds 0.5 as it says
    # (it said 0.5 and applied the old cut)
    older = json.loads((ckpt / "skeleton" / "launcher.json").read_text()) | {"threshold": 0.03, "threshold_tuned": True}
    (ckpt / "skeleton" / "launcher.json").write_text(json.dumps(older))
    # (edited here, so past its seal's sizes: exported as it is; an older launcher's was sealed so)
    check(launcher("export", str(ckpt), str(tmp_path / "from_older"), "--trust-checkpoint"))
    assert json.loads((tmp_path / "from_older" / "launcher.json").read_text())["threshold"] == 0.5
    again = json.loads(check(launcher("eval", str(tmp_path / "from_older"), "--data", str(data))).stdout)
    assert again["macro_f1"] == plain["macro_f1"]

    # The tuned cut may well be 0.5 (it moves only when 0.5 is clearly worse), where the
    # stored cut and argmax agree. So store a cut that changes decisions, about the median of
    # the unfair probabilities, and check that eval and predict both follow it.
    probs = np.array([p["probs"]["unfair"] for p in preds])
    middle = np.unique(probs)
    i = len(middle) // 2  # halfway between two probabilities: no clause sits on the cut
    moved = float((middle[i - 1] + middle[i]) / 2)
    meta["threshold"] = moved
    (run / "model" / "launcher.json").write_text(json.dumps(meta))
    decided = probs > moved
    assert decided.sum() != (probs > 0.5).sum()
    assert [p["label"] for p in predict()] == ["unfair" if d else "fair" for d in decided]
    truth = np.array([bool(r["labels"]) for r in rows])  # binary mode: any unfair category

    def f1(pos, gold):
        tp = (pos & gold).sum()
        return 2 * tp / max(pos.sum() + gold.sum(), 1)

    expected = (f1(decided, truth) + f1(~decided, ~truth)) / 2
    moved_eval = json.loads(check(launcher("eval", str(run / "model"), "--data", str(data))).stdout)
    assert moved_eval["macro_f1"] == pytest.approx(expected, abs=1e-6)
    assert moved_eval["macro_f1@0.5"] == pytest.approx(fresh["macro_f1@0.5"], abs=1e-9)
    # A rule the model cannot apply is one line: a cut of 0 or 1 decided every clause alike, a
    # per-category rule on this binary model was a traceback
    for bad, said in ((0, "0 is not a cut strictly between 0 and 1"), (1.0, "1.0 is not a cut strictly between 0 and 1"),
                      (True, "true is not"), ("0.3", '"0.3" is not'),
                      ({"unfair": 0.3}, "a cut per category is for a multi-label model; this one is binary (one number)")):
        (run / "model" / "launcher.json").write_text(json.dumps(meta | {"threshold": bad}))
        for command in ([["eval", str(run / "model"), "--data", str(data)]] if bad == 0 else []) + [
                ["predict", str(run / "model"), "--input", str(tmp_path / "in.txt")]]:
            proc = launcher(*command)
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-1500:]
            assert errors[0].startswith(f"error: MODEL_DIR: {run / 'model' / 'launcher.json'}: threshold: {said}"), errors

    # Chosen by loss, which no cut moves: the cut is still tuned for macro-F1, and the line says
    # so (it printed "(loss 0.6856; at 0.5: nan)": there is no loss@0.5).
    by_loss = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "by_loss", *FAST,
                             "train.max_steps=10", "eval.every_steps=10", "eval.tune_threshold=true", "eval.metric=loss"))
    after = json.loads((tmp_path / "by_loss" / "final_metrics.json").read_text())["after"]
    cut = json.loads((tmp_path / "by_loss" / "model" / "launcher.json").read_text())["threshold"]
    assert f"decision threshold tuned on validation for macro-F1: {cut} (macro_f1 {after['macro_f1']:.4f}; " \
           f"at 0.5: {after['macro_f1@0.5']:.4f})" in by_loss.stdout
