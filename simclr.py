"""SimCLR self-supervised pre-training (Chen et al. 2020) with a hand-written NT-Xent loss.

    python simclr.py                                     # LeNet on fold 1's Train+Valid images
    python train.py --init runs/simclr/encoder.pt        # then fine-tune the encoder
    python simclr.py --model resnext101_64x4d --batch-size 256 --optimizer lars --lr 0.3 --epochs 200
    torchrun --nproc_per_node=4 simclr.py --model resnext101_64x4d   # negatives gathered from all GPUs

Unlabeled images: the fold's Train and Valid images (labels ignored) plus any --extra folders
(searched recursively); the fold's Test images are left out unless --include-test, and the run
lists every file it saw in files.txt. Every --eval-every epochs a k-NN classifier on the frozen
encoder's features (Train -> Valid labels) shows whether the representation improves.
Writes runs/simclr/{config.json, files.txt, history.csv, loss.png, last.pt, encoder.pt}.
"""
import argparse
import csv
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn.functional as dist_nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from augment import SIMCLR_OPS, BatchAugment  # noqa: E402
from getData import (IMAGE_EXTENSIONS, DataError, atomic_write, batch_indices, decode_all, derived_seed,  # noqa: E402
                     index_split, list_classes, origin_stem, resize_size, resolve_data_root, set_seed)
from models import (OPTIMIZERS, ModelError, autocast, build_model, check_resumable, checkpoint_dict,  # noqa: E402
                    load_checkpoint, make_optimizer, restore_rng, rng_state, save_checkpoint, select_device,
                    setup_distributed, to_device, unwrap, warmup_cosine)
from testing import embed  # noqa: E402

DEFAULTS = dict(data_root="data", model="lenet", init="none", input_size=None, fold=1, extra=None,
                include_test=False, epochs=100, batch_size=32, lr=3e-3, optimizer="adamw", weight_decay=1e-6,
                warmup_epochs=5, temperature=0.5, proj_dim=128, eval_every=10, knn_k=5, seed=0,
                device="auto", out="runs/simclr", resume=False)
RUNTIME_KEYS = {"resume", "device", "eval_every"}


# ----------------------------------------------------------------------------- the loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) for N positive pairs (z1[i], z2[i]); N is read from the batch.

    Each of the 2N views is classified against the other 2N - 1 by cosine similarity / temperature,
    with its partner as the answer. Computed in float32 even under autocast: exp(sim / 0.1) overflows
    bf16's 8-bit mantissa precision long before fp32's range. Under torch.distributed, embeddings
    from every rank are gathered with gradients, so the negatives are the global batch's; each rank
    scores its own anchors and DDP's gradient average makes the step that of the whole batch.
    The default temperature 0.5 is the paper's choice for small datasets (CIFAR-10, appendix B.9).
    """
    n = z1.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * n
        z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
    else:
        offset = 0
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        total = z.shape[0]  # 2N over all ranks
        anchors = torch.cat([torch.arange(offset, offset + n), torch.arange(offset, offset + n) + total // 2])
        anchors = anchors.to(z.device)
        logits = z[anchors] @ z.T / temperature
        logits = logits.masked_fill(F.one_hot(anchors, total).bool(), float("-inf"))  # no self-similarity
        return F.cross_entropy(logits, (anchors + total // 2) % total)


class ProjectionHead(nn.Sequential):
    """g(h) of SimCLR: Linear-BN-ReLU-Linear to a 128-d space where the loss is applied."""

    def __init__(self, in_features: int, out_features: int = 128):
        super().__init__(nn.Linear(in_features, in_features, bias=False), nn.BatchNorm1d(in_features),
                         nn.ReLU(inplace=True), nn.Linear(in_features, out_features))


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, proj_dim: int = 128):
        super().__init__()
        self.encoder = encoder  # a models.Classifier; only its backbone is trained and saved
        self.projector = ProjectionHead(encoder.num_features, proj_dim)

    def forward(self, x):
        return self.projector(self.encoder.features(x))


# ----------------------------------------------------------------------------- data
def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def unlabeled_files(folds_root: Path, fold: int, extra=(), include_test=False) -> tuple[list[Path], int]:
    """Train + Valid images of the fold, plus every image under the --extra folders.

    The fold's Test images are excluded (by name, augmented copies included, and by content) unless
    include_test. Returns (files, number of extra files excluded as Test images)."""
    classes = list_classes(folds_root)
    splits = ["Train", "Valid"] + (["Test"] if include_test else [])
    files = [p for s in splits for p, _ in index_split(folds_root, fold, s, classes)]  # Train, Valid first
    test = [p for p, _ in index_split(folds_root, fold, "Test", classes)]
    test_names, test_hashes = {p.stem for p in test}, {_sha1(p) for p in test}
    excluded = 0
    for d in map(Path, extra or ()):
        if not d.is_dir():
            raise DataError(f"--extra {d}: no such folder")
        for p in sorted(q for q in d.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS):
            if not include_test and (origin_stem(p) in test_names or _sha1(p) in test_hashes):
                excluded += 1
            else:
                files.append(p)
    seen, unique = set(), []
    for p in files:  # the same file reached twice (an --extra that contains the dataset) counts once
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique, excluded


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    """Cosine k-NN, majority vote: how well frozen features separate the classes."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    nearest = (test_x @ train_x.T).topk(min(k, len(train_x)), dim=1).indices
    votes = F.one_hot(train_y[nearest], int(train_y.max()) + 1).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item()


