"""Train a lesion classifier on one fold or all five folds of MSLD v2.0.

    python train.py                                  # LeNet, fold 1 (the synthetic set if data/ has none)
    python train.py --model resnext101_64x4d --init imagenet --fold all --epochs 30 --lr 1e-4 --batch-size 32
    torchrun --nproc_per_node=4 train.py --model resnext101_64x4d --fold all     # DistributedDataParallel
    python train.py --resume --out runs/lenet-fold1  # continue a killed run (same arguments)

The fast path: every image is decoded once into a uint8 tensor cache, moved to the device once, and
augmented there a batch at a time (augment.BatchAugment); the model runs in bf16 and channels_last on
CUDA. Model selection sees only the Valid split; the Test split is left to testing.py.
Writes runs/NAME/{config.json, history.csv, curves.png, last.pt, best.pt} (foldK/ each, for --fold all).
"""
import argparse
import copy
import csv
import io
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from augment import TRAIN_OPS, BatchAugment  # noqa: E402
from getData import (FOLDS, DataError, MSLDDataset, atomic_write, batch_indices, derived_seed,  # noqa: E402
                     list_classes, patient_id, resize_size, resolve_data_root, set_seed)
from models import (OPTIMIZERS, ModelError, autocast, build_model, check_resumable, checkpoint_dict,  # noqa: E402
                    load_checkpoint, make_optimizer, restore_rng, rng_state, save_checkpoint, select_device,
                    setup_distributed, to_device, unwrap, warmup_cosine)
from testing import classification_metrics, mean_std_table, predict  # noqa: E402

DEFAULTS = dict(
    data_root="data", model="lenet", init="none", fold="1", epochs=60, batch_size=16, lr=2e-3,
    optimizer="adamw", weight_decay=0.05, warmup_epochs=3, label_smoothing=0.1, balance="none",
    input_size=None, aug_dir=None, no_augment=False, aug_device="auto", seed=0, device="auto", compile=False,
    out=None, resume=False,
    federated=None, clients=5, rounds=30, local_epochs=2, mu=0.01, partition="iid", alpha=0.5,
)
# Settings that may change when a run is resumed: where it runs, not what it computes.
RUNTIME_KEYS = {"resume", "device", "aug_device", "compile"}
HISTORY_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "valid_bal_acc",
                  "epoch_s", "train_images_per_s"]


