"""Helpers shared by the optimizer tests (imported as ``_helpers``: pytest puts ``tests/`` on
``sys.path``)."""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def train_ce(
    net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int
) -> list[list[Tensor]]:
    """``steps`` cross-entropy steps on the fixed batch; returns each step's gradients."""
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        grads.append([p.grad.detach().clone() for p in net.parameters() if p.grad is not None])
    return grads


def checkpoint_round_trip(
    make_net: Callable[[], nn.Module],
    make_opt: Callable[[nn.Module], Any],
    x: Tensor | None,
    y: Tensor | None,
    *,
    before: int,
    after: int,
    train: Callable[[nn.Module, Any, int, int], Any] | None = None,
) -> tuple[nn.Module, Any, nn.Module, Any]:
    """Train ``before`` steps, save model and optimizer through ``torch.save`` /
    ``torch.load(weights_only=True)``, rebuild both from fresh objects and load; the step count
    and every block's tensors and meta (for the per-layer methods) must survive.  Then train
    both ``after`` more steps: the parameters must be bit-identical.  ``train(net, opt, steps,
    phase)`` (phase 0 before the save, 1 after) replaces the cross-entropy steps on ``x, y``.
    Returns ``(net, opt, net2, opt2)`` for the caller's method-specific checks."""
    if train is None:
        assert x is not None and y is not None

        def train(net: nn.Module, opt: Any, steps: int, phase: int) -> Any:
            return train_ce(net, opt, x, y, steps)

    net = make_net()
    opt = make_opt(net)
    train(net, opt, before, 0)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net2 = make_net()
    net2.load_state_dict(ck["model"])
    opt2 = make_opt(net2)
    opt2.load_state_dict(ck["opt"])
    if hasattr(opt, "steps_taken"):
        assert opt2.steps_taken == before
    for name, block in getattr(opt, "blocks", {}).items():
        other = opt2.blocks[name]
        assert set(block.tensors) == set(other.tensors), name
        for key, value in block.tensors.items():
            assert torch.equal(value, other.tensors[key]), (name, key)
        assert block.meta == other.meta, name
    train(net, opt, after, 1)
    train(net2, opt2, after, 1)
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    return net, opt, net2, opt2


# --------------------------------------------------------------------------- multi-process
def free_port() -> int:
    """A free TCP port on localhost (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, fn: Callable[..., None], world: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` CPU processes joined in a gloo process group
    (one thread each); ``fn`` must be a module-level function (it is pickled by name) and
    returns its results through files.  A failing rank fails the call."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)
