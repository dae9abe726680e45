"""What a training loop does when a loss turns NaN or Inf.

`NonFiniteConfig.action` decides: `skip` drops that update and goes on, `rollback` returns the networks,
optimisers and loop state to the last epoch-end checkpoint (kept in memory, the same tensors that were
saved) and replays from there with a fresh random stream, `fail` stops the run with one clear line. Every
rank takes the same decision: the finiteness flag is all-reduced, so one rank's NaN stops the update on
all of them. However configured, `max_consecutive` bad steps in a row (or `max_rollbacks` rollbacks)
stop the run, and `report_epoch` never writes a checkpoint holding a non-finite weight.

`inject_at_steps` turns the loss at those optimiser steps into NaN, once each (kept in the checkpointed
state, so a replay after a rollback does not hit it again): the fault drill that tests this guard.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from step_ray.checkpoints import unwrap
from step_ray.engine.distributed import average_gradients


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/Inf loss (action=fail, or too many in a row)."""


@dataclass(frozen=True)
class NonFiniteConfig:
    action: Literal["skip", "rollback", "fail"] = "skip"
    max_consecutive: int = 10  # this many non-finite steps in a row stop the run, whatever the action
    max_rollbacks: int = 3
    inject_at_steps: tuple[int, ...] = ()  # fault drill: NaN loss at these optimiser steps (once each)

    def __post_init__(self):
        if self.max_consecutive < 1 or self.max_rollbacks < 0:
            raise ValueError("nonfinite.max_consecutive must be >= 1 and max_rollbacks >= 0")
        if any(s < 0 for s in self.inject_at_steps):
            raise ValueError("nonfinite.inject_at_steps must be optimiser steps >= 0")


def _all_ranks_finite(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = torch.tensor([0.0 if flag else 1.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item() == 0.0)


class NonFiniteGuard:
    """One per training loop. Its record lives in `state["nonfinite"]` (checkpointed with the rest)."""

    def __init__(self, cfg: NonFiniteConfig, stage: str, rank: int = 0):
        self.cfg, self.stage, self.rank = cfg, stage, rank
        self.consecutive = 0
        self.epoch_count = 0
        self.rollback_pending = False
        self._snapshot: tuple[dict, dict, dict] | None = None

    @staticmethod
    def record(state: dict[str, Any]) -> dict[str, Any]:
        return state.setdefault("nonfinite", {"skipped": 0, "rollbacks": 0, "injected": [], "events": []})

    def inject(self, loss: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        step, rec = state["step"], self.record(state)
        if step in self.cfg.inject_at_steps and step not in rec["injected"]:
            rec["injected"].append(step)
            return loss * float("nan")
        return loss

    def finite(self, state: dict[str, Any], what: str, *losses: torch.Tensor) -> bool:
        """True when every loss is finite on every rank. Otherwise the event is recorded and, per the
        action, the caller skips this update (False), a rollback is flagged, or the run stops."""
        ok = _all_ranks_finite(all(bool(torch.isfinite(x.detach()).all()) for x in losses))
        if ok:
            return True
        rec = self.record(state)
        self.consecutive += 1
        self.epoch_count += 1
        action = self.cfg.action
        if self.consecutive >= self.cfg.max_consecutive:
            action = "fail"
        elif action == "rollback" and rec["rollbacks"] >= self.cfg.max_rollbacks:
            action = "fail"
        rec["events"].append({"step": state["step"], "epoch": state["epoch"], "loss": what, "action": action})
        where = f"[{self.stage}] non-finite {what} at step {state['step']} (epoch {state['epoch']})"
        if action == "fail":
            raise NonFiniteLossError(f"{where}: stopping ({self.consecutive} in a row; nonfinite.action="
                                     f"{self.cfg.action}, max_consecutive={self.cfg.max_consecutive}, "
                                     f"rollbacks {rec['rollbacks']}/{self.cfg.max_rollbacks}); the last checkpoint "
                                     "holds finite weights")
        if action == "rollback":
            self.rollback_pending = True
        else:
            rec["skipped"] += 1
        if self.rank == 0:
            print(f"{where}: {'rolling back to the last checkpoint' if action == 'rollback' else 'update skipped'}",
                  flush=True)
        return False

    def step_done(self, finite: bool) -> None:
        if finite:
            self.consecutive = 0

    def take_epoch_count(self) -> int:
        n, self.epoch_count = self.epoch_count, 0
        return n

    # rollback: an in-memory copy of what the last checkpoint holds

    def remember(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any], state: dict[str, Any]) -> None:
        if self.cfg.action != "rollback":
            return
        def to_cpu(sd):
            return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in sd.items()}

        self._snapshot = ({k: to_cpu(unwrap(m).state_dict()) for k, m in modules.items()},
                          {k: copy.deepcopy(o.state_dict()) for k, o in optimizers.items()},
                          copy.deepcopy(state))

    def restore(self, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any],
                state: dict[str, Any]) -> dict[str, Any]:
        """The remembered modules, optimisers and state; the non-finite record carries on (one more rollback)."""
        assert self._snapshot is not None, "remember() before the first step"
        weights, opt_states, saved = self._snapshot
        for k, m in modules.items():
            unwrap(m).load_state_dict(weights[k])
        for k, o in optimizers.items():
            o.load_state_dict(opt_states[k])
        record = self.record(state)
        record["rollbacks"] += 1
        new_state = copy.deepcopy(saved)
        new_state["nonfinite"] = record
        self.rollback_pending = False
        self.consecutive = 0
        return new_state


def guarded(guard: NonFiniteGuard | None, state: dict[str, Any] | None, what: str, loss: torch.Tensor) -> bool:
    """May the update from `loss` be applied? Yes without a guard; with one, when the loss is finite on
    every rank (otherwise the guard has recorded it and acted: skip, flag a rollback, or stop)."""
    return guard is None or guard.finite(state, what, loss)


def guarded_update(guard: NonFiniteGuard | None, state: dict[str, Any] | None, what: str, loss: torch.Tensor,
                   optimizers, modules, amp=None) -> bool:
    """One guarded optimiser update: zero the optimisers' gradients and, when `loss` is finite on every
    rank (or there is no guard), backward (through `amp`'s scaler when it has one), average the gradients
    of `modules` over ranks, step every optimiser. False when the guard dropped the update (check
    `guard.rollback_pending`: then the step must end here)."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if not guarded(guard, state, what, loss):
        return False
    (amp.backward if amp is not None else torch.Tensor.backward)(loss)
    average_gradients(*modules)
    for opt in optimizers:
        amp.step(opt) if amp is not None else opt.step()
    return True


def seed_streams(epoch: int, rank: int, state: dict[str, Any]) -> tuple[int, ...]:
    """The random streams of an epoch: a replay after a rollback draws new numbers (the same ones would
    likely diverge again); without rollbacks the streams are those of an uninterrupted run."""
    rollbacks = state.get("nonfinite", {}).get("rollbacks", 0)
    return (epoch, rank, rollbacks) if rollbacks else (epoch, rank)


def assert_finite_weights(modules: dict[str, torch.nn.Module], where: str) -> None:
    """Never save a checkpoint whose weights hold a NaN or Inf."""
    for name, module in modules.items():
        for key, tensor in unwrap(module).state_dict().items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteLossError(f"{where}: {name}.{key} holds NaN/Inf; no checkpoint written "
                                         "(the previous checkpoint is the last good one)")
