"""The one checkpoint format: a dict that `torch.load(path, weights_only=True)` reads.

    {"model": name, "kind": "classifier" | "encoder", "state_dict": unwrapped weights,
     "classes": [...], "input_size": int, "fold": int, "epoch": int, "metric": {...},
     "config": {...}}  (+ in a classifier's best.pt "temperature", fitted on Valid, and "ood", what
     models/ood.py needs to score an image's distance from the Train images)
    + in last.pt: "optimizer", "scheduler", "history", "best" and the state of any other
      module the loop trains or keeps (SimCLR's "projector", the weights' "ema") for --resume.
"""
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from getData import FOLDS, UserError, atomic_path, index_split, origin_stem


class ModelError(UserError):
    """A wrong model name, weights, checkpoint or run-time setting."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def checkpoint_dict(model: nn.Module, kind: str, classes, config: dict, epoch: int, metric: dict,
                    **extra) -> dict:
    model = unwrap(model)
    state = model.backbone.state_dict() if kind == "encoder" else model.state_dict()
    return dict(model=model.name, kind=kind, state_dict=state, classes=list(classes),
                input_size=model.input_size, fold=config.get("fold"), epoch=epoch, metric=metric,
                config=config, **extra)


def save_checkpoint(ckpt: dict, path) -> None:
    """Write atomically: a killed process leaves the previous file, never half of a new one. Through a
    Python file, so that a full disk is an OSError (one line from atomic_path), not a C++ stream error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # torch's zip writer, closing, hides why the write stopped: a full
            if isinstance(e.__context__, (OSError, KeyboardInterrupt)):  # disk, or Ctrl-C mid-save
                raise e.__context__ from None
            raise


RUN_CHECKPOINTS = ("best.pt", "encoder.pt")  # what a run directory of train.py, of simclr.py, stands for


def find_checkpoints(path) -> dict:
    """What a user passes as --checkpoint: a .pt, or a run directory holding best.pt (train.py) or
    encoder.pt (simclr.py) -> {None: path}; a --fold all run directory -> {K: foldK/best.pt}."""
    path = Path(path)
    if path.is_file():
        return {None: path}
    for name in RUN_CHECKPOINTS:
        if (path / name).is_file():
            return {None: path / name}
    if not path.is_dir():
        raise ModelError(f"{path}: no such checkpoint or run directory")
    found = {k: path / f"fold{k}" / "best.pt" for k in FOLDS if (path / f"fold{k}" / "best.pt").is_file()}
    if not found:
        raise ModelError(f"{path}: no best.pt here or in fold1..5/; train first with `python train.py`")
    return found


def find_checkpoint(path, flag: str = "--checkpoint") -> Path:
    """One checkpoint: a .pt, or a run directory holding best.pt (or a SimCLR run's encoder.pt)."""
    found = find_checkpoints(path)
    if None not in found:
        raise ModelError(f"{path}: a --fold all run; give one fold's, e.g. {flag} {found[min(found)].parent}")
    return found[None]


def init_file(init: str) -> str:
    """--init as it is kept in a run's config: none, imagenet or a file; a run directory stands for
    its checkpoint, as with --checkpoint."""
    return init if init in ("none", "imagenet") or not Path(init).is_dir() else str(find_checkpoint(init, "--init"))


def photos_seen(ckpt: dict, folds_root, classes, paths) -> int:
    """How many of `paths` (photos of `folds_root`) a checkpoint of this project learned from: its fold's
    Train split, and a SimCLR encoder's Valid split too (simclr.py pretrains on both). MSLD's five
    folds are partitions of one set of photos: another fold's Valid and Test splits hold many."""
    if ckpt.get("fold") is None:
        return 0
    splits = ("Train", "Valid") if ckpt.get("kind") == "encoder" else ("Train",)
    learned = {origin_stem(p) for s in splits for p, _ in index_split(folds_root, int(ckpt["fold"]), s, classes)}
    return sum(origin_stem(p) in learned for p in paths)


def refuse_init_that_saw(init: str, folds_root: Path, fold: int, classes: list[str]) -> None:
    """--init from a network of this project that learned from another fold's photos: MSLD's folds
    share photos, so it has seen many of this fold's Valid and Test photos and the fold's scores would
    be optimistic (fold 1's SimCLR encoder saw 223 of fold 2's 246). Refused, with the count."""
    if init in ("none", "imagenet"):
        return
    ckpt = load_checkpoint(init, lazy=True)  # its fold and kind; the weights are build_model's to read
    held_out = [p for s in ("Valid", "Test") for p, _ in index_split(folds_root, fold, s, classes)]
    if ckpt.get("fold") != fold and (n := photos_seen(ckpt, folds_root, classes, held_out)):
        raise ModelError(f"--init {init}: learned from fold {ckpt['fold']}'s photos, {n} of fold {fold}'s "
                         f"{len(held_out)} Valid and Test photos among them; start fold {fold} from a network trained "
                         f"on fold {fold} (e.g. `python simclr.py --fold {fold}`), or from outside weights")