# ----------------------------------------------------------------------------- set-up
def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled to mean 1 over the classes present."""
    counts = torch.bincount(targets, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    return w / w[counts > 0].mean()


# ----------------------------------------------------------------------------- one fold
class FoldData:
    """The fold's Train and Valid images, decoded once and moved once: Train to the augmentation
    device, Valid to the training device."""

    def __init__(self, folds_root, fold: int, input_size: int, device, aug_device, aug_dirs=()):
        classes = list_classes(folds_root)
        size = resize_size(input_size)
        train = MSLDDataset(folds_root, fold, "Train", cache_size=size, extra_dirs=aug_dirs, classes=classes)
        valid = MSLDDataset(folds_root, fold, "Valid", cache_size=size, classes=classes)
        self.classes, self.train_paths = classes, train.paths
        self.train_images, self.train_targets = train.images.to(aug_device), train.targets.to(aug_device)
        self.valid_images, self.valid_targets = valid.images.to(device), valid.targets


def train_epoch(model, data: FoldData, opt, sched, loss_fn, aug, cfg: dict, epoch: int, device,
                rank=0, world=1, extra_loss=None, sample_weights=None, indices=None, stream=()) -> dict:
    """One pass over the Train images (or the subset `indices`, e.g. one federated site).
    `stream` extends the (seed, epoch) key of this pass's random numbers. Returns loss, accuracy, images/s."""
    model.train()
    pool = indices if indices is not None else torch.arange(len(data.train_targets))
    order_gen = torch.Generator().manual_seed(derived_seed(cfg["seed"], epoch, *stream))  # same on every rank
    aug_gen = torch.Generator().manual_seed(derived_seed(cfg["seed"], epoch, *stream, rank + 1))  # own views
    weights = sample_weights[pool] if sample_weights is not None else None
    steps = list(batch_indices(len(pool), cfg["batch_size"], order_gen, weights))
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count: no sync per step
    start = time.perf_counter()
    for idx in tqdm(steps, desc=f"epoch {epoch + 1}", leave=False, disable=rank != 0 or bool(stream)):
        idx = pool[idx][rank::world].to(data.train_images.device, non_blocking=True)  # this rank's share
        x = aug(data.train_images[idx], aug_gen).to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.train_targets[idx].to(device, non_blocking=True)
        with autocast(device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total[0] += loss.detach() * len(y)
        total[1] += (logits.argmax(1) == y).sum()
        total[2] += len(y)
    if world > 1:
        dist.all_reduce(total)
    loss_sum, correct, n = total.tolist()
    n = max(n, 1)
    return dict(train_loss=loss_sum / n, train_acc=correct / n, train_images_per_s=n / (time.perf_counter() - start))


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


def federated_round(model, data: FoldData, sites, loss_fn, aug, cfg: dict, rnd: int, device, lr: float,
                    sample_weights=None) -> dict:
    """FedAvg / FedProx (McMahan et al. 2017; Li et al. 2020): every site trains a copy of the global
    model for --local-epochs on its own images; the copies are averaged, weighted by site size.
    FedProx adds (mu/2)||w - w_global||^2 to each local loss, keeping sites near the global model."""
    start = time.perf_counter()
    global_state = copy.deepcopy(model.state_dict())
    anchor = [p.detach().clone() for p in model.parameters()]
    states, sizes, totals = [], [], torch.zeros(3, dtype=torch.float64)
    for site, idx in enumerate(sites):
        if len(idx) < cfg["batch_size"]:
            continue  # a site too small for one batch sits this round out
        model.load_state_dict(global_state)
        opt = make_optimizer(cfg["optimizer"], model.parameters(), lr, cfg["weight_decay"])
        prox = None
        if cfg["federated"] == "fedprox":
            params = list(model.parameters())
            prox = lambda: cfg["mu"] / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        for e in range(cfg["local_epochs"]):
            r = train_epoch(model, data, opt, None, loss_fn, aug, cfg, rnd, device, extra_loss=prox, indices=idx,
                            sample_weights=sample_weights, stream=(site + 1, e + 1))
            n = len(idx) // cfg["batch_size"] * cfg["batch_size"]
            totals += torch.tensor([r["train_loss"] * n, r["train_acc"] * n, n], dtype=torch.float64)
        states.append(copy.deepcopy(model.state_dict()))
        sizes.append(len(idx))
    model.load_state_dict(average_states(states, sizes))
    n = max(totals[2].item(), 1)
    return dict(train_loss=totals[0].item() / n, train_acc=totals[1].item() / n,
                train_images_per_s=n / (time.perf_counter() - start))


def validate(model, data: FoldData, device) -> dict:
    model.eval()
    probs = predict(unwrap(model), data.valid_images, device)
    y = data.valid_targets
    m = classification_metrics(y.numpy(), probs.numpy(), data.classes)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), y).item()
    return dict(valid_loss=loss, valid_acc=m["accuracy"], valid_bal_acc=m["balanced_accuracy"])


def is_better(new: dict, best: dict | None) -> bool:
    """Valid balanced accuracy (the classes are imbalanced), ties broken by lower valid loss."""
    return best is None or (new["valid_bal_acc"], -new["valid_loss"]) > (best["valid_bal_acc"], -best["valid_loss"])


def write_history(history: list[dict], out: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, HISTORY_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write(out / "history.csv", buf.getvalue())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] for h in history]
    for ax, key, name in ((a, "loss", "loss"), (b, "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train")
        ax.plot(epochs, [h[f"valid_{key}"] for h in history], label="valid")
        ax.set(xlabel="epoch", title=name)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "curves.png", png.getvalue())


def save_epoch(model, classes, config, history, best, opt, sched, out: Path) -> None:
    """After each epoch (rank 0): best.pt when Valid improved, last.pt always, history and curves."""
    row = history[-1]
    if best is row:
        save_checkpoint(checkpoint_dict(model, "classifier", classes, config, row["epoch"], best), out / "best.pt")
    save_checkpoint(checkpoint_dict(model, "classifier", classes, config, row["epoch"], row, best=best,
                                    rng=rng_state(), optimizer=opt and opt.state_dict(),
                                    scheduler=sched and sched.state_dict(), history=history), out / "last.pt")
    write_history(history, out)


