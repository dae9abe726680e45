"""Per-worker distributed helpers: the device, seeded random streams, parameter broadcast and gradient
averaging without DDP's hooks (the GAN recipes pass through a network more than once per step), and the
digest that shows every rank holds the same weights."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def worker_device() -> torch.device:
    import ray.train.torch  # deferred: Ray is imported only inside a worker

    return ray.train.torch.get_device()


def seed_everything(seed: int, *streams: int) -> None:
    """Seed torch from (seed, *streams): each epoch and rank gets its own reproducible stream, so a
    resumed run draws exactly the numbers an uninterrupted one would."""
    s = int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])
    torch.manual_seed(s)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_parameters(*modules: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (what DDP does when it wraps a model)."""
    if _world() == 1:
        return
    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, 0)


def average_gradients(*modules: torch.nn.Module) -> None:
    """Mean of the gradients over ranks, in one flat all-reduce (StyleGAN2-ADA's way). Unlike DDP's
    hooks it allows any number of passes through a module before one backward (the GAN baselines'
    cycle and latent terms do that). A parameter without a gradient counts as zero on that rank."""
    world = _world()
    if world == 1:
        return
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """Each tensor summed over ranks, in place (running statistics every rank must keep equal)."""
    if _world() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank (e.g. a stop decision: all ranks must leave the loop together)."""
    if _world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank (a collective: every rank must call it)."""
    world = _world()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return values


def parameters_sha256(modules: dict[str, torch.nn.Module]) -> str:
    """sha256 of the modules' parameters, by module and parameter name: equal on two ranks exactly when
    they hold the same weights. Buffers are left out: BatchNorm's running statistics are each rank's own
    (rank 0's are checkpointed)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        module = modules[name]
        module = module.module if hasattr(module, "module") else module  # DDP's wrapper: its names lack "module."
        for key, param in module.named_parameters():
            digest.update(f"{name}.{key}:{param.dtype}:{tuple(param.shape)}".encode())
            digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def no_parameter_grads(*modules: torch.nn.Module):
    """Use modules as fixed functions for a while (gradients reach their inputs, not their weights)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def random_flip(*images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random horizontal flip (p = 0.5 per example) on every given batch (A and B of a pair)."""
    flip = (torch.rand(len(images[0]), device=images[0].device) < 0.5)[:, None, None, None]
    return tuple(torch.where(flip, x.flip(3), x) for x in images)