def load_checkpoint(path, lazy: bool = False) -> dict:
    """A checkpoint of this project (or a torchvision state_dict), refused in one line if it is not
    one. `lazy`: tensors mapped from the file, read only if used (to read a checkpoint's config)."""
    path = Path(path)
    if path.is_dir():
        inside = [path / name for name in RUN_CHECKPOINTS if (path / name).is_file()]
        raise ModelError(f"{path}: a folder, not a checkpoint file" + (f"; give {inside[0]}" if inside else ""))
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file (0 bytes), not a checkpoint; was it copied or downloaded whole?")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or an older one's pickle
        raise ModelError(f"{path}: not a PyTorch checkpoint (it starts {head!r}, not as torch.save writes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and head.startswith(b"PK"))
    except pickle.UnpicklingError:  # torch's text here suggests weights_only=False: never, for a stranger's file
        raise ModelError(f"{path}: not plain tensors and numbers (it may hold code, which is never run here), "
                         "or damaged") from None
    except Exception as e:  # a damaged archive; the unpickler raises many different types
        detail = next(iter(str(e).splitlines()), "") or type(e).__name__
        raise ModelError(f"{path}: not a PyTorch checkpoint, or damaged ({detail[:120]})") from None
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: expected a dict of weights, found {type(ckpt).__name__}")
    if "state_dict" in ckpt and "model" not in ckpt:  # pytorch/examples' or Lightning's: not ours, and not plain
        raise ModelError(f"{path}: another project's checkpoint (weights under 'state_dict', no model name); pass the "
                         "weights alone, saved with torch.save(checkpoint['state_dict'], 'weights.pt')")
    if "model" in ckpt:  # one of ours, not a raw state_dict
        _check_fields(ckpt, path)
    return ckpt


def _check_fields(ckpt: dict, path) -> None:
    """What every checkpoint of this project says of itself, of the types it writes, so that a file from
    elsewhere (a classmate's, edited by hand) is one line, not a traceback deep in a script. One
    without a config gets an empty one."""
    config = ckpt.setdefault("config", {})
    config_is_dict = isinstance(config, dict)
    config = config if config_is_dict else {}  # refused below; read safely until then
    refusals = [
        (not isinstance(ckpt.get("model"), str), f"its model name {ckpt.get('model')!r} is not a name"),
        (not isinstance(ckpt.get("state_dict"), dict), "it holds no weights"),
        (not config_is_dict, "its config is not a dict"),
        *((not (fold is None or type(fold) is int and fold in FOLDS), f"{where} {fold!r} is not one of 1..5")
          for where, fold in (("its fold", ckpt.get("fold")), ("its config's fold", config.get("fold")))),
        *((not isinstance(config.get(k), (str, type(None))), f"its config's {k} {config.get(k)!r} is not a name")
          for k in ("data_root", "exclude_class")),
    ]
    refuse_first(refusals, path)


def refuse_first(refusals, path) -> None:
    """One line naming the file for the first (refused, why) pair that holds."""
    if why := next((why for refused, why in refusals if refused), None):
        raise not_as_written(path, why)


def not_as_written(path, why: str) -> ModelError:
    """A checkpoint that is not as this project writes them: edited by hand, damaged, or a stranger's."""
    return ModelError(f"{path}: {why}; is it a checkpoint this project wrote, whole and unedited?")


# ----------------------------------------------------------------------------- resume
def training_state(opt, sched, history: list, best, **modules) -> dict:
    """What last.pt adds to the checkpoint so that --resume continues the same computation. No random
    state: every epoch seeds its own streams from (seed, epoch, rank) (models.runtime.epoch_generators)."""
    return dict(optimizer=opt and opt.state_dict(), scheduler=sched and sched.state_dict(), history=history,
                best=best, **{name: m.state_dict() for name, m in modules.items()})


def check_resumable(ckpt: dict, config: dict, runtime_keys, flags, path) -> None:
    """--resume continues the same computation: every setting but where and how it runs must match,
    flags (`flags`: their defaults) and what the run read off its data (class list, image counts)."""
    # a flag newer than the run (this code updated mid-run) had, for the run, its default
    saved = {**{k: v for k, v in flags.items() if k not in ckpt["config"]}, **ckpt["config"]}
    changed = [k for k in config if k not in runtime_keys and not _same(saved.get(k), config[k])]
    if not changed:
        return
    k, was, now = changed[0], saved.get(changed[0]), config[changed[0]]
    if k in flags:
        raise ModelError(f"{path}: --{k.replace('_', '-')} was {was!r}, now {now!r}; resume with the run's original "
                         "arguments")
    if _same(saved.get("data_root"), config.get("data_root")):  # the same folder, changed since: --data-root is no help
        also = "".join(f" or in its --{f.replace('_', '-')} folders" for f in ("extra", "aug_dir") if config.get(f))
        raise ModelError(f"{path}: the images in {config['data_root']}{also} have changed since the run began ({k} "
                         f"was {was!r}, now {now!r}); put them back as they were, or start the run afresh with "
                         "--overwrite")
    raise ModelError(f"{path}: the data differs from the run's ({k} was {was!r}, now {now!r}); resume with the "
                     f"dataset it trained on (--data-root {saved.get('data_root')})")


def _same(was, now) -> bool:
    """One setting, unchanged; a path (--init, --aug-dir, --extra) spelled another way, relative or
    absolute, is unchanged if it names the same file or folder."""
    if isinstance(was, list) and isinstance(now, list):
        return len(was) == len(now) and all(map(_same, was, now))
    try:
        return was == now or isinstance(was, str) and isinstance(now, str) and os.path.samefile(was, now)
    except OSError:  # not a path, or no longer there
        return False


def resume(path, config: dict, runtime_keys, flags, model: nn.Module, opt=None, sched=None, **modules) -> dict:
    """Restore the model, optimizer, scheduler and `modules` from last.pt; refuse a changed
    configuration. Returns the checkpoint (its "epoch", "history" and "best" say where to go on)."""
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, config, runtime_keys, flags, path)  # first: --ema added on resuming is a changed flag
    parts = {name: part for name, part in dict(optimizer=opt, scheduler=sched, **modules).items() if part is not None}
    if missing := [name for name in parts if name not in ckpt]:  # e.g. a best.pt copied over last.pt
        raise ModelError(f"{path}: holds no {missing[0]} state, so --resume cannot continue from it (best.pt and "
                         "encoder.pt keep weights only, last.pt the training state); start afresh with --overwrite")
    model = unwrap(model)
    load_state(model.backbone if ckpt["kind"] == "encoder" else model, ckpt["state_dict"], path, "its")
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    return ckpt


