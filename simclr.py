"""SimCLR self-supervised pre-training (Chen et al. 2020) with a hand-written NT-Xent loss.

    python simclr.py                                     # LeNet on fold 1's Train+Valid images
    python train.py --init runs/simclr/encoder.pt        # then fine-tune the encoder
    python simclr.py --positives patient                 # two photos of one patient as a pair (MICLe)
    python simclr.py --model resnext101_64x4d --batch-size 256 --optimizer lars --lr 0.3 --epochs 200
    torchrun --nproc_per_node=4 simclr.py --model resnext101_64x4d   # negatives gathered from all GPUs

Unlabeled images: the fold's Train and Valid images (labels ignored) plus any --extra folders
(searched recursively); the fold's Test images are left out unless --include-test, and the run
lists every file it saw in files.txt. Every --eval-every epochs a k-NN classifier on the frozen
encoder's features (Train -> Valid labels) shows whether the representation improves.
Writes runs/simclr/{config.json, files.txt, history.csv, loss.png, last.pt, encoder.pt}.
"""
import contextlib
import hashlib
import math
import shlex
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from augment import SIMCLR_OPS, BatchAugment
from getData import (SEED, DataError, Number, Parser, atomic_write, decode_all, images_in, index_split, list_classes,
                     origin_stem, patient_id, refuse_leaks, resolve_data_root, resumable, run_main, stop_if_asked,
                     to_json)
from models import (INPUT_SIZE, LEARNING_RATE, MEMORY_FORMATS, OPTIMIZERS, PRECISION_HELP, PRECISIONS, Runtime,
                    SaveClock, batch_indices, build_model, checkpoint_dict, claim_run_dir, distributed, embed,
                    epoch_generators, init_file, make_optimizer, param_groups, per_rank_batch, refuse_init_that_saw,
                    resize_size, resume, save_checkpoint, send, set_seed, shard, training_state, warmup_cosine,
                    write_history)

DEFAULTS = dict(data_root="data", model="lenet", init="none", input_size=None, fold=1, extra=None,
                include_test=False, positives="views", epochs=100, batch_size=32, lr=3e-3, optimizer="adamw",
                weight_decay=1e-6, warmup_epochs=5, temperature=0.5, proj_dim=128, eval_every=10, knn_k=5, seed=0,
                device="auto", precision="auto", memory_format="auto", out="runs/simclr", resume=False, overwrite=False,
                save_every=60.0)
RUNTIME_KEYS = {"resume", "overwrite", "out", "device", "eval_every", "precision", "memory_format", "world_size",
                "backend", "data_root", "save_every"}
HISTORY_FIELDS = ["epoch", "lr", "loss", "knn_acc", "epoch_s", "images_per_s"]
CURVES = [("NT-Xent loss", ["loss"]), ("k-NN accuracy (Train -> Valid)", ["knn_acc"])]


