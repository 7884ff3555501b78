"""Where and in which precision networks run: chosen once per script."""
import contextlib
import os

import torch
import torch.distributed as dist

from models.checkpoint import ModelError


def select_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` takes CUDA when there is one; under torchrun each process takes its LOCAL_RANK's GPU."""
    if spec not in ("auto", "cpu", "cuda"):
        raise ModelError(f"--device {spec}: use auto, cpu or cuda")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA device is available; use --device cpu")
    if spec == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed: bf16 keeps fp32's exponent range); fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model; on CUDA use channels_last, which tensor cores prefer for convolutions."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
