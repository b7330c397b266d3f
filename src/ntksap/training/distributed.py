"""torchrun / DDP plumbing: read RANK, LOCAL_RANK, WORLD_SIZE; one main process writes.

Launched plainly, everything here is a no-op (world size 1). Launched with
`torchrun --nproc_per_node=N -m ntksap train ...`, `setup()` joins the process group
(nccl on GPU, gloo on CPU) and pins each rank to its GPU.

Example:
    >>> env = setup()          # world_size 1 when not under torchrun
    >>> env.is_main
    True
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; choose the device.

    `device` None means cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, local_rank=local, world_size=world, device=dev)


def cleanup() -> None:
    """Leave the process group; every rank first waits for the others (a barrier), so no
    rank tears its connections down while a peer still uses them."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_masks(
    masks: dict[str, torch.Tensor] | None, shapes: dict[str, torch.Size], env: DistEnv
) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (bool tensors on CPU), in the order of `shapes`.

    Pruning may differ in the last bit across GPUs; broadcasting makes every rank train
    exactly the same sparse network.
    """
    if not env.distributed:
        assert masks is not None
        return dict(masks)
    out = {}
    for name, shape in shapes.items():
        buf = (
            masks[name].to(env.device, torch.uint8)
            if env.is_main and masks is not None
            else torch.empty(shape, dtype=torch.uint8, device=env.device)
        )
        dist.broadcast(buf, src=0)
        out[name] = buf.bool().cpu()
    return out


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's picklable `obj` on every rank (a decision only rank 0 can make, e.g. the
    state of the run folder it claimed). Pickle is safe here: the bytes come from rank 0 of
    the same job, never from a file."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Check that `device` exists on this machine before any work; None stays None (auto).

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad device {device!r}: {exc}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: unsupported device type; use cpu, cuda or mps")
    return dev