# ----------------------------------------------------------------------------- the loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1) for N positive pairs (z1[i], z2[i]); N is read from the batch.

    Each of the 2N views is classified against the other 2N - 1 by cosine similarity / temperature,
    with its partner as the answer. Computed in float32 even under autocast: bf16 keeps 8 significant
    bits, so logits near 1 / temperature blur together (at 0.1: 9.99, 10.0 and 10.02 are all 10.0
    in bf16). Under torch.distributed, embeddings from every rank are gathered with gradients, so
    the negatives are the global batch's; each rank scores its own anchors and DDP's gradient
    average makes the step that of the whole batch.
    The default temperature 0.5 is the paper's choice for small datasets (CIFAR-10, appendix B.9).
    """
    n = z1.shape[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * n
        z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))
    else:
        offset = 0
    device = z1.device.type  # (autocast is off on a device that has none)
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        total = z.shape[0]  # 2N over all ranks
        own = torch.arange(offset, offset + n, device=z.device)  # made on the device: no copy per step
        anchors = torch.cat([own, own + total // 2])
        logits = z[anchors] @ z.T / temperature
        logits = logits.masked_fill(F.one_hot(anchors, total).bool(), float("-inf"))  # no self-similarity
        return F.cross_entropy(logits, (anchors + total // 2) % total)


class ProjectionHead(nn.Sequential):
    """g(h) of SimCLR: Linear-BN-ReLU-Linear to a 128-d space where the loss is applied."""

    def __init__(self, in_features: int, out_features: int = 128):
        super().__init__(nn.Linear(in_features, in_features, bias=False), nn.BatchNorm1d(in_features),
                         nn.ReLU(inplace=True), nn.Linear(in_features, out_features))


class SimCLR(nn.Module):
    """The encoder's backbone and the projection head: every parameter is used by the loss (the
    classifier head stays outside, so DDP has no unused parameters to wait for)."""

    def __init__(self, backbone: nn.Module, num_features: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(num_features, proj_dim)

    def forward(self, x):
        return self.projector(self.backbone(x))


# ----------------------------------------------------------------------------- data
def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def unlabeled_files(folds_root: Path, fold: int, extra=(), include_test=False) -> tuple[list[Path], list[str], dict]:
    """Train + Valid images of the fold, plus every image under the --extra folders.

    The fold's Test images are excluded (by name, augmented copies included, and by content) unless
    include_test, and so is an --extra file whose content is in the set already: an --extra holding
    the dataset (MSLD's folds share their photos) gave each photo several times, each copy a false
    negative of the others in NT-Xent. Returns (files, the split of each file: Train, Valid, Test or
    extra, how many --extra files were left out: {"test": ..., "repeated": ...})."""
    classes = list_classes(folds_root)
    if not include_test:  # a Valid or Test photo copied into Train: what train.py refuses, refused here first
        refuse_leaks(folds_root, fold, classes)
    splits = ["Train", "Valid"] + (["Test"] if include_test else [])
    files = [(p, s) for s in splits for p, _ in index_split(folds_root, fold, s, classes)]  # Train, Valid first
    left_out = dict(test=0, repeated=0)
    if not extra:  # nothing to compare: the set's files are not read twice
        return [p for p, _ in files], [s for _, s in files], left_out
    test = [] if include_test else [p for p, _ in index_split(folds_root, fold, "Test", classes)]
    test_names, test_hashes = {p.stem for p in test}, {_sha1(p) for p in test}
    seen = {_sha1(p) for p, _ in files}
    for p in images_in(extra, "--extra"):
        digest = _sha1(p)
        if origin_stem(p) in test_names or digest in test_hashes:
            left_out["test"] += 1
        elif digest in seen:
            left_out["repeated"] += 1
        else:
            seen.add(digest)
            files.append((p, "extra"))
    return [p for p, _ in files], [s for _, s in files], left_out


def patient_partners(files, splits) -> tuple[torch.Tensor, torch.Tensor]:
    """For MICLe (Azizi et al. 2021): each image's other photos of the same patient in the same split
    (so a pair never joins Train and Valid), as a padded table (N, K) and a count per image (0: none)."""
    groups = defaultdict(list)
    for i, (p, s) in enumerate(zip(files, splits)):
        if patient_id(p):
            groups[s, patient_id(p)].append(i)
    others = [[j for j in groups.get((s, patient_id(p)), []) if j != i] for i, (p, s) in enumerate(zip(files, splits))]
    table = torch.zeros(len(files), max(1, max(map(len, others), default=0)), dtype=torch.long)
    for i, row in enumerate(others):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return table, torch.tensor([len(r) for r in others])


def second_images(idx: torch.Tensor, partners, gen: torch.Generator) -> torch.Tensor:
    """The image each anchor is paired with: a random other photo of its patient where one exists
    (`partners` from patient_partners), the anchor itself otherwise (then two views of one photo)."""
    if partners is None:
        return idx
    table, count = partners
    pick = (torch.rand(len(idx), generator=gen) * count[idx].clamp_min(1)).long()
    return torch.where(count[idx] > 0, table[idx, pick], idx)


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

    def __call__(self, encoder, rt: Runtime) -> float:
        was_training = encoder.training
        encoder.eval()
        feats = [embed(encoder, x, rt) for x in (self.train_x, self.valid_x)]
        encoder.train(was_training)
        return knn_accuracy(feats[0], self.train_y, feats[1], self.valid_y, self.k)


# ----------------------------------------------------------------------------- training
def pretrain_epoch(net, images, aug, opt, sched, rt: Runtime, key: tuple, batch_size: int, temperature: float,
                   partners=None) -> dict:
    net.train()
    order_gen, view_gen = epoch_generators(key, rt.rank)
    batches = list(batch_indices(len(images), batch_size, order_gen, drop_last=rt.world > 1))  # see steps_per_epoch
    total, count, start = torch.zeros((), device=rt.device), 0, time.perf_counter()  # summed on device: no sync
    for idx in tqdm(batches, desc=f"epoch {key[1] + 1}", leave=False, disable=True if rt.rank else None):
        stop_if_asked()
        idx = shard(idx, rt)
        if len(idx) < 2:
            continue  # one image has no negatives
        loss = pretrain_step(net, images, aug, idx, second_images(idx, partners, view_gen), view_gen, rt, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total, count = total + loss.detach() * len(idx), count + len(idx)
    stats = torch.stack([total, torch.tensor(float(count), device=rt.device)])
    if rt.world > 1:
        dist.all_reduce(stats)  # the mean over every rank's anchors: all ranks see the same loss
    total, count = stats.tolist()
    return dict(loss=total / max(count, 1), images_per_s=count / (time.perf_counter() - start))


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    """The optimizer steps of pretrain_epoch, which the cosine schedule spans to reach 0 at the end. Under
    DDP every rank needs the same batch shape for the gather: a last partial batch is dropped. Alone,
    it is kept, unless it is one image (no negatives)."""
    if world > 1:
        return n // batch_size
    return -(-n // batch_size) - (n % batch_size == 1)


def pretrain_step(net, images, aug, idx, pair, gen, rt: Runtime, temperature: float) -> torch.Tensor:
    """NT-Xent of two views of the images `idx` and `pair` (CPU indices): both views' random draws
    and the indices go to the device in one copy (models.runtime.send)."""
    shape = (len(idx), *images.shape[1:])
    first = aug.draw(gen, shape)
    second = aug.draw(gen, shape)
    sent = send(dict(images=(idx, pair), views=(first, second)), images.device)
    views = [aug.apply(images[i], drawn) for i, drawn in zip(sent["images"], sent["views"])]
    z1, z2 = rt.forward(net, torch.cat(views)).chunk(2)
    return nt_xent(z1, z2, temperature)


def pretrain(cfg: dict) -> dict:
    with distributed(cfg["device"], cfg["precision"], cfg["memory_format"]) as rt, contextlib.ExitStack() as held:
        folds_root, cfg["init"] = rt.from_rank0(lambda: (resolve_data_root(cfg["data_root"]), init_file(cfg["init"])))
        # rank 0 locks the run directory; a finished run there is replaced only on request
        rt.from_rank0(lambda: claim_run_dir(cfg["out"], cfg["resume"], cfg["overwrite"], held, "simclr.py"))
        with resumable(cfg["out"]):
            return _pretrain(cfg, folds_root, rt)


def _check_sizes(cfg: dict, n_images: int, batch: int, n_train: int) -> None:
    """On every rank alike, before any collective: a batch larger than the set (it would silently be
    the whole set) and a k-NN monitor over more neighbours than it has Train images (a majority vote)."""
    if n_images < batch:
        raise DataError(f"--batch-size {cfg['batch_size']}: fold {cfg['fold']} has {n_images} unlabeled images; "
                        "lower --batch-size, or add images with --extra")
    if cfg["knn_k"] > n_train:
        raise DataError(f"--knn-k {cfg['knn_k']}: the k-NN monitor has {n_train} Train images of fold {cfg['fold']} "
                        "to vote; use fewer neighbours")


def _pretrain(cfg: dict, folds_root: Path, rt: Runtime) -> dict:
    out, batch = Path(cfg["out"]), per_rank_batch(cfg["batch_size"], rt.world) * rt.world
    set_seed(cfg["seed"])
    classes = list_classes(folds_root)
    refuse_init_that_saw(cfg["init"], folds_root, cfg["fold"], classes)
    encoder = build_model(cfg["model"], len(classes), cfg["init"], cfg["input_size"])
    model = rt.module(SimCLR(encoder.backbone, encoder.num_features, cfg["proj_dim"]))
    files, splits, left_out = unlabeled_files(folds_root, cfg["fold"], cfg["extra"], cfg["include_test"])
    _check_sizes(cfg, len(files), batch, len(index_split(folds_root, cfg["fold"], "Train", classes)))
    partners = patient_partners(files, splits) if cfg["positives"] == "patient" else None
    config = dict(cfg, data_root=str(folds_root), classes=classes, n_images=len(files), world_size=rt.world,
                  backend=rt.backend, patient_pairs=int((partners[1] > 0).sum()) if partners else 0)
    size = resize_size(encoder.input_size)
    own = len(files) - splits.count("extra")  # the set's files come first, as README's figures decoded them
    images = torch.cat([decode_all(files[:own], size, desc="decode"),
                        decode_all(files[own:], size, desc="--extra", shrink=True)]).to(rt.device)
    monitor = Monitor.for_fold(folds_root, cfg["fold"], size, cfg["knn_k"], images) if rt.rank == 0 else None
    opt = make_optimizer(cfg["optimizer"], param_groups(model, cfg["weight_decay"]), cfg["lr"])
    steps = steps_per_epoch(len(files), batch, rt.world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg["epochs"] * steps, cfg["warmup_epochs"] * steps))
    start, history, knn_start = _start(out, config, files, left_out, encoder, model, opt, sched, monitor, rt)
    net, aug = rt.wrap(model), BatchAugment(encoder.input_size, SIMCLR_OPS)
    clock = SaveClock(cfg["save_every"])
    for epoch in range(start, cfg["epochs"]):
        t0 = time.perf_counter()
        row = dict(epoch=epoch + 1, lr=opt.param_groups[0]["lr"])
        row.update(pretrain_epoch(net, images, aug, opt, sched, rt, (cfg["seed"], epoch), batch, cfg["temperature"],
                                  partners))
        if not math.isfinite(row["loss"]):  # all-reduced: every rank stops together
            raise DataError(f"epoch {epoch + 1}: the NT-Xent loss is {row['loss']}, pre-training diverged "
                            f"({out / 'encoder.pt'} keeps the last saved epoch, if any); train again with --overwrite "
                            f"and a lower --lr (now {cfg['lr']})")
        if rt.rank == 0:
            last = epoch + 1 == cfg["epochs"]
            row["knn_acc"] = monitor(encoder, rt) if (epoch + 1) % cfg["eval_every"] == 0 or last else None
            row["epoch_s"] = time.perf_counter() - t0
            history.append(row)
            if clock.due(final=last):
                _save_epoch(out, config, encoder, model, opt, sched, history, knn_start)
            knn = f" | k-NN {row['knn_acc']:.3f}" if row["knn_acc"] is not None else ""
            print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {row['loss']:.4f}{knn} | {row['images_per_s']:.0f} img/s")
    if rt.world > 1:
        dist.barrier()
    if rt.rank == 0:
        print(closing_line(cfg, encoder.input_size))
    return history[-1] if history else {}


def closing_line(cfg: dict, input_size: int) -> str:
    """Where the encoder is, and the train.py command that fine-tunes it (on the fold it never saw the
    Test photos of, as the network it was trained as)."""
    flags = dict(data_root=cfg["data_root"], fold=cfg["fold"], model=cfg["model"], input_size=input_size,
                 init=Path(cfg["out"]) / "encoder.pt")
    command = " ".join(f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in flags.items())
    return f"wrote encoder.pt and the run's files to {cfg['out']}/; fine-tune it: python train.py {command}"


def _start(out: Path, config: dict, files, left_out: dict, encoder, model, opt, sched, monitor, rt: Runtime):
    """(first epoch, history, k-NN of the initial encoder): from last.pt with --resume, else a new run."""
    if config["resume"] and (out / "last.pt").is_file():
        ckpt = resume(out / "last.pt", config, RUNTIME_KEYS, DEFAULTS, encoder, opt, sched, projector=model.projector)
        return ckpt["epoch"], ckpt["history"], ckpt["metric"].get("knn_acc_start")
    if rt.rank != 0:
        return 0, [], None
    atomic_write(out / "config.json", to_json(config, indent=2))
    atomic_write(out / "files.txt", "".join(f"{p}\n" for p in files))
    knn_start = monitor(encoder, rt)
    pairs = f"; {config['patient_pairs']} with another photo of their patient" if config["patient_pairs"] else ""
    repeated = f", {left_out['repeated']} as images already in the set" if left_out["repeated"] else ""
    print(f"simclr: {len(files)} unlabeled images ({left_out['test']} --extra files left out as fold {config['fold']} "
          f"Test images{repeated}{pairs}); k-NN of the initial encoder: {knn_start:.3f}")
    return 0, [], knn_start


def _save_epoch(out: Path, config: dict, encoder, model, opt, sched, history: list, knn_start) -> None:
    """last.pt (for --resume), encoder.pt (for train.py --init), history.csv and loss.png."""
    row = history[-1]
    metric = {"loss": row["loss"], "knn_acc_start": knn_start,
              "knn_acc": next((h["knn_acc"] for h in reversed(history) if h["knn_acc"] is not None), None)}
    classes, epoch = config["classes"], row["epoch"]
    save_checkpoint(checkpoint_dict(encoder, "encoder", classes, config, epoch, metric,
                                    **training_state(opt, sched, history, None, projector=model.projector)),
                    out / "last.pt")
    save_checkpoint(checkpoint_dict(encoder, "encoder", classes, config, epoch, metric), out / "encoder.pt")
    write_history(history, HISTORY_FIELDS, out, CURVES, name="loss.png")


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEFAULTS
    at_least_1, at_least_0 = Number(int, 1), Number(float, 0)
    p = Parser(__doc__, __file__)
    p.add_argument("--data-root", default=d["data_root"])
    p.add_argument("--model", default=d["model"], help="any backbone of models/ (lenet, resnet18, ...)")
    p.add_argument("--init", default=d["init"], help="none, imagenet, or a .pt (or its run directory) to start from")
    p.add_argument("--input-size", type=INPUT_SIZE, default=d["input_size"], help="override the model's input size")
    p.add_argument("--fold", type=int, default=d["fold"], choices=[1, 2, 3, 4, 5],
                   help="its Train+Valid images are used; its Test images are held out")
    p.add_argument("--extra", action="append", default=d["extra"], metavar="DIR", help="more unlabeled images")
    p.add_argument("--include-test", action="store_true", help="also use the fold's Test images (leaks!)")
    p.add_argument("--positives", default=d["positives"], choices=["views", "patient"],
                   help="views: two views of one photo; patient: two photos of one patient where there are two "
                        "(MICLe, Azizi et al. 2021), else two views")
    p.add_argument("--epochs", type=at_least_1, default=d["epochs"])
    p.add_argument("--batch-size", type=at_least_1, default=d["batch_size"], help="pairs per step, over all ranks")
    p.add_argument("--lr", type=LEARNING_RATE, default=d["lr"],
                   help="SimCLR with LARS: 0.3 x batch/256")
    p.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=at_least_0, default=d["weight_decay"],
                   help="on weights; none on norms and biases")
    p.add_argument("--warmup-epochs", type=Number(int, 0), default=d["warmup_epochs"])
    p.add_argument("--temperature", type=Number(float, 0, open_low=True), default=d["temperature"])
    p.add_argument("--proj-dim", type=Number(int, 1, 16_384), default=d["proj_dim"],
                   help="width of the projection head's output (SimCLR: 128)")
    p.add_argument("--eval-every", type=at_least_1, default=d["eval_every"], help="k-NN monitor every N epochs")
    p.add_argument("--knn-k", type=at_least_1, default=d["knn_k"])
    p.add_argument("--seed", type=SEED, default=d["seed"])
    p.add_argument("--device", default=d["device"], choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=d["precision"], choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--memory-format", default=d["memory_format"], choices=MEMORY_FORMATS)
    p.add_argument("--out", default=d["out"])
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (never overwritten without it)")
    p.add_argument("--save-every", type=at_least_0, default=d["save_every"], metavar="SECONDS",
                   help="write last.pt, encoder.pt and history at most this often, and at the end (0: every epoch)")
    return p.parse_args(argv)


def run(args) -> dict:
    if args.resume and args.overwrite:
        raise DataError("--resume and --overwrite: continue the run in --out, or replace it, not both")
    return pretrain(dict(vars(args), model=args.model.lower()))  # as train.py: ResNet18 is resnet18


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
