"""GPU readiness without a GPU: every registered optimizer takes its steps (first, statistics,
refresh and preconditioning steps: every schedule at 1) with ``torch.set_default_device("meta")``
active while the model and the data live on the CPU.  A tensor made without an explicit device
(``torch.zeros(n)``, ``torch.eye(n)``, ``torch.tensor(x)``) lands on ``meta`` and the first op
that mixes it with a CPU tensor fails, exactly where it would put a CPU tensor beside CUDA ones.
Also one step of each under CPU bf16 autocast, and the batch transfer with ``non_blocking``."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from ngbench.optimizers import build_optimizer, get_spec, list_optimizers
from torch import nn
from torch.overrides import TorchFunctionMode

#: schedule options set to 1 so that one step runs every phase
EVERY_STEP = ("stat_every", "inv_every", "precondition_frequency", "scale_every")


class Net(nn.Module):
    """Conv2d, Embedding, a Linear over a token sequence and a plain Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 4)
        self.seq = nn.Linear(4, 4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, ids):
        h1 = F.relu(self.conv(x)).mean((2, 3))
        h2 = torch.tanh(self.seq(self.emb(ids))).mean(1)
        return self.fc(torch.cat([h1, h2], 1))


def _batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(6, 3, 5, 5, generator=g), torch.randint(0, 10, (6, 4), generator=g),
            torch.randint(0, 3, (6,), generator=g))


#: option values whose code paths the defaults do not reach
VARIANTS = [("kfac", {"approx": "reduce"}), ("kfac", {"damping_form": "inverse"}),
            ("ekfac", {"scalings": "ra"}), ("mbf", {"linear_block": "shared_input"})]
CASES = [(n, {}) for n in list_optimizers()] + VARIANTS
IDS = [n + "".join(f":{k}={v}" for k, v in hp.items()) for n, hp in CASES]


def _build(name: str, model: nn.Module, **extra):
    params = get_spec(name).hparams
    hp = {k: 1 for k in EVERY_STEP if k in params}
    return build_optimizer(name, model, lr=1e-3, **hp, **extra)


def _tensors(opt):
    """Every tensor in the optimizer's state and its curvature blocks."""
    out = []
    stack = [opt.state, *(b.tensors for b in getattr(opt, "blocks", {}).values())]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return out


class _MetaMade(TorchFunctionMode):
    """Records every torch call that returns a ``meta`` tensor, so a failure that a broad
    ``except`` swallows (and a fallback hides) is still seen."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_meta:
            self.made.append(getattr(func, "__name__", str(func)))
        return out


@contextmanager
def default_device(device: str):
    torch.set_default_device(device)
    try:
        with _MetaMade() as rec:  # pushed above the default-device mode: sees its results
            yield rec
    finally:
        torch.set_default_device(None)


def steps_on_meta(opt, model, batch, n: int = 3) -> None:
    """``n`` training steps with the default device set to ``meta`` around each step; fails
    when any step made a tensor on the default device."""
    x, ids, y = batch
    for _ in range(n):
        with default_device("meta") as rec:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, ids), y).backward()
            opt.step()
        assert not rec.made, f"tensors made without an explicit device by: {rec.made}"


@pytest.mark.parametrize(("name", "extra"), CASES, ids=IDS)
def test_no_tensor_without_an_explicit_device(name, extra):
    torch.manual_seed(0)
    model = Net()
    opt = _build(name, model, **extra)
    steps_on_meta(opt, model, _batch())
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    # a broad ``except`` could swallow the failure; no state may sit on the default device
    bad = [tuple(t.shape) for t in _tensors(opt) if t.device.type != "cpu"]
    assert not bad, f"{name}: state tensors on the default device: {bad}"


class DevicelessSGD(torch.optim.SGD):
    """A deliberately wrong optimizer: its buffer is made without ``device=``."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                buf = torch.zeros(p.shape)  # BUG: default device
                p.data.add_(buf + p.grad, alpha=-group["lr"])


def test_meta_default_device_catches_a_deviceless_tensor():
    model = Net()
    with pytest.raises((RuntimeError, NotImplementedError, AssertionError)):
        steps_on_meta(DevicelessSGD(model.parameters(), lr=0.1), model, _batch(), n=1)
    steps_on_meta(torch.optim.SGD(model.parameters(), lr=0.1), model, _batch(), n=1)  # fine


@pytest.mark.parametrize("name", list_optimizers())
def test_one_step_under_cpu_bf16_autocast(name):
    """The hooks see bf16 activations and output gradients; statistics and the update must
    stay finite and the parameters keep their float32 dtype."""
    torch.manual_seed(0)
    model = Net()
    opt = _build(name, model)
    x, ids, y = _batch()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x, ids), y)
        loss.backward()
        opt.step()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_batch_transfer_non_blocking_on_cpu():
    from ngbench.tasks.base import Task

    batch = {"x": torch.randn(2, 3), "pair": (torch.ones(2), [torch.zeros(1)]), "n": 3}
    moved = Task.to_device(Task.__new__(Task), batch, torch.device("cpu"))
    assert torch.equal(moved["x"], batch["x"]) and moved["n"] == 3
    assert isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    if torch.cuda.is_available():  # pinned host memory needs an accelerator
        pinned = batch["x"].pin_memory()
        assert pinned.is_pinned()