# ----------------------------------------------------------------------------- weights
def load_state(module: nn.Module, state: dict, path, what: str) -> None:
    """Every weight of `state` into `module`, or one line saying which do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise ModelError(f"{path}: {what} weights do not fit this model ({detail})") from None


def load_weights(model: nn.Module, ckpt: dict, path) -> str:
    """Initialise `model` (a Classifier) from one of our checkpoints or a raw torchvision state_dict.

    Returns a one-line description of what was loaded. A classifier whose head has another number
    of classes gives its backbone only; the head stays freshly initialised.
    """
    if "state_dict" in ckpt and "model" in ckpt:
        if ckpt["model"] != model.name:
            raise ModelError(f"{path}: checkpoint is for {ckpt['model']}, not {model.name}; "
                             f"pass --model {ckpt['model']}")
        state = ckpt["state_dict"]
        if ckpt.get("kind") == "encoder":
            load_state(model.backbone, state, path, "encoder")
            return f"backbone from SimCLR encoder {path}"
        if state.get("head.weight") is not None and state["head.weight"].shape != model.head.weight.shape:
            backbone = {k[9:]: v for k, v in state.items() if k.startswith("backbone.")}
            load_state(model.backbone, backbone, path, "backbone")
            return f"backbone from {path} (head re-initialised: {state['head.weight'].shape[0]} classes there)"
        load_state(model, state, path, "classifier")
        return f"all weights from {path}"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):  # e.g. a torchvision .pth file
        head = getattr(model, "torchvision_head", None)
        backbone = {k: v for k, v in ckpt.items() if not (head and k.startswith(head + "."))}
        load_state(model.backbone, backbone, path, "state_dict")
        return f"backbone from state_dict {path}"
    raise ModelError(f"{path}: neither a checkpoint of this project nor a state_dict")