def resume_state(out: Path, config: dict, model, opt, sched) -> tuple[int, dict | None, list]:
    """Restore model, optimizer, scheduler and RNG from out/last.pt; refuse a different configuration."""
    ckpt = load_checkpoint(out / "last.pt")
    check_resumable(ckpt, config, RUNTIME_KEYS, out / "last.pt")
    unwrap(model).load_state_dict(ckpt["state_dict"])
    if opt is not None:  # (federated runs keep no global optimizer)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    restore_rng(ckpt["rng"])
    return ckpt["epoch"], ckpt.get("best"), ckpt.get("history", [])


def train_fold(cfg: dict, fold: int, folds_root: Path, out: Path, device, rank=0, world=1) -> dict:
    """Train one fold into `out`; returns the best epoch's validation metrics."""
    config = dict(cfg, fold=fold, data_root=str(folds_root))
    set_seed(cfg["seed"])
    model = to_device(build_model(cfg["model"], len(list_classes(folds_root)), cfg["init"], cfg["input_size"]), device)
    aug_device = device if cfg["aug_device"] == "auto" else torch.device(cfg["aug_device"])
    data = FoldData(folds_root, fold, model.input_size, device, aug_device, cfg["aug_dir"] or ())
    config["classes"] = data.classes
    steps_per_epoch = len(data.train_targets) // cfg["batch_size"]
    if steps_per_epoch == 0:
        raise DataError(f"fold {fold}: {len(data.train_targets)} Train images, fewer than --batch-size "
                        f"{cfg['batch_size']}; lower --batch-size")
    opt = sched = sites = None
    if cfg["federated"]:  # sites build their own optimizers each round; the LR follows a cosine over rounds
        sites = split_sites(data.train_paths, data.train_targets.cpu(), cfg["clients"], cfg["partition"], cfg["alpha"],
                            cfg["seed"])
        config["site_sizes"] = [len(s) for s in sites]
    else:
        opt = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg["epochs"] * steps_per_epoch,
                                                                     cfg["warmup_epochs"] * steps_per_epoch))
    start, best, history = 0, None, []
    if cfg["resume"] and (out / "last.pt").is_file():
        start, best, history = resume_state(out, config, model, opt, sched)
        if rank == 0:
            print(f"fold {fold}: resuming after epoch {start} from {out}/last.pt")
    elif rank == 0:
        if cfg["resume"]:
            print(f"fold {fold}: no {out}/last.pt to resume from: starting it")
        atomic_write(out / "config.json", json.dumps(config, indent=2))
    weights = class_weights(data.train_targets.cpu(), len(data.classes))  # sampling draws on the CPU
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if cfg["balance"] == "loss" else None,
                                        label_smoothing=cfg["label_smoothing"])
    sample_weights = weights[data.train_targets.cpu()] if cfg["balance"] == "sampler" else None
    aug = BatchAugment(model.input_size, {} if cfg["no_augment"] else TRAIN_OPS)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    net = torch.compile(net) if cfg["compile"] else net
    epochs = cfg["rounds"] if cfg["federated"] else cfg["epochs"]
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        if cfg["federated"]:
            lr = cfg["lr"] * warmup_cosine(epochs, 0)(epoch)
            row = dict(epoch=epoch + 1, lr=lr)
            row.update(federated_round(model, data, sites, loss_fn, aug, cfg, epoch, device, lr, sample_weights))
        else:
            row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"])
            row.update(train_epoch(net, data, opt, sched, loss_fn, aug, cfg, epoch, device, rank, world,
                                   sample_weights=sample_weights))
        if rank == 0:
            row.update(validate(model, data, device), epoch_s=time.perf_counter() - t0)
            history.append(row)
            best = row if is_better(row, best) else best
            save_epoch(model, data.classes, config, history, best, opt, sched, out)
            print(f"fold {fold} {'round' if cfg['federated'] else 'epoch'} {epoch + 1}/{epochs}: "
                  f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | valid loss "
                  f"{row['valid_loss']:.4f} acc {row['valid_acc']:.3f} bal {row['valid_bal_acc']:.3f} | "
                  f"{row['train_images_per_s']:.0f} img/s")
    if world > 1:
        dist.barrier()
    return dict(fold=fold, best_epoch=(best or {}).get("epoch"),
                **{k: v for k, v in (best or {}).items() if k.startswith("valid")})


