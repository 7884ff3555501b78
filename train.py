"""Train a lesion classifier on one fold or all five folds of MSLD v2.0.

    python train.py                                  # LeNet, fold 1 (the synthetic set if data/ has none)
    python train.py --model resnext101_64x4d --init imagenet --fold all --epochs 30 --lr 1e-4 --batch-size 32
    torchrun --nproc_per_node=4 train.py --model resnext101_64x4d --fold all     # DistributedDataParallel
    python train.py --resume --out runs/lenet-fold1  # continue a killed run (same arguments)
    python train.py --benchmark --model resnet18 --input-size 64                  # images/s table

The fast path: every image is decoded once into a uint8 tensor cache, moved to the device once, and
augmented there a batch at a time (augment.BatchAugment); the model runs in bf16 and channels_last on
CUDA (and on CPU with --precision bf16 --memory-format channels_last). Model selection sees only the
Valid split, which also fits the temperature stored in best.pt; the Test split is left to testing.py.
Writes runs/NAME/{config.json, history.csv, curves.png, last.pt, best.pt} (foldK/ each, for --fold all).
"""
import concurrent.futures
import contextlib
import copy
import errno
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from tqdm import tqdm

from augment import TRAIN_AUGMENTS, BatchAugment, apply_mix, draw_mix
from getData import (FOLDS, SEED, DataError, MSLDDataset, Number, Parser, atomic_write, list_classes, patient_id,
                     quiet_pillow, refuse_unused, resolve_data_root, resumable, run_main, spawned_deaf_to_ctrl_c,
                     stop_if_asked, to_json, too_long)
from models import (EMA, INPUT_SIZE, LEARNING_RATE, MEMORY_FORMATS, OPTIMIZERS, PRECISION_HELP, PRECISIONS, ModelError,
                    Runtime, SaveClock, batch_indices, build_model, check_resumable, checkpoint_dict, claim_run_dir,
                    derived_seed, distributed, epoch_generators, fit_temperature, init_file, is_current,
                    load_checkpoint, load_classifier, make_optimizer, mean_std_table, native_bf16, param_groups,
                    per_rank_batch, predict_logits, probabilities, reference_from_images, refuse_init_that_saw,
                    resize_size, resume, save_checkpoint, select_runtime, send, set_numerics, set_seed, shard,
                    training_state, unwrap, warmup_cosine, write_history)

DEFAULTS = dict(
    data_root="data", model="lenet", init="none", input_size=None, fold="1", epochs=60, batch_size=16, lr=2e-3,
    optimizer="adamw", weight_decay=0.05, decay_all=False, warmup_epochs=3, clip_grad=0.0, ema=0.0,
    label_smoothing=0.1, balance="none", exclude_class=None, augment="basic", mixup=0.0, cutmix=0.0, aug_dir=None,
    aug_device="auto", seed=0, device="auto", precision="auto", memory_format="auto", compile=None,
    deterministic=False, jobs=1, out=None, resume=False, overwrite=False, save_every=60.0, benchmark=False,
    peak_tflops=None,
    federated=None, clients=5, rounds=30, local_epochs=2, mu=0.01, partition="iid", alpha=0.5,
)
# Settings that may change when a run is resumed: where and how fast it runs, not what it learns.
RUNTIME_KEYS = {"resume", "overwrite", "out", "device", "aug_device", "compile", "deterministic", "jobs", "precision",
                "memory_format", "world_size", "backend", "data_root", "benchmark", "peak_tflops", "save_every"}
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_bal_acc",
                  "epoch_s", "train_images_per_s"]
CURVES = [("loss", ["train_loss", "valid_loss"]), ("accuracy", ["train_acc", "valid_acc", "valid_bal_acc"])]


# ----------------------------------------------------------------------------- data and loss
class FoldData:
    """The fold's Train and Valid images, decoded once and moved once: Train to the augmentation
    device, Valid to the training device. The labels stay on the CPU as well (`train_labels`, and
    Valid's), where the sampler, the sites and the metrics read them without waiting for a GPU."""

    def __init__(self, folds_root, fold: int, classes: list[str], input_size: int, rt: Runtime, aug_device,
                 aug_dirs=()):
        size = resize_size(input_size)
        train = MSLDDataset(folds_root, fold, "Train", cache_size=size, extra_dirs=aug_dirs, classes=classes)
        valid = MSLDDataset(folds_root, fold, "Valid", cache_size=size, classes=classes)
        self.classes, self.train_paths, self.train_labels = classes, train.paths, train.targets
        self.train_images, self.train_targets = train.images.to(aug_device), train.targets.to(aug_device)
        self.valid_images, self.valid_targets = valid.images.to(rt.device), valid.targets

    def __len__(self):
        return len(self.train_labels)


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled to mean 1 over the classes present."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


def balancing(balance: str, label_smoothing: float, data: FoldData, rt: Runtime):
    """(loss function, per-image sampling weights or None) for --balance none|loss|sampler."""
    weights = class_weights(data.train_labels, len(data.classes))  # sampling draws on the CPU
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(rt.device) if balance == "loss" else None,
                                  label_smoothing=label_smoothing)
    return loss_fn, weights[data.train_labels] if balance == "sampler" else None


# ----------------------------------------------------------------------------- the loop
@dataclass
class Step:
    """What one optimisation step uses; train_epoch runs it over an epoch's batches."""
    net: nn.Module  # the model as trained: maybe wrapped in DDP and/or torch.compile
    opt: torch.optim.Optimizer
    sched: object
    loss_fn: nn.Module
    aug: BatchAugment
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: float = 0.0
    ema: EMA | None = None
    extra_loss: object = None  # e.g. FedProx's proximal term: a callable returning a scalar
    cudagraphs: bool = False  # compiled with CUDA graphs: each step is a new replay
    bars: bool = True  # progress bars on a terminal (off when folds train side by side)


