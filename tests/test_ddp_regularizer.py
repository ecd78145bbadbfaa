"""Under DDP every rank holds the same regulariser statistics (the reference updated them on rank 0 only).

Two gloo processes train the real engine (train_one_epoch, DDP, the EWC/RW/PI terms) on different data; afterwards
each writes its criterion state, and the test compares them tensor by tensor.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT

pytestmark = pytest.mark.slow


def _flatten(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key in sorted(state):
            yield from _flatten(state[key], f"{prefix}/{key}")


def _worker(rank: int, port: int, method: str, out: str) -> None:
    import sys

    sys.path.insert(0, ROOT)
    from methods import StepContext, build_criterion
    from segmentation_module import make_model
    from train import EpochSetup, Precision, train_one_epoch
    from experiment.config import parse_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP requires
    model_old = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3]).eval()
    model_old.requires_grad_(False)
    model = make_model(backbone="resnet18", norm_act="abn", output_stride=16, classes=[3, 2])
    model.load_state_dict(model_old.state_dict(), strict=False)
    cfg = parse_config(["--method", method, "--reg_iterations", "2"])
    generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    loader = [(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 5, (2, 32, 32), generator=generator))
              for _ in range(4)]
    ctx = StepContext(step=1, classes=[3, 2], model=model, model_old=model_old, train_loader=loader, world_size=2)
    criterion = build_criterion(cfg, ctx)
    criterion.before_step(ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    setup = EpochSetup(criterion=criterion, optimizer=optimizer,
                       scheduler=torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=4),
                       scaler=torch.amp.GradScaler("cpu", enabled=False), precision=Precision("cpu", None),
                       n_old=3, n_new=2, log_interval=2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    train_one_epoch(ddp, model_old, loader, setup, step=1, epoch=0, device=torch.device("cpu"))
    torch.save(dict(_flatten(criterion.state_dict())), os.path.join(out, f"state{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["EWC", "RW", "PI"])
def test_regulariser_statistics_are_identical_on_every_rank(tmp_path, method):
    mp.spawn(_worker, args=(_free_port(), method, str(tmp_path)), nprocs=2, join=True)
    state0 = torch.load(tmp_path / "state0.pt", weights_only=True)
    state1 = torch.load(tmp_path / "state1.pt", weights_only=True)
    assert state0 and state0.keys() == state1.keys()
    assert any(float(v.abs().sum()) > 0 for v in state0.values())  # statistics were actually accumulated
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