# ----------------------------------------------------------------------------- CLI
def parse_fold(spec: str) -> list[int]:
    if spec == "all":
        return list(FOLDS)
    if not spec.isdigit() or int(spec) not in FOLDS:
        raise DataError(f"--fold {spec}: MSLD v2.0 has folds 1..5 (or use --fold all)")
    return [int(spec)]


def parse_args(argv=None):
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data-root", default=d["data_root"], help="MSLD v2.0 folder (synthetic set if data/ has none)")
    p.add_argument("--model", default=d["model"], help="lenet, resnext101_64x4d, resnet18, ... (any torchvision)")
    p.add_argument("--init", default=d["init"], help="none, imagenet, or a .pt (SimCLR encoder.pt, best.pt)")
    p.add_argument("--input-size", type=int, default=d["input_size"], help="override the model's input size "
                   "(convolutional networks only; e.g. 112 for a quick CPU run)")
    p.add_argument("--fold", default=d["fold"], help="1..5 or all")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch, split over ranks")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"])
    p.add_argument("--label-smoothing", type=float, default=d["label_smoothing"])
    p.add_argument("--balance", default=d["balance"], choices=["none", "loss", "sampler"],
                   help="class-balanced loss weights or sampler (Mpox is 38%% of images, Measles 7%%)")
    p.add_argument("--aug-dir", action="append", default=d["aug_dir"], help="augment.py output to add to Train")
    p.add_argument("--no-augment", action="store_true", help="train without random augmentation")
    p.add_argument("--aug-device", default=d["aug_device"], choices=["auto", "cpu", "cuda"],
                   help="where batches are augmented (auto: the training device)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default=d["out"], help="run directory (default runs/MODEL-foldK)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    f = p.add_argument_group("federated simulation (sites trained one after another, in this process)")
    f.add_argument("--federated", default=d["federated"], choices=["fedavg", "fedprox"])
    f.add_argument("--clients", type=int, default=d["clients"], help="simulated sites")
    f.add_argument("--rounds", type=int, default=d["rounds"], help="communication rounds (replace --epochs)")
    f.add_argument("--local-epochs", type=int, default=d["local_epochs"], help="epochs per site per round")
    f.add_argument("--mu", type=float, default=d["mu"], help="FedProx proximal weight")
    f.add_argument("--partition", default=d["partition"], choices=["iid", "dirichlet"], help="patients to sites")
    f.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet concentration (smaller: less IID)")
    return p.parse_args(argv)


def check_args(args) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.lr <= 0:
        raise DataError(f"--lr {args.lr}: must be positive")
    if args.aug_device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--aug-device cuda: no CUDA device is available")
    if args.federated:
        for name in ("clients", "rounds", "local_epochs"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
        if args.mu < 0:
            raise DataError(f"--mu {args.mu}: the proximal weight cannot be negative")
        if args.alpha <= 0:
            raise DataError(f"--alpha {args.alpha}: must be positive")
        if "RANK" in __import__("os").environ:
            raise DataError("--federated simulates every site in one process: run it without torchrun")


def run(args) -> list[dict]:
    check_args(args)
    folds = parse_fold(args.fold)
    rank, world, local_rank = setup_distributed()
    try:
        device = select_device(args.device, local_rank)
        folds_root = resolve_data_root(args.data_root) if rank == 0 else None
        if world > 1:  # rank 0 may have generated the synthetic set: everyone uses its answer
            shared = [folds_root]
            dist.broadcast_object_list(shared)
            folds_root = shared[0]
        cfg = vars(args).copy()
        cfg["out"] = args.out or f"runs/{args.model}-{'all' if args.fold == 'all' else 'fold' + args.fold}"
        cfg["world_size"] = world
        results = []
        for k in folds:
            out = Path(cfg["out"]) / (f"fold{k}" if args.fold == "all" else "")
            results.append(train_fold(cfg, k, Path(folds_root), out, device, rank, world))
        if rank == 0 and args.fold == "all":
            table = mean_std_table(results, ["valid_acc", "valid_bal_acc", "valid_loss", "best_epoch"])
            atomic_write(Path(cfg["out"]) / "summary.md",
                         f"# {args.model}: best epoch per fold (Valid split; Test: run testing.py)\n\n{table}")
            print(table)
        return results
    finally:
        if world > 1:
            dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except (DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