def step_inputs(step: Step, images: torch.Tensor, targets: torch.Tensor, num_classes: int, idx: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented, mixed batch of the cached Train images `idx` (CPU indices), and its targets, on
    the images' device. Every random number is drawn on the CPU generator `gen` first and sent with
    the indices in one copy (models.runtime.send): nothing here waits for the device."""
    views = step.aug.draw(gen, (len(idx), *images.shape[1:]))
    mix = draw_mix(gen, len(idx), step.aug.size, step.aug.size, step.mixup, step.cutmix)  # drawn after the views
    sent = send(dict(idx=idx, views=views, mix=mix), images.device)
    x = step.aug.apply(images[sent["idx"]], sent["views"])
    return apply_mix(x, targets[sent["idx"]], num_classes, sent["mix"])


def optimise(step: Step, x: torch.Tensor, target: torch.Tensor, rt: Runtime, total: torch.Tensor) -> None:
    """Forward, backward, clipping, optimizer, schedule and weight average for one batch; the loss sum,
    correct answers and count are added to `total` on the device (no sync per step)."""
    if step.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    target = target.to(rt.device, non_blocking=True)
    logits = rt.forward(step.net, x)
    loss = step.loss_fn(logits, target) + (step.extra_loss() if step.extra_loss else 0)
    step.opt.zero_grad(set_to_none=True)
    loss.backward()
    if step.clip_grad:
        nn.utils.clip_grad_norm_(step.net.parameters(), step.clip_grad)
    step.opt.step()
    if step.sched is not None:
        step.sched.step()
    if step.ema is not None:
        step.ema.update(step.net)
    labels = target if target.ndim == 1 else target.argmax(1)  # mixed targets: the larger share
    total[0] += loss.detach() * len(labels)
    total[1] += (logits.argmax(1) == labels).sum()
    total[2] += len(labels)


def train_epoch(step: Step, data: FoldData, rt: Runtime, key: tuple, batch_size: int, indices=None,
                sample_weights=None) -> dict:
    """One pass over the Train images (or the subset `indices`, e.g. one federated site). `key` names
    this pass's random streams, e.g. (seed, epoch). Returns loss, accuracy and images/s."""
    step.net.train()
    pool = indices if indices is not None else torch.arange(len(data))
    order_gen, aug_gen = epoch_generators(key, rt.rank)  # the order is the same on every rank, views are not
    weights = sample_weights[pool] if sample_weights is not None else None
    batches = list(batch_indices(len(pool), batch_size, order_gen, weights))
    total = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss sum, correct, count
    quiet = rt.rank != 0 or indices is not None or not step.bars  # other ranks, federated sites and folds
    # trained side by side draw no bar; the rest draw one on a terminal only (disable=None), so logs carry none
    start = time.perf_counter()
    for idx in tqdm(batches, desc=f"epoch {key[1] + 1}", leave=False, disable=True if quiet else None):
        stop_if_asked()
        x, target = step_inputs(step, data.train_images, data.train_targets, len(data.classes), shard(pool[idx], rt),
                                aug_gen)
        optimise(step, x, target, rt, total)
    if rt.world > 1:
        dist.all_reduce(total)
    loss_sum, correct, n = total.tolist()
    n = max(n, 1)
    return dict(train_loss=loss_sum / n, train_acc=correct / n, train_images_per_s=n / (time.perf_counter() - start))


def balanced_accuracy(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean recall over the classes present in y: scikit-learn's balanced_accuracy_score, the same
    float64 arithmetic (a classifier's checkpoint is chosen on it), without scikit-learn's 1 s import
    in every process train.py starts."""
    k = int(max(y.max(), pred.max())) + 1
    cm = np.bincount(y.numpy() * k + pred.numpy(), minlength=k * k).reshape(k, k)
    with np.errstate(invalid="ignore"):
        recall = np.diag(cm) / cm.sum(1)
    return float(np.mean(recall[~np.isnan(recall)]))


def validate(model, data: FoldData, rt: Runtime) -> tuple[dict, torch.Tensor]:
    """Valid loss, accuracy and balanced accuracy (the classes are imbalanced); and the logits (for
    the temperature)."""
    unwrap(model).eval()
    logits = predict_logits(unwrap(model), data.valid_images, rt)
    probs, y = probabilities(logits), data.valid_targets
    pred = probs.argmax(1)
    return dict(valid_loss=F.nll_loss(probs.clamp_min(1e-12).log(), y).item(),
                valid_acc=(pred == y).double().mean().item(),
                valid_bal_acc=balanced_accuracy(y, pred)), logits


def is_better(new: dict, best: dict | None) -> bool:
    """Valid balanced accuracy, ties broken by lower valid loss."""
    return best is None or (new["valid_bal_acc"], -new["valid_loss"]) > (best["valid_bal_acc"], -best["valid_loss"])


class FoldRun:
    """One fold's run directory, written by rank 0: config.json, history.csv + curves.png, best.pt
    (the best Valid epoch, with the temperature fitted on Valid, and the out-of-distribution reference
    once the run stops), last.pt (everything --resume needs).
    best.pt is written whenever Valid improves; last.pt, history and curves at most every
    --save-every seconds and after the last epoch: a killed run loses at most that much."""

    def __init__(self, out: Path, config: dict, data: FoldData, rt: Runtime, unit: str = "epoch"):
        self.out, self.config, self.data, self.rt, self.unit = out, config, data, rt, unit
        self.history, self.best = [], None
        self.total = config["rounds" if unit == "round" else "epochs"]
        self.clock = SaveClock(config["save_every"])

    def start(self, want_resume: bool, model, opt=None, sched=None, **modules) -> int:
        """The epoch to start from: after last.pt's when resuming (every rank restores), else 0."""
        fold, last = self.config["fold"], self.out / "last.pt"
        if want_resume and last.is_file():
            ckpt = resume(last, self.config, RUNTIME_KEYS, DEFAULTS, model, opt, sched, **modules)
            self.history, self.best = ckpt["history"], ckpt["best"]
            if self.rt.rank == 0:
                print(f"fold {fold}: resuming after {self.unit} {ckpt['epoch']} from {last}")
            return ckpt["epoch"]
        if self.rt.rank == 0:
            if want_resume:
                print(f"fold {fold}: no {last} to resume from: starting it")
            atomic_write(self.out / "config.json", to_json(self.config, indent=2))
        return 0

    def end(self, row: dict, model, evaluated, started: float, opt=None, sched=None, **modules) -> None:
        """After each epoch (rank 0): validate `evaluated` (the model or its EMA), save, report."""
        if self.rt.rank != 0:
            return
        metrics, logits = validate(evaluated, self.data, self.rt)
        self.stop_if_diverged(row["epoch"], metrics["valid_loss"])
        row.update(metrics, epoch_s=time.perf_counter() - started)
        self.history.append(row)
        classes, config = self.data.classes, self.config
        if is_better(row, self.best):
            self.best = row
            save_checkpoint(checkpoint_dict(evaluated, "classifier", classes, config, row["epoch"], row,
                                            temperature=fit_temperature(logits, self.data.valid_targets)),
                            self.out / "best.pt")
        if self.clock.due(final=row["epoch"] == self.total):
            save_checkpoint(checkpoint_dict(model, "classifier", classes, config, row["epoch"], row,
                                            **training_state(opt, sched, self.history, self.best, **modules)),
                            self.out / "last.pt")
            write_history(self.history, HISTORY_FIELDS, self.out, CURVES)
        print(f"fold {config['fold']} {self.unit} {row['epoch']}/{self.total}: "
              f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | valid loss {row['valid_loss']:.4f} "
              f"acc {row['valid_acc']:.3f} bal {row['valid_bal_acc']:.3f} | {row['train_images_per_s']:.0f} img/s")

    def add_ood_reference(self) -> None:
        """best.pt's out-of-distribution reference (models/ood.py), fitted from its weights once the run
        stops: fitting it whenever Valid improves (about 40 times in the recipe's run) would embed every
        Train image each time, 5-8% of a CPU run. A run killed before this point leaves best.pt without
        one: --resume adds it, and testing.py and serve.py compute it meanwhile."""
        path = self.out / "best.pt"
        if self.rt.rank != 0 or not path.is_file():
            return
        best, ckpt = load_classifier(path, self.rt)
        if not is_current(ckpt.get("ood"), best):
            ckpt["ood"] = reference_from_images(best, self.data.train_images, self.data.train_labels,
                                                self.data.valid_images, ckpt["temperature"], self.rt)
            save_checkpoint(ckpt, path)

    def stop_if_diverged(self, epoch: int, loss: float) -> None:
        """A loss that is not finite ends the run with one line (last.pt stays as it was; best.pt, the
        last good epoch, gets its out-of-distribution reference): the optimizer cannot come back from
        NaN weights, and the temperature cannot be fitted."""
        if math.isfinite(loss):
            return
        kept = f"{self.out / 'best.pt'} keeps {self.unit} {self.best['epoch']}" if self.best else "no best.pt written"
        self.add_ood_reference()
        raise DataError(f"fold {self.config['fold']} {self.unit} {epoch}: the loss is {loss}, the run diverged "
                        f"({kept}); train again with --overwrite and a lower --lr (now {self.config['lr']}) or "
                        "--clip-grad 1.0")

    def summary(self) -> dict:
        """The best epoch's Valid metrics, once best.pt holds its out-of-distribution reference."""
        self.add_ood_reference()
        if self.rt.world > 1:
            dist.barrier()
        best = self.best or {}
        return dict(fold=self.config["fold"], best_epoch=best.get("epoch"),
                    **{k: v for k, v in best.items() if k.startswith("valid")})


def training_classes(folds_root: Path, exclude: str | None) -> list[str]:
    """The classes a run learns: all of the dataset's, or all but --exclude-class (whose photos
    testing.py then scores as near out-of-distribution: a condition the network never saw)."""
    classes = list_classes(folds_root)
    if exclude is None:
        return classes
    if exclude not in classes:
        raise DataError(f"--exclude-class {exclude}: not a class of {folds_root}; choose one of {', '.join(classes)}")
    return [c for c in classes if c != exclude]


def setup_fold(cfg: dict, fold: int, folds_root: Path, out: Path, rt: Runtime, unit="epoch"):
    """The seeded model on its device, the fold's decoded images, and its run directory."""
    set_seed(cfg["seed"])
    classes = training_classes(folds_root, cfg["exclude_class"])
    refuse_init_that_saw(cfg["init"], folds_root, fold, classes)
    model = rt.module(build_model(cfg["model"], len(classes), cfg["init"], cfg["input_size"]))
    aug_device = rt.device if cfg["aug_device"] == "auto" else torch.device(cfg["aug_device"])
    data = FoldData(folds_root, fold, classes, model.input_size, rt, aug_device, cfg["aug_dir"] or ())
    config = dict(cfg, fold=fold, data_root=str(folds_root), classes=data.classes, train_images=len(data))
    return model, data, FoldRun(out, config, data, rt, unit)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's; the last two use CUDA graphs


def compiled(net: nn.Module, mode: str | None) -> nn.Module:
    """The network as trained: torch.compile'd in `mode` (None: eager). A GPU is launch-bound at this
    dataset's batch sizes (ResNet-18 at 112 px, batch 32: about 1,100 small kernels a step); CUDA
    graphs ('reduce-overhead', 'max-autotune') replay a whole forward and backward as one launch."""
    return torch.compile(net, mode=mode) if mode else net


def uses_cudagraphs(mode: str | None, rt: Runtime) -> bool:
    return rt.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def train_fold(cfg: dict, fold: int, folds_root: Path, out: Path, rt: Runtime) -> dict:
    """Train one fold into `out`; returns the best epoch's Valid metrics."""
    model, data, run = setup_fold(cfg, fold, folds_root, out, rt)
    batch = per_rank_batch(cfg["batch_size"], rt.world) * rt.world
    steps = len(data) // batch
    if steps == 0:
        raise DataError(f"fold {fold}: {len(data)} Train images, fewer than --batch-size {batch}; lower --batch-size")
    opt = make_optimizer(cfg["optimizer"], param_groups(model, cfg["weight_decay"], cfg["decay_all"]), cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg["epochs"] * steps, cfg["warmup_epochs"] * steps))
    ema = EMA(model, cfg["ema"]) if cfg["ema"] else None
    kept = {"ema": ema} if ema else {}
    start = run.start(cfg["resume"], model, opt, sched, **kept)
    loss_fn, sample_weights = balancing(cfg["balance"], cfg["label_smoothing"], data, rt)
    step = Step(compiled(rt.wrap(model), cfg["compile"]), opt, sched, loss_fn,
                BatchAugment(model.input_size, TRAIN_AUGMENTS[cfg["augment"]]), cfg["mixup"], cfg["cutmix"],
                cfg["clip_grad"], ema, cudagraphs=uses_cudagraphs(cfg["compile"], rt), bars=cfg["jobs"] == 1)
    for epoch in range(start, cfg["epochs"]):
        started = time.perf_counter()
        row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"])
        row.update(train_epoch(step, data, rt, (cfg["seed"], epoch), batch, sample_weights=sample_weights))
        run.stop_if_diverged(epoch + 1, row["train_loss"])  # the loss is all-reduced: every rank stops together
        run.end(row, model, ema.module if ema else model, started, opt, sched, **kept)
    return run.summary()


# ----------------------------------------------------------------------------- federated simulation
def split_sites(paths, targets: torch.Tensor, clients: int, partition: str, alpha: float,
                seed: int) -> list[torch.Tensor]:
    """Train indices per simulated site, whole patients only.

    iid: patients dealt out at random. dirichlet: per class, site shares drawn from Dir(alpha)
    (Hsu et al. 2019): small alpha gives sites few classes each, as hospitals with different case mixes.
    """
    patients: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        patients.setdefault(patient_id(p) or str(p), []).append(i)
    if clients > len(patients):
        raise DataError(f"--clients {clients}: the fold's Train split has only {len(patients)} patients")
    rng = np.random.default_rng(derived_seed(seed, clients))
    names = sorted(patients)
    sites: list[list[int]] = [[] for _ in range(clients)]
    if partition == "iid":
        for j, k in enumerate(rng.permutation(len(names))):
            sites[j % clients] += patients[names[k]]
    else:
        by_class: dict[int, list[str]] = {}
        for name in names:
            by_class.setdefault(int(targets[patients[name][0]]), []).append(name)
        for group in by_class.values():
            group = [group[k] for k in rng.permutation(len(group))]
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(group)).round().astype(int)[:-1]
            for site, chunk in enumerate(np.split(np.arange(len(group)), cuts)):
                for k in chunk:
                    sites[site] += patients[group[k]]
    return [torch.tensor(sorted(s), dtype=torch.long) for s in sites]


def average_states(states: list[dict], weights) -> dict:
    """Sample-weighted average of whole state_dicts: parameters and buffers (BatchNorm statistics too)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for k, ref in states[0].items():
        mean = sum(wi * s[k].double() for wi, s in zip(w, states))
        out[k] = (mean.round() if not ref.is_floating_point() else mean).to(ref.dtype)
    return out


def federated_round(model, data: FoldData, sites, loss_fn, aug, rt: Runtime, key: tuple, lr: float, *,
                    optimizer: str, weight_decay: float, decay_all: bool, local_epochs: int, batch_size: int,
                    mu: float, mixup=0.0, cutmix=0.0, clip_grad=0.0, sample_weights=None) -> dict:
    """FedAvg / FedProx (McMahan et al. 2017; Li et al. 2020): every site trains a copy of the global
    model for `local_epochs` on its own images; the copies are averaged, weighted by site size.
    With mu > 0 (FedProx) each local loss adds (mu/2)||w - w_global||^2, keeping sites near the
    global model."""
    start = time.perf_counter()
    global_state = copy.deepcopy(model.state_dict())
    anchor = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    prox = (lambda: mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))) if mu else None
    states, sizes, totals = [], [], torch.zeros(3, dtype=torch.float64)
    for site, idx in enumerate(sites):
        if len(idx) < batch_size:
            continue  # a site too small for one batch sits this round out
        model.load_state_dict(global_state)
        opt = make_optimizer(optimizer, param_groups(model, weight_decay, decay_all), lr)
        step = Step(model, opt, None, loss_fn, aug, mixup, cutmix, clip_grad, extra_loss=prox)
        for e in range(local_epochs):
            r = train_epoch(step, data, rt, (*key, site + 1, e + 1), batch_size, indices=idx,
                            sample_weights=sample_weights)
            n = len(idx) // batch_size * batch_size
            totals += torch.tensor([r["train_loss"] * n, r["train_acc"] * n, n], dtype=torch.float64)
        states.append(copy.deepcopy(model.state_dict()))
        sizes.append(len(idx))
    model.load_state_dict(average_states(states, sizes))
    n = max(totals[2].item(), 1)
    return dict(train_loss=totals[0].item() / n, train_acc=totals[1].item() / n,
                train_images_per_s=n / (time.perf_counter() - start))


def train_fold_federated(cfg: dict, fold: int, folds_root: Path, out: Path, rt: Runtime) -> dict:
    """The federated simulation of one fold: sites trained one after another in this process; the
    global model is validated and saved after every round like an epoch of central training."""
    model, data, run = setup_fold(cfg, fold, folds_root, out, rt, unit="round")
    sites = split_sites(data.train_paths, data.train_labels, cfg["clients"], cfg["partition"], cfg["alpha"],
                        cfg["seed"])
    run.config["site_sizes"] = [len(s) for s in sites]
    start = run.start(cfg["resume"], model)  # sites build their own optimizers each round
    loss_fn, sample_weights = balancing(cfg["balance"], cfg["label_smoothing"], data, rt)
    aug = BatchAugment(model.input_size, TRAIN_AUGMENTS[cfg["augment"]])
    local = {k: cfg[k] for k in ("optimizer", "weight_decay", "decay_all", "local_epochs", "batch_size", "mixup",
                                 "cutmix", "clip_grad")}
    mu = cfg["mu"] if cfg["federated"] == "fedprox" else 0.0
    for rnd in range(start, cfg["rounds"]):
        started = time.perf_counter()
        lr = cfg["lr"] * warmup_cosine(cfg["rounds"], 0)(rnd)  # a cosine over rounds
        row = dict(epoch=rnd + 1, lr=lr)
        row.update(federated_round(model, data, sites, loss_fn, aug, rt, (cfg["seed"], rnd), lr, mu=mu,
                                   sample_weights=sample_weights, **local))
        run.stop_if_diverged(rnd + 1, row["train_loss"])
        run.end(row, model, model, started)
    return run.summary()


# ----------------------------------------------------------------------------- benchmark
# Dense (no sparsity) bf16 tensor-core peaks in TFLOPS, from NVIDIA's data sheets. The first pattern
# found in the device name as whole words wins: "L4" is not "L40", "A10" is not "A100" or "A10G".
BF16_PEAK_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0)]


def known_peak(device_name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS if re.search(rf"\b{k}\b", device_name)), None)


def peak_tflops(rt: Runtime, given: float | None) -> float | None:
    if given:
        return given
    return known_peak(torch.cuda.get_device_name(rt.device)) if rt.device.type == "cuda" else None


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward costs its forward once per gradient it computes (input, weight),
    grouped or not. torch.utils.flop_counter counts a grouped convolution's weight gradient as if it
    were dense: Conv2d(256, 256, 3, groups=64)'s backward as 65 times its forward, not 2, so
    ResNeXt's share of peak printed 2.3 times too high (depthwise networks: worse)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of the forward and backward of cross_entropy(model(x), y) (convolutions and matrix
    products; with conv_backward_flops for convolutions)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as c:
        F.cross_entropy(model(x), y).backward()
    return c.get_total_flops()


def training_flops(name: str, classes: int, input_size: int | None, batch: int) -> float:
    """FLOPs per image of one training step, counted on the network built on the meta device: shapes
    only, no memory, no time, and never through torch.compile."""
    with torch.device("meta"):
        model = build_model(name, classes, input_size=input_size)
        x = torch.zeros(batch, 3, model.input_size, model.input_size)
        return step_flops(model, x, torch.zeros(batch, dtype=torch.long)) / batch


BENCHMARK_SECONDS = 2.0  # timed per measurement, after the warm-up


def _images_per_s(fn, batch: int, rt: Runtime) -> float:
    """Steps of `fn` for at least BENCHMARK_SECONDS after three warm-up steps (compilation, autotuning)."""
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < 5 or time.perf_counter() - start < BENCHMARK_SECONDS:
        fn()
        steps += 1
    sync()
    return steps * batch / (time.perf_counter() - start)


def benchmark_row(cfg: dict, rt: Runtime, classes: int = 6) -> dict:
    """images/s of the bare step (the model step of cfg's flags on tensors already made), the full
    training step (uint8 cache on the device -> augmentation and mixing -> the same model step) and
    inference, for one precision/layout/compile setting; and the training step's FLOPs per image."""
    set_seed(0)
    model = rt.module(build_model(cfg["model"], classes, input_size=cfg["input_size"]))
    size, batch = model.input_size, cfg["batch_size"]
    step = Step(compiled(model, cfg["compile"]), make_optimizer("adamw", param_groups(model, 0.05), 1e-4), None,
                nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"]),
                BatchAugment(size, TRAIN_AUGMENTS[cfg["augment"]]), cfg["mixup"], cfg["cutmix"], cfg["clip_grad"],
                EMA(model, cfg["ema"]) if cfg["ema"] else None, cudagraphs=uses_cudagraphs(cfg["compile"], rt))
    x, y = torch.randn(batch, 3, size, size, device=rt.device), torch.randint(classes, (batch,), device=rt.device)
    side = resize_size(size)
    cache = torch.randint(256, (4 * batch, 3, side, side), dtype=torch.uint8, device=rt.device)
    cache_y = torch.randint(classes, (len(cache),), device=rt.device)
    gen, total = torch.Generator().manual_seed(0), torch.zeros(3, dtype=torch.float64, device=rt.device)

    def full_step():
        idx = torch.randint(len(cache), (batch,), generator=gen)
        optimise(step, *step_inputs(step, cache, cache_y, classes, idx, gen), rt, total)

    def infer():
        with torch.no_grad():
            rt.forward(step.net, x)
    model.train()
    bare, full = _images_per_s(lambda: optimise(step, x, y, rt, total), batch, rt), _images_per_s(full_step, batch, rt)
    model.eval()
    inference = _images_per_s(infer, batch, rt)
    return dict(bare=bare, full=full, inference=inference,
                flops=training_flops(cfg["model"], classes, cfg["input_size"], batch))


def benchmark(cfg: dict, rt: Runtime) -> list[dict]:
    """Every precision x memory format (x compile, with --compile) on this device: a table."""
    peak = peak_tflops(rt, cfg["peak_tflops"])
    rows = []
    for precision in ("fp32", "bf16"):
        for layout in ("contiguous", "channels_last"):
            for mode in ((None, cfg["compile"]) if cfg["compile"] else (None,)):
                set_numerics(precision == "bf16", cfg["deterministic"])
                here = Runtime(rt.device, bf16=precision == "bf16", channels_last=layout == "channels_last")
                r = benchmark_row(dict(cfg, compile=mode), here)
                r.update(precision=precision, layout=layout, compile=mode or "no",
                         peak_share=r["full"] * r["flops"] / 1e12 / peak if peak else None)
                rows.append(r)
                print(f"  {precision} {layout}{' ' + mode if mode else ''}: training step {r['full']:.0f} img/s",
                      flush=True)
    print(benchmark_table(cfg, rt, peak, rows))
    return rows


def benchmark_table(cfg: dict, rt: Runtime, peak: float | None, rows: list[dict]) -> str:
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    name += "" if native_bf16(rt.device) else " (no bf16 units: its bf16 rows are emulated)"
    size = f"{cfg['input_size']}x{cfg['input_size']}" if cfg["input_size"] else "its native size"
    flags = " ".join(f"--{k.replace('_', '-')} {cfg[k]}" for k in ("augment", "mixup", "cutmix", "ema", "clip_grad")
                     if cfg[k] != DEFAULTS[k])
    lines = [f"\n{cfg['model']} at {size}, batch {cfg['batch_size']}{', ' + flags if flags else ''}, on {name}; "
             f"images/s (bf16 peak {peak or 'unknown: pass --peak-tflops'} TFLOPS)",
             f"{'precision':<10}{'layout':<15}{'compile':<17}{'bare step':>10}{'full step':>10}{'full/bare':>10}"
             f"{'inference':>10}{'GFLOP/img':>10}{'of peak':>9}"]
    for r in rows:
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else "-"
        lines.append(f"{r['precision']:<10}{r['layout']:<15}{r['compile']:<17}{r['bare']:>10.0f}{r['full']:>10.0f}"
                     f"{r['full'] / r['bare']:>10.2f}{r['inference']:>10.0f}{r['flops'] / 1e9:>10.2f}{share:>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_fold(spec: str) -> list[int]:
    if spec == "all":
        return list(FOLDS)
    if not spec.isdigit() or int(spec) not in FOLDS:
        raise DataError(f"--fold {spec}: MSLD v2.0 has folds 1..5 (or use --fold all)")
    return [int(spec)]


def parse_args(argv=None):
    d, positive, at_least_1, at_least_0 = DEFAULTS, Number(float, 0, open_low=True), Number(int, 1), Number(float, 0)
    p = Parser(__doc__, __file__)
    p.add_argument("--data-root", default=d["data_root"], help="MSLD v2.0 folder (synthetic set if data/ has none)")
    p.add_argument("--model", default=d["model"], help="lenet, resnext101_64x4d, resnet18, ... (any torchvision)")
    p.add_argument("--init", default=d["init"], help="none, imagenet, or a .pt (SimCLR encoder.pt, best.pt) "
                   "or the run directory that holds it")
    p.add_argument("--input-size", type=INPUT_SIZE, default=d["input_size"], help="override the model's input size "
                   "(convolutional networks only; e.g. 112 for a quick CPU run)")
    p.add_argument("--fold", default=d["fold"], help="1..5 or all")
    p.add_argument("--epochs", type=at_least_1, default=d["epochs"])
    p.add_argument("--batch-size", type=at_least_1, default=d["batch_size"], help="global batch, split over ranks")
    p.add_argument("--lr", type=LEARNING_RATE, default=d["lr"])
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    o.add_argument("--weight-decay", type=at_least_0, default=d["weight_decay"],
                   help="on weights; none on norms and biases")
    o.add_argument("--decay-all", action="store_true", help="weight decay on norms and biases too")
    o.add_argument("--warmup-epochs", type=Number(int, 0), default=d["warmup_epochs"],
                   help="linear warm-up, then cosine")
    o.add_argument("--clip-grad", type=at_least_0, default=d["clip_grad"], help="clip the gradient norm (0: off)")
    o.add_argument("--ema", type=Number(float, 0, 1, open_high=True), default=d["ema"],
                   help="evaluate and keep an EMA of the weights with this decay per step, e.g. 0.998 (0: off)")
    o.add_argument("--label-smoothing", type=Number(float, 0, 1, open_high=True), default=d["label_smoothing"])
    o.add_argument("--balance", default=d["balance"], choices=["none", "loss", "sampler"],
                   help="class-balanced loss weights or sampler (Mpox is 38%% of images, Measles 7%%)")
    o.add_argument("--exclude-class", default=d["exclude_class"], metavar="NAME", help="train without this class "
                   "(its Train and Valid images left out): testing.py scores its photos as near-OOD")
    a = p.add_argument_group("augmentation")
    a.add_argument("--augment", default=d["augment"], choices=list(TRAIN_AUGMENTS),
                   help="basic: crop, flips, mild colour jitter; trivial: crop, flips, one TrivialAugment op; none")
    a.add_argument("--mixup", type=at_least_0, default=d["mixup"], help="MixUp Beta(alpha, alpha), e.g. 0.2 (0: off)")
    a.add_argument("--cutmix", type=at_least_0, default=d["cutmix"],
                   help="CutMix Beta(alpha, alpha), e.g. 1.0 (0: off)")
    a.add_argument("--aug-dir", action="append", default=d["aug_dir"], help="augment.py output to add to Train")
    a.add_argument("--aug-device", default=d["aug_device"], choices=["auto", "cpu", "cuda"],
                   help="where batches are augmented (auto: the training device)")
    r = p.add_argument_group("where and how it runs")
    r.add_argument("--seed", type=SEED, default=d["seed"])
    r.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    r.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help=PRECISION_HELP)
    r.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS,
                   help="auto: channels_last on CUDA, contiguous on CPU")
    r.add_argument("--compile", nargs="?", const="default", default=d["compile"], choices=COMPILE_MODES,
                   metavar="MODE", help="torch.compile the model (off unless given); MODE default (if omitted), "
                   "reduce-overhead or max-autotune: with CUDA graphs, one launch per step on a GPU")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels on CUDA: a run repeats (and --resume continues) bit for bit; slower")
    r.add_argument("--jobs", type=at_least_1, default=d["jobs"], help="with --fold all: train this many folds at "
                   "once, each in its own process (fills a GPU that one fold leaves idle)")
    r.add_argument("--out", default=d["out"], help="run directory (default runs/MODEL-foldK)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    r.add_argument("--overwrite", action="store_true", help="replace the run in OUT (without it, a finished or "
                   "killed run there is never overwritten)")
    r.add_argument("--save-every", type=at_least_0, default=d["save_every"], metavar="SECONDS",
                   help="write last.pt, history and curves at most this often, and at the end (0: every epoch)")
    r.add_argument("--benchmark", action="store_true", help="print images/s of --model at --input-size instead")
    r.add_argument("--peak-tflops", type=positive, default=d["peak_tflops"], help="benchmark: the device's bf16 peak")
    f = p.add_argument_group("federated simulation (sites trained one after another, in this process)")
    f.add_argument("--federated", default=d["federated"], choices=["fedavg", "fedprox"])
    f.add_argument("--clients", type=at_least_1, default=d["clients"], help="simulated sites")
    f.add_argument("--rounds", type=at_least_1, default=d["rounds"], help="communication rounds (replace --epochs)")
    f.add_argument("--local-epochs", type=at_least_1, default=d["local_epochs"], help="epochs per site per round")
    f.add_argument("--mu", type=at_least_0, default=d["mu"], help="FedProx proximal weight")
    f.add_argument("--partition", default=d["partition"], choices=["iid", "dirichlet"], help="patients to sites")
    f.add_argument("--alpha", type=positive, default=d["alpha"], help="Dirichlet concentration (smaller: less IID)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """What one flag's range cannot say (each number is checked by its Number as it is parsed)."""
    if args.aug_device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--aug-device cuda: no CUDA device is available")
    if args.aug_device == "cuda" and args.device == "cpu":
        raise ModelError("--aug-device cuda with --device cpu: augment where the model trains (--aug-device auto) "
                         "or train on the GPU (--device cuda)")
    if args.jobs > 1 and (args.fold != "all" or "RANK" in os.environ):
        raise DataError(f"--jobs {args.jobs}: trains the folds of --fold all side by side, in one process each "
                        "(not under torchrun)")
    if args.resume and args.overwrite:
        raise DataError("--resume and --overwrite: continue the run in --out, or replace it, not both")
    if args.federated and "RANK" in os.environ:
        raise DataError("--federated simulates every site in one process: run it without torchrun")
    for names, unused, why in (  # a flag the run would not use: each was ignored without a word
            (["clients", "rounds", "local_epochs", "mu", "partition", "alpha"], not args.federated,
             "sets up a --federated run; add --federated fedavg or fedprox, or leave it out"),
            (["epochs", "warmup_epochs", "ema", "compile"], args.federated,
             "is not used by --federated runs (a cosine over --rounds, --local-epochs per site); leave it out"),
            (["mu"], args.federated == "fedavg", "is FedProx's: use it with --federated fedprox"),
            (["alpha"], args.partition == "iid", "shapes --partition dirichlet: use it with that"),
            (["peak_tflops"], not args.benchmark, "is the benchmark's: use it with --benchmark")):
        if unused:
            refuse_unused(args, DEFAULTS, names, why)


def run(args) -> list[dict]:
    check_args(args)
    folds = parse_fold(args.fold)
    with distributed(args.device, args.precision, args.memory_format, args.deterministic) as rt, \
            contextlib.ExitStack() as held:
        # ResNet18 is resnet18, in config.json too: resumed with either spelling, the flag is the same
        cfg = dict(vars(args), model=args.model.lower(), world_size=rt.world, backend=rt.backend)
        if args.benchmark:
            return benchmark(cfg, rt)
        folds_root, cfg["init"] = rt.from_rank0(lambda: (resolve_data_root(args.data_root), init_file(args.init)))
        cfg["out"] = args.out or f"runs/{cfg['model']}-{'all' if args.fold == 'all' else 'fold' + args.fold}"
        outs = {k: Path(cfg["out"]) / (f"fold{k}" if args.fold == "all" else "") for k in folds}
        rt.from_rank0(lambda: claim_runs(cfg, outs, held))  # every rank stops on rank 0's refusal
        with resumable(cfg["out"]):
            if args.jobs > 1:
                results = train_side_by_side(cfg, folds_root, outs, args.jobs)
            else:
                results = [fit_fold(cfg, k, folds_root, outs[k], rt) for k in folds]
        if rt.rank == 0 and args.fold == "all":
            table = mean_std_table(results, ["valid_acc", "valid_bal_acc", "valid_loss", "best_epoch"])
            atomic_write(Path(cfg["out"]) / "summary.md",
                         f"# {cfg['model']}: best epoch per fold (Valid split; Test: run testing.py)\n\n{table}")
            print(table)
        if rt.rank == 0:
            print(closing_line(cfg["out"], args.fold == "all"))
        return results


def closing_line(out, every_fold: bool) -> str:
    """Where the run is, and the command that evaluates it on the Test split."""
    files = "summary.md and fold1..5/" if every_fold else "best.pt, last.pt, history.csv and curves.png"
    return f"wrote {files} to {out}/; evaluate on Test: python testing.py --checkpoint {shlex.quote(str(out))}"


def claim_runs(cfg: dict, outs: dict[int, Path], held: contextlib.ExitStack) -> None:
    """On rank 0: lock the run directory (and each fold's) for this run and refuse to replace a finished
    run unasked (models.rundir.claim_run_dir); refuse --resume of a run of the other kind."""
    root = Path(cfg["out"])
    try:
        if cfg["resume"] and cfg["fold"] == "all" and (root / "last.pt").is_file():
            raise DataError(f"{root}: holds a one-fold run, not --fold all; resume it with the --fold it trained "
                            f"(fold {json.loads((root / 'config.json').read_text()).get('fold', '?')})")
        if cfg["resume"] and cfg["fold"] != "all" and not (root / "last.pt").is_file() \
                and (root / f"fold{cfg['fold']}" / "last.pt").is_file():
            raise DataError(f"{root}: holds a --fold all run; resume it with --fold all")
        claim_run_dir(root, cfg["resume"], cfg["overwrite"], held, "train.py", folds=outs.values())
        if cfg["resume"]:  # every fold's flags now, not at its turn: side by side, the others would train meanwhile
            for fold, out in outs.items():
                if (out / "last.pt").is_file():
                    flags = {k: v for k, v in dict(cfg, fold=fold).items() if k in DEFAULTS}
                    check_resumable(load_checkpoint(out / "last.pt", lazy=True), flags, RUNTIME_KEYS, DEFAULTS,
                                    out / "last.pt")
    except (OSError, ValueError) as e:  # an unreadable config.json, --out at a file: one line too
        raise DataError(too_long(e) if getattr(e, "errno", None) == errno.ENAMETOOLONG else str(e)) from None


def fit_fold(cfg: dict, fold: int, folds_root: Path, out: Path, rt: Runtime) -> dict:
    return (train_fold_federated if cfg["federated"] else train_fold)(cfg, fold, folds_root, out, rt)


def train_side_by_side(cfg: dict, folds_root: Path, outs: dict[int, Path], jobs: int) -> list[dict]:
    """--jobs N: N folds at a time, each in a process of its own. On one GPU each has its own CUDA
    context, so one fold's host work (Python, kernel launches) overlaps another fold's kernels: a
    launch-bound GPU fills up. Each fold's results are those it gets when trained alone."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    takes_ctrl_c, stopped = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN, context.Event()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_job,
                                                initargs=(threads, takes_ctrl_c, stopped, os.getpid())) as pool:
        with spawned_deaf_to_ctrl_c():  # the pool starts its processes as folds are submitted
            futures = [pool.submit(_fold_job, cfg, k, folds_root, out) for k, out in outs.items()]
        try:
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C, SIGTERM or one fold's error: the others stop too, as in turn they
            stopped.set()  # would not start; a process still starting leaves once ready
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():  # SIGTERM: heard where Ctrl-C is ignored (nohup)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
            raise


def _start_job(threads: int, takes_ctrl_c: bool, stopped, parent: int) -> None:
    """A fold's process, ready (torch imported): it takes Ctrl-C from now on, unless the run ignores it
    (`nohup ... &`), and SIGTERM; it leaves if the run was stopped while it started (the handlers
    first, so that a stop after the check reaches them), or whenever the run's process is gone."""
    torch.set_num_threads(threads)  # the CPU's cores shared out between the folds, not each taking all
    tqdm.set_lock(threading.RLock())  # not tqdm's default, a semaphore that os._exit (below) would leave behind
    quiet_pillow()
    if takes_ctrl_c:
        signal.signal(signal.SIGINT, _leave)
    signal.signal(signal.SIGTERM, _leave)
    threading.Thread(target=_stop_without, args=(parent,), daemon=True).start()
    if stopped.is_set():
        os._exit(130)


def _stop_without(parent: int) -> None:
    """A run's process killed outright (`kill -9`, out of memory) cannot stop its folds' processes:
    left alone they would go on training fold after fold into a run directory nobody holds. Each
    stops itself once its parent is gone, as if sent SIGTERM (unwinding, if it trains a fold)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def _fold_job(cfg: dict, fold: int, folds_root: Path, out: Path) -> dict:
    rt = select_runtime(cfg["device"], cfg["precision"], cfg["memory_format"], deterministic=cfg["deterministic"],
                        quiet=True)  # the run's process has said what there is to say about it
    _on_interrupt(_unwind)
    try:
        return fit_fold(cfg, fold, folds_root, out, rt)
    except KeyboardInterrupt:  # unwound (temporary files removed); the pool would hand out the next fold: leave
        os._exit(130)
    finally:
        _on_interrupt(_leave)  # idle again


def _on_interrupt(handler) -> None:
    """How a fold's process meets Ctrl-C and SIGTERM: it leaves quietly (the parent says so), at once
    when idle, after unwinding when it trains a fold. Ctrl-C not where it is ignored (`nohup ... &`)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _leave(signum, frame):
    os._exit(130)


def _unwind(signum, frame):
    for stop in (signal.SIGINT, signal.SIGTERM):  # a second stop (the parent's) cannot cut the unwinding short
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
