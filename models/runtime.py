"""Where and how networks run, chosen once per script: device, precision, memory format, processes.

    with distributed(args.device, args.precision, args.memory_format) as rt:   # torchrun or not
        model = rt.module(model)
        logits = rt.forward(model, x)        # x to the device (channels_last), bf16 autocast

Also the seeds and the per-epoch index batches, shared by both training loops.
"""
import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.checkpoint import ModelError

PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass(frozen=True)
class Runtime:
    """This process: its device, bf16 autocast or fp32, channels_last or not, its rank among `world`."""
    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    rank: int = 0
    world: int = 1

    def autocast(self):
        """bf16 keeps fp32's exponent range, so no loss scaling is needed (and no GradScaler)."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward(self, model, x: torch.Tensor) -> torch.Tensor:
        """The one fast path for a batch: moved, laid out, run under autocast; float32 outputs."""
        with self.autocast():
            return model(self.batch(x)).float()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @property
    def backend(self) -> str | None:
        """The process group's backend under torchrun (nccl or gloo), None alone."""
        return dist.get_backend() if self.world > 1 and dist.is_initialized() else None

    def from_rank0(self, compute):
        """compute() on rank 0 only (e.g. it may write the synthetic set); every rank gets its value."""
        value = [compute() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(value)
        return value[0]


def select_runtime(device: str = "auto", precision: str = "auto", memory_format: str = "auto",
                   local_rank: int = 0, rank: int = 0, world: int = 1) -> Runtime:
    """`auto`: CUDA when there is one (each torchrun process takes its LOCAL_RANK's GPU), with bf16
    autocast and channels_last, which tensor cores prefer; fp32 and the default layout on CPU.
    Both can be asked for on CPU too (CPUs with AMX or AVX512-BF16 run bf16 convolutions faster)."""
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
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        dev = torch.device("cuda", local_rank)
    on_gpu = dev.type == "cuda"
    return Runtime(dev, bf16=precision == "bf16" or (precision == "auto" and on_gpu),
                   channels_last=memory_format == "channels_last" or (memory_format == "auto" and on_gpu),
                   rank=rank, world=world)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes (also on a machine that has a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed(device: str = "auto", precision: str = "auto", memory_format: str = "auto"):
    """The block's Runtime; under torchrun also its process group, joined after this rank has taken
    its own device (so NCCL never starts every rank on GPU 0) and left again on the way out."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    rt = select_runtime(device, precision, memory_format, local_rank, rank, world)
    if world > 1:
        extra = {"device_id": rt.device} if rt.device.type == "cuda" else {}
        dist.init_process_group(backend_for(rt.device), **extra)
    try:
        yield rt
    finally:
        if world > 1 and dist.is_initialized():
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
