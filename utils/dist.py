"""Distributed helpers for torchrun (env://); everything degrades to a single process without a launcher."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# A rank that dies leaves the others waiting in a collective; this bounds the wait so they stop with a message.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("CISS_DIST_TIMEOUT_MIN", "30")))


def init_distributed(device_type: str) -> tuple[int, int]:
    """Initialise the process group when launched by torchrun; returns (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return get_rank(), get_world_size()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # The store torchrun's agent shares with its workers outlives a restart of the group (--max_restarts): keys of
    # the failed attempt (gloo's addresses of processes now dead) would be read back by the new one. Each attempt
    # uses its own prefix; every process of a restarted group has the same TORCHELASTIC_RESTART_COUNT.
    store, rank, world_size = next(dist.rendezvous("env://", timeout=DEFAULT_TIMEOUT))
    store = dist.PrefixStore(f"ciss/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=DEFAULT_TIMEOUT)
    return get_rank(), get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients_and_share_buffers(module: torch.nn.Module) -> None:
    """Make a module trained outside DistributedDataParallel stay identical on every rank: its gradients averaged
    (one flat all-reduce) and its buffers (normalisation statistics) taken from rank 0, as DDP does for the model."""
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_PEER_FAILURE_MARKERS = ("closed by peer", "Connection reset", "Broken pipe", "timed out", "Timed out", "Timeout",
                         "communicator was aborted")


def peer_failure_message(exc: BaseException) -> str | None:
    """One line for an error raised in a collective because another rank failed, exited or timed out; None when
    ``exc`` is something else (or the run is not distributed)."""
    if not is_distributed():
        return None
    text = str(exc).strip()
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(m in text for m in _PEER_FAILURE_MARKERS)):
        return None
    first = text.splitlines()[0][:120] if text else type(exc).__name__
    return (f"rank {get_rank()} stopped: another process of the job failed, exited or timed out ({first}); the "
            "failing rank's own 'error:' line names the cause (timeout: CISS_DIST_TIMEOUT_MIN minutes)")


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
