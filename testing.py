"""Evaluate trained checkpoints on their fold's Test split: metrics, tables, plots.

    python testing.py --checkpoint runs/lenet-fold1/best.pt           # one fold
    python testing.py --checkpoint runs/lenet-all                     # every fold of a --fold all run
    python testing.py --checkpoint runs/x/best.pt --threshold 0.6     # confidence gating (Mpox-AISM)

Writes metrics.json, predictions.csv, report.md, confusion.png and roc.png to runs/NAME/test/
(or --out); for a 5-fold run also summary.md (mean ± std over folds) and the pooled confusion matrix.
"""
import argparse
import csv
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.calibration import CalibratedClassifierCV  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

from augment import to_input  # noqa: E402
from getData import (FOLDS, POSITIVE_CLASS, DataError, MSLDDataset, atomic_write, find_folds_root,  # noqa: E402
                     resize_size)
from models import (ModelError, autocast, build_model, load_checkpoint, load_classifier, select_device,  # noqa: E402
                    to_device)

DEFAULTS = dict(checkpoint=None, data_root=None, fold=None, split="Test", threshold=0.6, out=None,
                batch_size=64, device="auto", svm=False)
# SVM on deep features (Chaddad et al. 2025): C and kernel chosen on the Valid split.
SVM_GRID = [dict(kernel=k, C=c) for k in ("linear", "rbf") for c in (0.01, 0.1, 1.0, 10.0, 100.0)]
SUMMARY_KEYS = ["accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                "roc_auc_macro", "mpox_sensitivity", "mpox_specificity"]


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def run_batches(fn, images: torch.Tensor, size: int, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """fn(normalised batch) over cached uint8 images (N, 3, S', S') in batches; float32 results on CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size].to(device, non_blocking=True), size)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(fn(x).float().cpu())
    return torch.cat(out)


def predict(model, images, device, batch_size=64) -> torch.Tensor:
    """Class probabilities (N, C) of an eval-mode model on cached images."""
    return run_batches(lambda x: model(x).float().softmax(1), images, model.input_size, device, batch_size)


def embed(model, images, device, batch_size=64) -> torch.Tensor:
    """Pooled backbone features (N, F) on cached images."""
    return run_batches(model.features, images, model.input_size, device, batch_size)


def fit_svm(train_x, train_y, valid_x, valid_y):
    """Standardised features -> SVC; the (kernel, C) with the best Valid balanced accuracy wins.
    Returns (fitted pipeline with predict_proba, the chosen parameters and their Valid score)."""
    best = None
    for params in SVM_GRID:
        # Platt-style probabilities from held-out folds (what SVC(probability=True) did, now deprecated)
        clf = make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(**params), ensemble=False, cv=3))
        clf.fit(train_x, train_y)
        cm = confusion_matrix(valid_y, clf.predict(valid_x), int(max(train_y.max(), valid_y.max())) + 1)
        score = float(np.mean([cm[c, c] / cm[c].sum() for c in range(len(cm)) if cm[c].sum()]))
        if best is None or score > best[2]:
            best = (clf, params, score)
    return best[0], dict(best[1], valid_balanced_accuracy=best[2])


def svm_probabilities(classes: list, clf, x) -> np.ndarray:
    """predict_proba with a column for every class, also ones absent from the SVM's training set."""
    probs = np.zeros((len(x), len(classes)))
    probs[:, clf.classes_] = clf.predict_proba(x)
    return probs


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(np.asarray(y_true) * num_classes + np.asarray(y_pred),
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _ratio(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)  # 0 where undefined, like sklearn's zero_division=0


def classification_metrics(y_true, probs, classes, positive: str = POSITIVE_CLASS) -> dict:
    """Every figure we report, from the confusion matrix (macro = unweighted mean over all classes)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    n_cls = len(classes)
    cm = confusion_matrix(y_true, probs.argmax(1), n_cls)
    tp, support, predicted, total = np.diag(cm), cm.sum(1), cm.sum(0), cm.sum()
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    specificity = _ratio(total - support - predicted + tp, total - support)
    auc = np.array([roc_auc_score(y_true == c, probs[:, c]) if 0 < support[c] < total else np.nan
                    for c in range(n_cls)])
    m = dict(n=int(total), accuracy=float(tp.sum() / max(total, 1)),
             balanced_accuracy=float(recall[support > 0].mean()) if support.any() else 0.0,
             precision_macro=float(precision.mean()), recall_macro=float(recall.mean()), f1_macro=float(f1.mean()),
             precision_weighted=float(_ratio((precision * support).sum(), support.sum())),
             recall_weighted=float(_ratio((recall * support).sum(), support.sum())),
             f1_weighted=float(_ratio((f1 * support).sum(), support.sum())),
             roc_auc_macro=float(np.nanmean(auc)) if not np.isnan(auc).all() else float("nan"))
    if positive in classes:  # Mpox vs the rest: the clinical question
        p = classes.index(positive)
        m["mpox_sensitivity"] = float(recall[p])
        m["mpox_specificity"] = float(specificity[p])
    m["per_class"] = {c: dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                              specificity=float(specificity[i]), roc_auc=float(auc[i]), support=int(support[i]))
                      for i, c in enumerate(classes)}
    m["confusion"] = cm.tolist()
    return m


def gated_metrics(y_true, probs, classes, threshold: float) -> dict:
    """Confidence gating (Mpox-AISM): answer only when the top probability reaches `threshold`."""
    probs = np.asarray(probs)
    covered = probs.max(1) >= threshold
    out = dict(threshold=threshold, coverage=float(covered.mean()), n_covered=int(covered.sum()))
    if covered.any():
        covered_m = classification_metrics(np.asarray(y_true)[covered], probs[covered], classes)
        out.update({k: covered_m[k] for k in ("accuracy", "balanced_accuracy", "f1_macro")})
    return out


def mean_std_table(rows: list[dict], keys=SUMMARY_KEYS, label="fold") -> str:
    """Markdown table: one row per run plus mean ± std (sample std, ddof=1) over runs."""
    keys = [k for k in keys if all(k in r for r in rows)]
    lines = [f"| {label} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r[label]} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    stats = [(np.mean([r[k] for r in rows]), np.std([r[k] for r in rows], ddof=1) if len(rows) > 1 else 0.0)
             for k in keys]
    lines.append("| mean ± std | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in stats) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(m: dict) -> str:
    lines = ["| class | precision | recall | F1 | specificity | ROC-AUC | support |", "|---" * 7 + "|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['specificity']:.3f} "
                     f"| {v['roc_auc']:.3f} | {v['support']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def plot_confusion(cm, classes, path, title="") -> None:
    cm = np.asarray(cm)
    norm = _ratio(cm, cm.sum(1, keepdims=True))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, data, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised (recall)")):
        ax.imshow(data, cmap="Blues", vmin=0)
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
               title=f"{title} {name}".strip())
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, format(data[i, j], fmt), ha="center", va="center",
                        color="white" if data[i, j] > data.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_roc(y_true, probs, classes, path) -> None:
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    fig, ax = plt.subplots(figsize=(6, 6))
    for c, name in enumerate(classes):
        if 0 < (y_true == c).sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y_true == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# ----------------------------------------------------------------------------- evaluation
def predictions_csv(paths, y_true, probs, classes) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "true", "predicted", *[f"p_{c}" for c in classes]])
    for p, y, pr in zip(paths, y_true, probs):
        w.writerow([p, classes[y], classes[int(np.argmax(pr))], *[f"{v:.6f}" for v in pr]])
    return buf.getvalue()


def load_for_eval(checkpoint, svm: bool):
    """(model, checkpoint, has_head): a classifier, or (for --svm only) a SimCLR encoder."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("kind") != "encoder":
        return *load_classifier(checkpoint), True
    if not svm:
        raise ModelError(f"{checkpoint}: a SimCLR encoder has no classifier head; evaluate it with --svm "
                         "or fine-tune it with `train.py --init` first")
    model = build_model(ckpt["model"], len(ckpt["classes"]), init=str(checkpoint), input_size=ckpt["input_size"])
    return model.eval(), ckpt, False


def write_outputs(out: Path, m: dict, paths, y, probs, classes) -> None:
    atomic_write(out / "metrics.json", json.dumps(m, indent=2))
    atomic_write(out / "predictions.csv", predictions_csv(paths, y, probs, classes))
    atomic_write(out / "report.md", report_markdown(m))
    plot_confusion(m["confusion"], classes, out / "confusion.png", title=f"fold {m['fold']} {m['split']} {m['head']}")
    plot_roc(y, probs, classes, out / "roc.png")


def evaluate_checkpoint(checkpoint, out, data_root=None, fold=None, split="Test", threshold=0.6,
                        device=torch.device("cpu"), batch_size=64, svm=False) -> dict[str, dict]:
    """Evaluate one checkpoint on its fold's `split`: {"softmax": metrics, "svm": metrics} (heads asked for).
    Outputs go to `out` (softmax head) and `out/svm` (SVM on the pooled features)."""
    model, ckpt, has_head = load_for_eval(checkpoint, svm)
    model = to_device(model, device)
    data_root = data_root or ckpt["config"].get("data_root")
    fold = fold or ckpt.get("fold") or ckpt["config"].get("fold")
    if data_root is None or fold is None:
        raise DataError(f"{checkpoint}: records no dataset or fold; pass --data-root and --fold")
    root, size = find_folds_root(data_root), resize_size(model.input_size)
    ds = MSLDDataset(root, int(fold), split, cache_size=size)
    if ds.classes != ckpt["classes"]:
        raise DataError(f"{data_root}: classes {ds.classes} differ from the checkpoint's {ckpt['classes']}")
    heads = {}
    if has_head:
        heads["softmax"] = (predict(model, ds.images, device, batch_size).numpy(), {})
    if svm:  # features of every split computed once, in batches on the device
        train, valid = (MSLDDataset(root, int(fold), s, cache_size=size) for s in ("Train", "Valid"))
        feats = [embed(model, d.images, device, batch_size).numpy() for d in (train, valid, ds)]
        clf, choice = fit_svm(feats[0], train.targets.numpy(), feats[1], valid.targets.numpy())
        heads["svm"] = (svm_probabilities(ds.classes, clf, feats[2]), {"svm": choice})
    y, results = ds.targets.numpy(), {}
    for head, (probs, extra) in heads.items():
        m = classification_metrics(y, probs, ds.classes)
        m.update(fold=int(fold), split=split, checkpoint=str(checkpoint), model=ckpt["model"], head=head,
                 gated=gated_metrics(y, probs, ds.classes, threshold), **extra)
        write_outputs(Path(out) / ("svm" if head == "svm" else ""), m, ds.paths, y, probs, ds.classes)
        results[head] = m
    if len(results) > 1:
        atomic_write(Path(out) / "heads.md", heads_table({h: m for h, m in results.items()}))
    return results


def heads_table(by_head: dict[str, dict]) -> str:
    """The softmax head and the SVM side by side, one row per metric."""
    lines = ["| metric | " + " | ".join(by_head) + " |", "|---" * (len(by_head) + 1) + "|"]
    for k in SUMMARY_KEYS:
        if all(k in m for m in by_head.values()):
            lines.append(f"| {k} | " + " | ".join(f"{m[k]:.4f}" for m in by_head.values()) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(m: dict) -> str:
    g = m["gated"]
    gate = (f"Confidence gate {g['threshold']}: coverage {g['coverage']:.3f} ({g['n_covered']} of {m['n']})"
            + (f", accuracy on covered {g['accuracy']:.4f}, balanced accuracy {g['balanced_accuracy']:.4f}"
               if g["n_covered"] else ""))
    head = " | ".join(f"{k} {m[k]:.4f}" for k in SUMMARY_KEYS if k in m)
    return (f"# {m['model']} fold {m['fold']} {m['split']}, {m['head']} head (n={m['n']})\n\n{head}\n\n"
            f"{per_class_table(m)}\n"
            f"{gate}\n")


def fold_checkpoints(path: Path) -> dict[int, Path]:
    """best.pt of each foldK/ of a --fold all run directory."""
    found = {k: path / f"fold{k}" / "best.pt" for k in FOLDS if (path / f"fold{k}" / "best.pt").is_file()}
    if not found:
        raise ModelError(f"{path}: no best.pt here or in fold1..5/; train first with `python train.py`")
    return found


def evaluate(checkpoint, out=None, **kw) -> dict:
    """A checkpoint, a run directory holding best.pt, or a --fold all directory of foldK/ runs."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "best.pt").is_file():
        path = path / "best.pt"
    if path.is_file():
        return evaluate_checkpoint(path, Path(out or path.parent / "test"), **kw)
    if not path.exists():
        raise ModelError(f"{path}: no such checkpoint or run directory")
    out = Path(out or path / "test")
    kw.pop("fold", None)  # each fold's checkpoint knows its fold
    per_fold = {k: evaluate_checkpoint(ck, out / f"fold{k}", fold=k, **kw) for k, ck in fold_checkpoints(path).items()}
    summary = [f"# {path.name}: {len(per_fold)} folds, {kw.get('split', 'Test')} split\n"]
    means = {}
    for head in next(iter(per_fold.values())):
        folds = {k: r[head] for k, r in per_fold.items()}
        rows = [dict(fold=k, **{key: m[key] for key in SUMMARY_KEYS if key in m}) for k, m in folds.items()]
        gated = [dict(fold=k, coverage=m["gated"]["coverage"],
                      **{f"covered_{key}": m["gated"][key] for key in ("accuracy", "balanced_accuracy")
                         if key in m["gated"]}) for k, m in folds.items()]
        keys = [k for k in gated[0] if k != "fold" and all(k in g for g in gated)]
        summary += [f"## {head} head\n", mean_std_table(rows),
                    f"\nConfidence gate {kw.get('threshold', 0.6)}:\n", mean_std_table(gated, keys)]
        pooled = np.sum([m["confusion"] for m in folds.values()], axis=0)
        suffix = "" if head == "softmax" else f"_{head}"
        plot_confusion(pooled, list(next(iter(folds.values()))["per_class"]), out / f"confusion_pooled{suffix}.png",
                       title=f"{head}, pooled over folds")
        atomic_write(out / f"summary{suffix}.json",
                     json.dumps(dict(folds=rows, gated=gated, pooled_confusion=pooled.tolist()), indent=2))
        means[head] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if key != "fold"}
    if len(means) > 1:
        summary += ["## heads side by side (mean over folds)\n", heads_table(means)]
    atomic_write(out / "summary.md", "\n".join(summary))
    print("\n".join(summary))
    return per_fold


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="best.pt, or a run directory (--fold all runs too)")
    p.add_argument("--data-root", default=DEFAULTS["data_root"], help="default: the one the run trained on")
    p.add_argument("--fold", type=int, default=DEFAULTS["fold"], help="default: the checkpoint's fold")
    p.add_argument("--split", default=DEFAULTS["split"], choices=["Train", "Valid", "Test"])
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="confidence gate")
    p.add_argument("--out", default=DEFAULTS["out"], help="output folder (default: RUN/test)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--device", default=DEFAULTS["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--svm", action="store_true", help="also fit an SVM on the pooled features (C, kernel on Valid)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not 0 <= args.threshold <= 1:
            raise DataError(f"--threshold {args.threshold}: must be between 0 and 1")
        result = evaluate(args.checkpoint, args.out, data_root=args.data_root, fold=args.fold, split=args.split,
                          threshold=args.threshold, device=select_device(args.device), batch_size=args.batch_size,
                          svm=args.svm)
        if all(isinstance(v, dict) and "n" in v for v in result.values()):  # one checkpoint
            print("\n".join(report_markdown(m) for m in result.values()))
            if len(result) > 1:
                print(heads_table(result))
        return 0
    except (DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
