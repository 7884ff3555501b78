import json

import numpy as np
import pytest
from sklearn import metrics as skm

from conftest import assert_one_line_error, run_script
from testing import classification_metrics, gated_metrics, mean_std_table

CLASSES = ["Chickenpox", "Cowpox", "HFMD", "Healthy", "Measles", "Monkeypox"]


def _hand_made(seed=0, n=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    logits = rng.normal(0, 1, (n, 6))
    logits[np.arange(n), y] += 1.5  # mostly right
    logits[:, 1] -= 10  # Cowpox is never predicted
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def test_metrics_match_scikit_learn_including_a_never_predicted_class():
    y, probs = _hand_made()
    pred = probs.argmax(1)
    assert 1 not in pred and 1 in y
    m = classification_metrics(y, probs, CLASSES)
    labels = list(range(6))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert m["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    cm = skm.confusion_matrix(y, pred, labels=labels)
    assert m["confusion"] == cm.tolist()
    for c, name in enumerate(CLASSES):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        assert m["per_class"][name]["specificity"] == pytest.approx(tn / (cm.sum() - cm[c].sum()))
    mpox = y == 5
    assert m["mpox_sensitivity"] == pytest.approx(skm.recall_score(mpox, pred == 5))
    assert m["mpox_specificity"] == pytest.approx(skm.recall_score(~mpox, pred != 5))
    assert m["per_class"]["Cowpox"]["precision"] == 0 and m["per_class"]["Cowpox"]["recall"] == 0


def test_confidence_gate_coverage_and_covered_metrics():
    y, probs = _hand_made(1)
    g = gated_metrics(y, probs, CLASSES, 0.6)
    covered = probs.max(1) >= 0.6
    assert g["coverage"] == pytest.approx(covered.mean()) and 0 < g["coverage"] < 1
    assert g["accuracy"] == pytest.approx(skm.accuracy_score(y[covered], probs[covered].argmax(1)))
    assert gated_metrics(y, probs, CLASSES, 1.01)["n_covered"] == 0


def test_mean_std_table():
    table = mean_std_table([{"fold": 1, "accuracy": 0.5}, {"fold": 2, "accuracy": 0.7}], ["accuracy"])
    assert "| 2 | 0.7000 |" in table and "0.6000 ± 0.1414" in table  # sample std, ddof=1


def test_evaluate_fold_all_run_writes_every_output(trained_all, tmp_path):
    out = tmp_path / "eval"
    proc = run_script("testing.py", "--checkpoint", trained_all, "--out", out, "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr
    for k in range(1, 6):
        d = out / f"fold{k}"
        assert all((d / f).stat().st_size > 0 for f in ("metrics.json", "predictions.csv", "report.md",
                                                        "confusion.png", "roc.png"))
        m = json.loads((d / "metrics.json").read_text())
        rows = (d / "predictions.csv").read_text().strip().splitlines()
        assert len(rows) == m["n"] + 1 and rows[0].startswith("file,true,predicted,p_Chickenpox")
        assert m["split"] == "Test" and m["fold"] == k and m["gated"]["threshold"] == 0.3
    summary = (out / "summary.md").read_text()
    assert "mean ± std" in summary and summary.count("\n| ") >= 6
    assert (out / "confusion_pooled.png").stat().st_size > 0
    pooled = json.loads((out / "summary.json").read_text())["pooled_confusion"]
    assert np.sum(pooled) == sum(json.loads((out / f"fold{k}" / "metrics.json").read_text())["n"] for k in range(1, 6))


def test_testing_bad_input_is_one_line(tmp_path, trained_all):
    (tmp_path / "x.pt").write_text("not a checkpoint")
    assert_one_line_error(run_script("testing.py", "--checkpoint", tmp_path / "x.pt"), "not a PyTorch checkpoint")
    assert_one_line_error(run_script("testing.py", "--checkpoint", tmp_path / "nothing"), "no such")
    assert_one_line_error(run_script("testing.py", "--checkpoint", trained_all / "fold1" / "best.pt",
                                     "--data-root", tmp_path), "no MSLD v2.0 layout")
