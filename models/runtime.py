"""Where and how networks run, chosen once per script: device, precision, memory format, processes.

    with distributed(args.device, args.precision, args.memory_format) as rt:   # torchrun or not
        model = rt.module(model)
        logits = rt.forward(model, x)        # x to the device (channels_last), bf16 autocast

Everything a script puts on a device is placed here: models and batches (`Runtime.module`,
`Runtime.batch`), the small random parameters of a training step (`send`: one copy, never a
wait) and constants (`constant`: made once per device). Also the seeds and the per-epoch index
batches, shared by both training loops.
"""
import contextlib
import functools
import itertools
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from getData import UserError
from models.checkpoint import ModelError

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = "auto: bf16 on a GPU with bf16 units (Ampere or newer), else fp32"  # select_runtime's rule
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class Runtime:
    """This process: its device, bf16 autocast or fp32, channels_last or not, its rank among `world`."""
    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def describe(self) -> dict:
        """What ran, for the config.json beside a script's outputs."""
        return dict(device=str(self.device), bf16=self.bf16, channels_last=self.channels_last)

    def autocast(self):
        """bf16 keeps fp32's exponent range, so no loss scaling is needed (and no GradScaler)."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=x.device.type == "cpu")  # never a non-blocking copy *to* the host
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward(self, model, x: torch.Tensor) -> torch.Tensor:
        """The one fast path for a batch: moved, laid out, run under autocast; float32 outputs."""
        with self.autocast():
            return model(self.batch(x)).float()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun with several processes, the model itself otherwise."""
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def backend(self) -> str | None:
        """The process group's backend under torchrun (nccl or gloo), None alone."""
        return dist.get_backend() if dist.is_initialized() else None

    def from_rank0(self, compute):
        """compute() on rank 0 only (e.g. it may write the synthetic set); every rank gets its value,
        or raises rank 0's user error (where the others, left waiting for a broadcast that never came,
        would die with gloo's "Connection reset by peer" traceback); rank 0 alone prints its line."""
        if self.world == 1:
            return compute()
        outcome = [None]
        if self.rank == 0:
            try:
                outcome = [(compute(), None)]
            except UserError as e:
                outcome = [(None, e)]
        dist.broadcast_object_list(outcome)
        value, error = outcome[0]
        if error is not None:
            error.quiet = self.rank != 0
            raise error
        return value


