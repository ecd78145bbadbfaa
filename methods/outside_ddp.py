"""A loss term for the parts a method trains outside the model's DistributedDataParallel (WILSON's localizer,
SimFormer's SimNet): DDP never sees them, so their gradients and statistics are shared here."""
from __future__ import annotations

from torch import Tensor, nn

from methods.base import Batch, LossTerm
from utils.dist import average_gradients_and_share_buffers


class OutsideDDPSync(LossTerm):
    """Under torchrun: ``module``'s gradients are averaged over the ranks before each optimiser step and its
    statistics taken from rank 0 (as DDP does for the model); every rank keeps the same copy. No loss of its own."""

    name = "outside_ddp_sync"
    order = 21

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        return {}

    def after_backward(self, model: nn.Module, grad_scale: float = 1.0) -> dict[str, Tensor]:
        average_gradients_and_share_buffers(self.module)
        return {}