class Monitor:
    """k-NN accuracy of the frozen encoder on the fold's Train -> Valid labels."""

    def __init__(self, train_x, train_y, valid_x, valid_y, k: int):
        self.train_x, self.train_y, self.valid_x, self.valid_y, self.k = train_x, train_y, valid_x, valid_y, k

    @classmethod
    def for_fold(cls, folds_root, fold: int, size: int, k: int, images=None):
        """`images`: the decoded unlabeled set, which starts with the fold's Train then Valid images."""
        classes = list_classes(folds_root)
        train, valid = (index_split(folds_root, fold, s, classes) for s in ("Train", "Valid"))
        if images is None:
            images = decode_all([p for p, _ in train + valid], size)
        labels = [torch.tensor([y for _, y in s]) for s in (train, valid)]
        return cls(images[:len(train)], labels[0], images[len(train):len(train) + len(valid)], labels[1], k)

    def __call__(self, encoder, device) -> float:
        was_training = encoder.training
        encoder.eval()
        feats = [embed(encoder, x, device) for x in (self.train_x, self.valid_x)]
        encoder.train(was_training)
        return knn_accuracy(feats[0], self.train_y, feats[1], self.valid_y, self.k)


# ----------------------------------------------------------------------------- training
def write_history(history: list[dict], out: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["epoch", "lr", "loss", "knn_acc", "epoch_s", "images_per_s"], extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    atomic_write(out / "history.csv", buf.getvalue())
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot([h["epoch"] for h in history], [h["loss"] for h in history])
    ax[0].set(xlabel="epoch", title="NT-Xent loss")
    knn = [(h["epoch"], h["knn_acc"]) for h in history if h.get("knn_acc") not in (None, "")]
    if knn:
        ax[1].plot(*zip(*knn), marker="o")
    ax[1].set(xlabel="epoch", title="k-NN accuracy (Train -> Valid)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "loss.png", png.getvalue())


def pretrain_epoch(net, images, aug, opt, sched, cfg, epoch, device, rank, world) -> dict:
    net.train()
    order_gen = torch.Generator().manual_seed(derived_seed(cfg["seed"], epoch))
    view_gen = torch.Generator().manual_seed(derived_seed(cfg["seed"], epoch, rank + 1))
    # Under DDP every rank needs the same batch shape for the gather; alone, a smaller last batch is fine.
    steps = list(batch_indices(len(images), cfg["batch_size"], order_gen, drop_last=world > 1))
    total, count, start = torch.zeros((), device=device), 0, time.perf_counter()  # summed on device: no sync
    for idx in tqdm(steps, desc=f"epoch {epoch + 1}", leave=False, disable=rank != 0):
        x = images[idx[rank::world].to(images.device)]
        if len(x) < 2:
            continue  # one image has no negatives
        views = torch.cat([aug(x, view_gen), aug(x, view_gen)]).to(device, non_blocking=True)
        if device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            z1, z2 = net(views).chunk(2)
        loss = nt_xent(z1, z2, cfg["temperature"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, count = total + loss.detach() * len(x), count + len(x)
    return dict(loss=total.item() / max(count, 1), images_per_s=count * world / (time.perf_counter() - start))


def restore(out: Path, config: dict, model: SimCLR, opt, sched) -> tuple[int, list, float | None]:
    ckpt = load_checkpoint(out / "last.pt")
    check_resumable(ckpt, config, RUNTIME_KEYS, out / "last.pt")
    model.encoder.backbone.load_state_dict(ckpt["state_dict"])
    model.projector.load_state_dict(ckpt["projector"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    restore_rng(ckpt["rng"])
    return ckpt["epoch"], ckpt["history"], ckpt["metric"].get("knn_acc_start")


def pretrain(cfg: dict) -> dict:
    rank, world, local_rank = setup_distributed()
    try:
        device = select_device(cfg["device"], local_rank)
        folds_root = resolve_data_root(cfg["data_root"]) if rank == 0 else None
        if world > 1:
            shared = [folds_root]
            dist.broadcast_object_list(shared)
            folds_root = shared[0]
        return _pretrain(cfg, Path(folds_root), device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _pretrain(cfg, folds_root, device, rank, world) -> dict:
    out = Path(cfg["out"])
    set_seed(cfg["seed"])
    classes = list_classes(folds_root)
    encoder = build_model(cfg["model"], len(classes), cfg["init"], cfg["input_size"])
    model = to_device(SimCLR(encoder, cfg["proj_dim"]), device)
    files, excluded = unlabeled_files(folds_root, cfg["fold"], cfg["extra"], cfg["include_test"])
    config = dict(cfg, data_root=str(folds_root), classes=classes, n_images=len(files), world_size=world)
    size = resize_size(encoder.input_size)
    images = decode_all(files, size, desc="decode").to(device)
    monitor = Monitor.for_fold(folds_root, cfg["fold"], size, cfg["knn_k"], images) if rank == 0 else None
    opt = make_optimizer(cfg["optimizer"], model.parameters(), cfg["lr"], cfg["weight_decay"])
    steps = -(-len(files) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg["epochs"] * steps, cfg["warmup_epochs"] * steps))
    start, history, knn_start = 0, [], None
    if cfg["resume"] and (out / "last.pt").is_file():
        start, history, knn_start = restore(out, config, model, opt, sched)
    elif rank == 0:
        atomic_write(out / "config.json", json.dumps(config, indent=2))
        atomic_write(out / "files.txt", "".join(f"{p}\n" for p in files))
        knn_start = monitor(encoder, device)
        print(f"simclr: {len(files)} unlabeled images ({excluded} --extra files left out as fold "
              f"{cfg['fold']} Test images); k-NN of the initial encoder: {knn_start:.3f}")
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    aug = BatchAugment(encoder.input_size, SIMCLR_OPS)
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"])
        row.update(pretrain_epoch(net, images, aug, opt, sched, cfg, epoch, device, rank, world))
        if rank != 0:
            continue
        last = epoch + 1 == cfg["epochs"]
        row["knn_acc"] = monitor(encoder, device) if (epoch + 1) % cfg["eval_every"] == 0 or last else None
        row["epoch_s"] = time.perf_counter() - t0
        history.append(row)
        metric = {"loss": row["loss"], "knn_acc_start": knn_start,
                  "knn_acc": next((h["knn_acc"] for h in reversed(history) if h["knn_acc"] is not None), None)}
        save_checkpoint(checkpoint_dict(encoder, "encoder", classes, config, epoch + 1, metric,
                                        projector=unwrap(model).projector.state_dict(), optimizer=opt.state_dict(),
                                        scheduler=sched.state_dict(), rng=rng_state(), history=history), out / "last.pt")
        save_checkpoint(checkpoint_dict(encoder, "encoder", classes, config, epoch + 1, metric), out / "encoder.pt")
        write_history(history, out)
        knn = f" | k-NN {row['knn_acc']:.3f}" if row["knn_acc"] is not None else ""
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {row['loss']:.4f}{knn} | {row['images_per_s']:.0f} img/s")
    return history[-1] if history else {}


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--data-root", default=d["data_root"])
    p.add_argument("--model", default=d["model"], help="any backbone of models/ (lenet, resnet18, ...)")
    p.add_argument("--init", default=d["init"], help="none, imagenet or a .pt to start from")
    p.add_argument("--input-size", type=int, default=d["input_size"], help="override the model's input size")
    p.add_argument("--fold", type=int, default=d["fold"], choices=[1, 2, 3, 4, 5],
                   help="its Train+Valid images are used; its Test images are held out")
    p.add_argument("--extra", action="append", default=d["extra"], metavar="DIR", help="more unlabeled images")
    p.add_argument("--include-test", action="store_true", help="also use the fold's Test images (leaks!)")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="pairs per step, over all ranks")
    p.add_argument("--lr", type=float, default=d["lr"], help="SimCLR with LARS: 0.3 x batch/256")
    p.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-epochs", type=int, default=d["warmup_epochs"])
    p.add_argument("--temperature", type=float, default=d["temperature"])
    p.add_argument("--proj-dim", type=int, default=d["proj_dim"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"], help="k-NN monitor every N epochs")
    p.add_argument("--knn-k", type=int, default=d["knn_k"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=d["out"])
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
        if args.temperature <= 0:
            raise DataError(f"--temperature {args.temperature}: must be positive")
        pretrain(vars(args).copy())
        return 0
    except (DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
