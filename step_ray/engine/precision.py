"""Mixed precision and activation checkpointing for a training loop, applied from outside the models."""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                           checkpoint_wrapper)


class MixedPrecision:
    """`precision` = fp32 | bf16 | fp16 for one training loop: autocast around forwards and, for fp16, a
    gradient scaler around backward and the optimiser steps. GPU only: on a CPU worker it is plain fp32
    (CPU autocast would change the numbers without saving memory worth having)."""

    def __init__(self, precision: str, device: torch.device):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device_type = torch.device(device).type
        self.enabled = precision != "fp32" and self.device_type == "cuda"
        self.dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and precision == "fp16" else None
        self.name = precision if self.enabled else "fp32"

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the gradients are averaged over ranks: an inf on any rank is then on every rank, so all
        ranks skip the same steps and keep the same scale."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume exactly (the fp16 loss scale)."""
        return {"grad_scaler": self.scaler} if self.scaler is not None else {}


def checkpoint_activations(module: torch.nn.Module, is_block) -> torch.nn.Module:
    """Recompute the activations inside every submodule `is_block(m)` accepts during backward instead of
    storing them (torch's checkpoint wrapper, non-reentrant). Applied from outside: the model files stay
    plain. State dicts keep their keys, so checkpoints load with or without it."""
    apply_activation_checkpointing(
        module, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=is_block)
    return module