# ----------------------------------------------------------------------------- placing tensors
def send(tree, device):
    """CPU tensors -> the same tensors on `device`, in ONE host-to-device copy that does not block.

    A training step draws a few numbers per image on CPU generators (reproducible whatever the
    device). Sent one by one, each `.to(cuda)` of pageable memory waits for the GPU to drain its
    queue, so the host could never run ahead of the GPU. Here the tensors of `tree` (nested dicts,
    lists and tuples; anything else, such as host-side numbers, is passed through) are laid end to
    end in one buffer (pinned on CUDA), copied once without blocking, and viewed back as their own
    dtypes and shapes.
    """
    device = torch.device(device)
    leaves = list(_tensors(tree))
    if device.type == "cpu" or not leaves:
        return tree
    sizes = [t.numel() * t.element_size() for t in leaves]
    starts = [0, *itertools.accumulate(-(-n // 8) * 8 for n in sizes)]  # 8-byte aligned: any dtype views in place
    host = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    for t, a, n in zip(leaves, starts, sizes):
        host[a:a + n].view(t.dtype).copy_(t.reshape(-1))
    moved = host.to(device, non_blocking=True)
    return _rebuild(tree, iter([moved[a:a + n].view(t.dtype).view(t.shape) for t, a, n in zip(leaves, starts, sizes)]))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (dict, list, tuple)):
        for v in tree.values() if isinstance(tree, dict) else tree:
            yield from _tensors(v)


def _rebuild(tree, moved):
    if isinstance(tree, torch.Tensor):
        return next(moved)
    if isinstance(tree, dict):
        return {k: _rebuild(v, moved) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, moved) for v in tree)
    return tree


@functools.lru_cache(maxsize=64)
def constant(values: tuple, device: torch.device, dtype: torch.dtype, shape: tuple = (-1,)) -> torch.Tensor:
    """A small constant tensor made once per device and dtype (e.g. the normalisation mean): building
    it on every call would be a host-to-device copy in every step."""
    return torch.tensor(values, dtype=dtype).view(shape).to(device)


BF16_UNITS = {"cuda": "compute capability 8.0 or newer", "cpu": "AVX512-BF16 or AMX"}


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: GPUs from Ampere (sm80) on, x86 CPUs with AVX512-BF16 or AMX. Elsewhere (a
    T4 or V100, an AVX2 CPU) PyTorch emulates it: ResNet-18 trained at 3 images/s in bf16 against
    45 in fp32 on an AVX2 CPU (README, Speed). Other CPUs (ARM) are counted as not native."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private to torch.cpu: one missing counts as no
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def select_runtime(device: str = "auto", precision: str = "auto", memory_format: str = "auto",
                   local_rank: int = 0, rank: int = 0, world: int = 1, deterministic: bool = False,
                   quiet: bool = False) -> Runtime:
    """`auto`: CUDA when there is one (each torchrun process takes its LOCAL_RANK's GPU), with bf16
    autocast and channels_last, which tensor cores prefer; fp32 and the default layout on CPU.
    Both can be asked for on CPU too (CPUs with AMX or AVX512-BF16 run bf16 convolutions faster).
    Where the hardware has no bf16 units (`native_bf16`), `auto` keeps fp32 and an explicit `bf16`
    gets a one-line note (from rank 0, unless `quiet`: a process whose parent has said it): PyTorch
    emulates it there, many times slower than fp32.
    `deterministic`: cuDNN's and PyTorch's deterministic kernels instead of the fastest ones, so that
    a run on CUDA repeats bit for bit (and `--resume` continues exactly); slower."""
    if device not in ("auto", "cpu", "cuda"):
        raise ModelError(f"--device {device}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available; use --device cpu")
    if precision not in PRECISIONS:
        raise ModelError(f"--precision {precision}: use {', '.join(PRECISIONS)}")
    if memory_format not in MEMORY_FORMATS:
        raise ModelError(f"--memory-format {memory_format}: use {', '.join(MEMORY_FORMATS)}")
    if device == "cpu" or not torch.cuda.is_available():
        dev = torch.device("cpu")
    else:
        if local_rank >= torch.cuda.device_count():
            raise ModelError(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} GPU(s); "
                             "lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    on_gpu, native = dev.type == "cuda", native_bf16(dev)
    bf16 = precision == "bf16" or (precision == "auto" and on_gpu and native)
    if bf16 and not native and rank == 0 and not quiet:
        print(f"note: this {'GPU' if on_gpu else 'CPU'} has no bf16 units ({BF16_UNITS[dev.type]}): PyTorch "
              "emulates --precision bf16 here, which can be many times slower than --precision fp32")
    set_numerics(bf16, deterministic)
    channels_last = memory_format == "channels_last" or (memory_format == "auto" and on_gpu)
    return Runtime(dev, bf16=bf16, channels_last=channels_last, rank=rank, world=world)


def set_numerics(bf16: bool, deterministic: bool = False) -> None:
    """What fp32 and determinism mean on CUDA, said once for the whole process.

    fp32 means IEEE float32 for every convolution and matrix product: cuDNN's default would run
    convolutions in TF32 (10-bit mantissa) while matrix products stay fp32. Under bf16 autocast
    convolutions and matrix products run in bf16 anyway, and cuDNN may use TF32 for what autocast
    keeps in fp32. Input sizes are fixed, so cuDNN benchmarks and picks the fastest kernels, unless
    `deterministic`: then only deterministic kernels (PyTorch warns where an op has none)."""
    torch.backends.cudnn.allow_tf32 = bf16  # the legacy flags: PyTorch 2.9+ refuse mixing them with the new API
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic workspace
    if deterministic or torch.are_deterministic_algorithms_enabled():  # the call imports inductor: 1.5 s
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes (also on a machine that has a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed(device: str = "auto", precision: str = "auto", memory_format: str = "auto",
                deterministic: bool = False):
    """The block's Runtime. Under torchrun (even with one process) also its process group, joined
    after this rank has taken its own device (so NCCL never starts every rank on GPU 0) and left
    again on the way out."""
    launched = "RANK" in os.environ  # torchrun sets it, also with --nproc_per_node=1
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    rt = select_runtime(device, precision, memory_format, local_rank, rank, world, deterministic)
    if launched:
        extra = {"device_id": rt.device} if rt.device.type == "cuda" else {}
        dist.init_process_group(backend_for(rt.device), **extra)
    try:
        yield rt
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- seeds and batches
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device); DataLoader workers via seed_worker."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: derive NumPy/random seeds from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys: int) -> int:
    """An independent 63-bit seed for a stream named by integers, e.g. (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def epoch_generators(key: tuple, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """The random streams of one pass over the data, named by `key` (e.g. (seed, epoch)): the batch
    order (the same on every rank), this rank's augmentation draws, and torch's global generators
    (dropout, stochastic depth) seeded for (key, rank). Nothing random carries over from one pass to
    the next, so `--resume` needs no saved random state, on any number of devices."""
    torch.manual_seed(derived_seed(*key, rank + 1, 2**31))  # CPU and every CUDA device: this rank's dropout
    return (torch.Generator().manual_seed(derived_seed(*key)),
            torch.Generator().manual_seed(derived_seed(*key, rank + 1)))


def per_rank_batch(batch_size: int, world: int) -> int:
    """Each rank's share of a global batch. Like DistributedSampler, every rank gets an equal share:
    a global batch that does not divide by the number of processes is rounded down to one that does
    (7 on 2 ranks: batches of 6, 3 per rank; an epoch's leftover images are dropped, as with
    drop_last). Fewer than two images per rank is refused: BatchNorm needs two, and NT-Xent needs a
    negative."""
    if batch_size < 2 * world:
        raise ModelError(f"--batch-size {batch_size}: {world} process(es) need at least {2 * world} "
                         "(two images per process); raise --batch-size")
    return batch_size // world


def batch_indices(n: int, batch_size: int, gen: torch.Generator, sample_weights=None, drop_last=True):
    """Index batches for one epoch over n images: a permutation, or weighted draws with replacement
    (a class-balanced sampler). drop_last: every step sees the same batch size, and BatchNorm never
    sees a batch of one."""
    if sample_weights is not None:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=gen)
    else:
        order = torch.randperm(n, generator=gen)
    stop = n - batch_size + 1 if drop_last else n
    for i in range(0, max(stop, 0), batch_size):
        yield order[i:i + batch_size]


def shard(idx: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """This rank's equal share of a global batch of indices (see per_rank_batch)."""
    per = len(idx) // rt.world
    return idx[rt.rank * per:(rt.rank + 1) * per]
