"""``ngbench bench``: optimizer step overhead on a fixed model, all optimizers in one process.

The measurement of DESIGN.md "Benchmarking and scoring" (the step-overhead comparison reported
for K-FAC by Martens & Grosse 2015 and for KAISA by Pauloski et al. 2021): the *mean* step time
(forward, backward and optimizer step; a mean includes the periodic refresh steps that a median
hides) relative to SGD with momentum and to AdamW on the same model in the same process, split
into phases, with peer implementations (ASDL K-FAC/EKFAC, pytorch-optimizer's Shampoo) side by
side.  Every optimizer trains its own copy of the model on the same fixed batch; they run
interleaved in rounds of ``--chunk`` steps so that load changes on a shared machine hit all alike.
``--repeat N`` repeats the whole measurement with fresh models and reports the median of the N
means (each still includes the refreshes) with the range of the ratios to SGD.

``--task NAME[:key=value...]`` benchmarks a task's tiny flavor instead (its real model, loss
and first training batch: autoencoder, resnet, transformer, schnet, recommender with
``:model=dlrm`` for DLRM); ``--device``/``--autocast`` run it on an accelerator.  Every row also
gets the predicted floor of :mod:`runners.costmodel` (``floor_ratio``, ``excess_phase``) and the
optimizer's state memory beside SGD's momentum and AdamW's moments.

    ngbench bench --model small_cnn --optimizers sgd,adamw,kfac --peers asdl,pytorch_optimizer
    ngbench bench --task transformer --optimizers kfac,kfac:approx=reduce,shampoo
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bench_args

__all__ = ["MODELS", "PEERS", "main", "run_bench"]

BASELINES = ("sgd", "adamw")
#: learning rates on the fixed random batch (the step time does not depend on them)
LR = {"adamw": 1e-3, "soap": 1e-3, "shampoo": 1e-3}
DEFAULT_LR = 1e-2


# ----------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """The benchmark CNN of DESIGN.md: 3×32×32 -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = x.mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


@dataclass(frozen=True)
class BenchModel:
    build: Callable[[], nn.Module]
    batch: int
    data: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    loss_type: str  # for ASDL: cross_entropy | mse (the empirical Fisher ignores it)


def _cnn_data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ae_data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.rand(n, 784, generator=g)
    return x, x


def _ae_model() -> nn.Module:
    from ngbench.tasks.autoencoder import Autoencoder

    return Autoencoder([784, 128, 32])


def _bce_sum(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy summed over pixels, mean over the batch (``reduction`` as in
    ``torch.nn.functional``; ASDL calls the loss with ``reduction="sum"``)."""
    per = F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(1)
    return per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per


def _imagenet_data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 1000, (n,), generator=g)


def _resnet50() -> nn.Module:
    from ngbench.tasks.resnet import build_resnet

    return build_resnet("resnet50", num_classes=1000)


_MODELS = {
    "small_cnn": BenchModel(SmallCNN, 128, _cnn_data, F.cross_entropy, "cross_entropy"),
    "autoencoder": BenchModel(_ae_model, 250, _ae_data, _bce_sum, "mse"),
    # torchvision ResNet-50 on a synthetic ImageNet batch (3x224x224, 1000 classes): an
    # accelerator workload (scripts/gpu_check.sh); on a CPU one step takes seconds
    "resnet50": BenchModel(_resnet50, 128, _imagenet_data, F.cross_entropy, "cross_entropy"),
}
#: ``--model`` choices: their names and order live in :mod:`runners.bench_args` (no torch)
MODELS = {name: _MODELS[name] for name in bench_args.MODEL_NAMES}


class BenchError(ValueError):
    """A bad ``--task``/``--peers`` combination; the message names the flag and the fix."""


@dataclass
class Workload:
    """What one benchmark trains: a fresh model per optimizer, one fixed batch, its loss."""

    label: str
    build: Callable[[], nn.Module]
    batch: Any
    loss: Callable[[nn.Module, Any], Tensor]
    batch_size: int
    spec: BenchModel | None = None  # the --model entry (peers need its separate loss)
    task: Any = None  # the --task's Task object (its evaluate(), for scripts/gpu_check.py)


def model_workload(name: str, batch_size: int | None, seed: int,
                   device: torch.device) -> Workload:
    spec = MODELS[name]
    batch = int(batch_size or spec.batch)
    x, y = spec.data(batch, torch.Generator().manual_seed(seed))
    x, y = x.to(device), y.to(device)

    def build() -> nn.Module:
        return spec.build().to(device)

    return Workload(name, build, (x, y), lambda m, b: spec.loss(m(b[0]), b[1]), batch, spec)


#: ``--task`` names: the task registry's (configs/task/<name>.yaml, tiny flavor)
def _task_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def task_workload(text: str, batch_size: int | None, seed: int,
                  device: torch.device) -> Workload:
    """The tiny flavor of a task (``name[:key=value...]`` sets ``task.<key>``): its model,
    loss and first training batch of epoch 0 (the train config's batch size by default)."""
    from ngbench.tasks import build_task
    from omegaconf import OmegaConf

    name, overrides = parse_variant(text)
    path = CONFIG_DIR / "task" / f"{name}.yaml"
    if not path.exists():
        raise BenchError(f"--task {name!r} is not valid; valid choices: "
                         + ", ".join(_task_names()))
    import dataclasses

    from ngbench.tasks.config import TASK_CONFIGS

    keys = [f.name for f in dataclasses.fields(TASK_CONFIGS[name]) if f.name != "name"]
    for key in overrides:
        if key not in keys:
            raise BenchError(f"--task {text!r}: task.{key} is not a key of task {name!r} "
                             f"(tasks/config.py); valid keys: {', '.join(keys)}")
    # the config `ngbench train task=<name>` composes (schema defaults, preset, train budget)
    from hydra import compose, initialize_config_dir

    from . import train  # noqa: F401  (registers the schemas and resolvers)

    pairs = [f"task.{pair}" for pair in text.split(":")[1:]]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=[f"task={name}", "optimizer=sgd", *pairs])
    # a config's keys are strings
    resolved = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    task = build_task(resolved["task"])
    batch = int(batch_size or resolved["train"]["batch_size"])
    first = next(iter(task.train_batches(epoch=0, batch_size=batch, seed=seed)))
    data = task.to_device(first, device)

    def build() -> nn.Module:
        return task.build_model().to(device)

    def loss(model: nn.Module, b: Any) -> Tensor:
        return task.loss(model, b)[0]

    return Workload(text, build, data, loss, batch, task=task)


# ----------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """One optimizer (or peer) with its own model copy; ``step()`` is one timed training step."""

    name: str
    model: nn.Module
    step_fn: Callable[[], dict[str, float]]
    optimizer: Any
    curvature: bool = False
    freq: int = 1
    wall: float = 0.0
    cpu: float = 0.0
    steps: int = 0
    split: dict[str, float] = field(default_factory=dict)
    phase0: dict[str, float] = field(default_factory=dict)
    peak_bytes: int = 0
    error: str | None = None

    def phases(self) -> dict[str, float]:
        return _instrumented(self.optimizer)[0]

    def state_bytes(self) -> int:
        """Every distinct tensor the optimizer holds (its ``state`` and, for the per-layer
        methods, the blocks' tensors), counted once."""
        seen: dict[tuple, int] = {}
        _collect(getattr(self.optimizer, "state", {}), seen)
        for block in getattr(self.optimizer, "blocks", {}).values():
            _collect(getattr(block, "tensors", {}), seen)
        return sum(seen.values())


def _collect(state: Any, seen: dict[tuple, int]) -> None:
    if isinstance(state, Tensor):
        key = (state.device.type, state.untyped_storage().data_ptr(), state.storage_offset(),
               state.shape)
        seen[key] = state.numel() * state.element_size()
    elif isinstance(state, dict):
        for v in state.values():
            _collect(v, seen)
    elif isinstance(state, (list, tuple)):
        for v in state:
            _collect(v, seen)


def _instrumented(opt: Any) -> tuple[dict[str, float], dict[str, int], int]:
    """``(phase seconds, memory bytes per kind, refresh period)`` of an optimizer that is
    :class:`~optimizers.capabilities.Instrumented`; a plain ``torch.optim.Optimizer`` (SGD,
    AdamW) has no phases, its state bytes and no refresh."""
    from ngbench.optimizers.capabilities import Instrumented

    if isinstance(opt, Instrumented):
        memory = {k: int(v) for k, v in opt.memory_usage().items()}
        return dict(opt.phase_times()), memory, int(opt.refresh_period())
    return {}, {}, 1


def _frequency(opt: Any) -> int:
    return _instrumented(opt)[2]


class _Clock:
    """``perf_counter`` after the device's queued work is done (CUDA kernels are async)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _autocast(device: torch.device, mode: str | None) -> Any:
    import contextlib

    if not mode:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mode])


AUTOCAST_DTYPES = {name: getattr(torch, dtype) for name, dtype in bench_args.AUTOCAST.items()}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"ekfac:projection_dtype=float32:scale_every=20"`` -> ``("ekfac", {...})`` (values
    read as YAML scalars), so variants of one optimizer run side by side in one process."""
    import yaml

    name, *pairs = text.split(":")
    hparams: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--optimizers entry {text!r}: expected name:key=value[:key=value...], "
                f"got {pair!r}"
            )
        hparams[key] = yaml.safe_load(value)
    return name, hparams


def _make_ours(label: str, work: Workload, seed: int, *, device: torch.device,
               autocast: str | None = None, lr_scale: float = 1.0) -> Runner:
    from ngbench.optimizers import build_optimizer, get_spec

    name, hparams = parse_variant(label)
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = work.build()
    opt = build_optimizer(name, model, **{"lr": lr_scale * LR.get(name, DEFAULT_LR), **hparams})
    sampled = bool(spec.sampled_fisher)
    clock = _Clock(device)

    def step() -> dict[str, float]:
        t0 = clock()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, autocast):
            loss = work.loss(model, work.batch)
        t1 = clock()
        if sampled and getattr(opt, "needs_sampled_backward", lambda: False)():
            raise RuntimeError(f"{name}: the benchmark runs the empirical Fisher (fisher=ef)")
        loss.backward()
        t2 = clock()
        opt.step()
        t3 = clock()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}

    return Runner(label, model, step, opt, curvature=bool(spec.curvature), freq=_frequency(opt))


def _make_asdl(kind: str, spec_model: BenchModel, x: Tensor, y: Tensor, seed: int) -> Runner:
    import asdl

    torch.manual_seed(seed)
    model = spec_model.build()
    config = asdl.PreconditioningConfig(
        data_size=x.shape[0], damping=1e-2, ema_decay=0.05,
        curvature_upd_interval=10, preconditioner_upd_interval=100,
    )
    cls = asdl.KfacGradientMaker if kind == "kfac" else asdl.EkfacGradientMaker
    gm = cls(model, config, fisher_type="fisher_emp", loss_type=spec_model.loss_type)
    opt = torch.optim.SGD(model.parameters(), lr=DEFAULT_LR, momentum=0.9)

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        dummy = gm.setup_model_call(model, x)
        gm.setup_loss_call(spec_model.loss, dummy, y)
        gm.forward_and_backward()  # forward, backward, curvature and preconditioning
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return {"forward_backward_precondition": t1 - t0, "optimizer": t2 - t1}

    return Runner(f"asdl_{kind}", model, step, opt, freq=100)


def _make_pto_shampoo(spec_model: BenchModel, x: Tensor, y: Tensor, seed: int) -> Runner:
    import pytorch_optimizer

    torch.manual_seed(seed)
    model = spec_model.build()
    # momentum=0: with momentum 0.9 its parameters turn NaN a few steps after the second
    # root computation even at lr=0 (pytorch-optimizer 4.1.0, measured on this model); the
    # momentum buffer costs one axpy per parameter, so the step time is unaffected
    opt = pytorch_optimizer.Shampoo(
        model.parameters(), lr=1e-3, momentum=0.0, preconditioning_compute_steps=100
    )

    def step() -> dict[str, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = spec_model.loss(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}

    return Runner("pto_shampoo", model, step, opt, freq=100)


#: peer package -> (import name, runner names)
PEERS = bench_args.PEERS


def _peer_runners(peers: list[str], work: Workload, seed: int) -> list[Runner]:
    import importlib.util

    if not peers:
        return []
    if work.spec is None:
        raise BenchError("--peers run on --model workloads only (their loss call differs)")
    spec_model = work.spec
    x, y = work.batch

    out: list[Runner] = []
    for peer in peers:
        module, _ = PEERS[peer]
        if importlib.util.find_spec(module) is None:
            extra = "asdfghjkl" if peer == "asdl" else "pytorch-optimizer"
            print(
                f"ngbench bench: peer {peer!r} skipped: package {extra!r} is not installed "
                "(pip install 'ngbench[bench]')",
                file=sys.stderr,
            )
            continue
        if peer == "asdl":
            out += [_make_asdl(k, spec_model, x, y, seed) for k in ("kfac", "ekfac")]
        else:
            out.append(_make_pto_shampoo(spec_model, x, y, seed))
    return out


# ----------------------------------------------------------------------------- the benchmark
def run_bench(
    *,
    model: str | None = "small_cnn",
    optimizers: list[str],
    peers: list[str] | None = None,
    steps: int | None = None,
    warmup: int = 10,
    chunk: int = 10,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    task: str | None = None,
    device: str = "cpu",
    autocast: str | None = None,
    floor: bool = True,
    errors: dict[str, str] | None = None,
    lr_scale: float = 1.0,
    flush_denormal: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the benchmark and return ``{name: result}`` (see :func:`main` for the fields).
    ``task`` (``name[:key=value...]``) replaces ``model`` by a task's tiny flavor; ``errors``
    (when given) receives ``{name: message}`` of the optimizers that failed and were dropped.
    ``lr_scale`` multiplies every one of our optimizers' lr; a row whose parameters end
    non-finite has ``finite: False`` (its time was measured on NaN arithmetic).
    ``flush_denormal``: denormals flushed to zero on the CPU during the bench (restored after;
    ``flush_denormal`` in every row): the bench repeats one batch, so a method that memorises
    it drives its gradients into the denormal range, and the time would be the CPU's slow
    denormal path instead of the method's arithmetic (K-FAC-reduce with factored Tikhonov
    damping on the small CNN: a backward of 92 ms instead of 46)."""
    with _flushed_denormals(flush_denormal) as flushed:
        dev = torch.device(device)
        if task is not None:
            work = task_workload(task, batch_size, seed, dev)
        else:
            work = model_workload(str(model), batch_size, seed, dev)
        names = list(dict.fromkeys([*BASELINES, *optimizers]))
        runners = [_make_ours(n, work, seed, device=dev, autocast=autocast, lr_scale=lr_scale)
                   for n in names]
        runners += _peer_runners(list(peers or []), work, seed)
        if steps is None:
            steps = max(200, 2 * max(r.freq for r in runners))
        rounds = math.ceil(steps / chunk)
        steps = rounds * chunk
        short = [f"{r.name} (every {r.freq})" for r in runners if r.freq > steps]
        if short:
            print(f"ngbench bench: warning: --steps {steps} does not cover one refresh period of "
                  f"{', '.join(short)}: their means leave the periodic refresh out (use --steps "
                  f">= {max(r.freq for r in runners)}, or leave --steps unset)", file=sys.stderr)
        clock = _Clock(dev)

        def run(r: Runner, n: int, *, timed: bool) -> None:
            if r.error is not None:
                return
            for _ in range(n):
                w0, c0 = clock(), time.process_time()
                try:
                    split = r.step_fn()
                except Exception as exc:  # a peer that diverges or breaks must not stop the rest
                    r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    print(f"\nngbench bench: {r.name} failed and is dropped: {r.error}",
                          file=sys.stderr)
                    return
                w1, c1 = clock(), time.process_time()
                if timed:
                    r.wall += w1 - w0
                    r.cpu += c1 - c0
                    r.steps += 1
                    for k, v in split.items():
                        r.split[k] = r.split.get(k, 0.0) + v
            r.peak_bytes = max(r.peak_bytes, r.state_bytes())

        for i in range(0, warmup, chunk):  # warm-up, interleaved too
            for r in runners:
                run(r, min(chunk, warmup - i), timed=False)
        for r in runners:
            r.phase0 = r.phases()
        t_start = time.perf_counter()
        for k in range(rounds):
            for r in runners:
                run(r, chunk, timed=True)
            if progress:
                left = (time.perf_counter() - t_start) / (k + 1) * (rounds - k - 1)
                print(
                    f"\rngbench bench: {work.label} round {k + 1}/{rounds} ({chunk} steps x "
                    f"{len(runners)} optimizers), ~{left:.0f}s left   ",
                    end="", file=sys.stderr, flush=True,
                )
        if progress:
            print(file=sys.stderr)

        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        for name in BASELINES:
            bad = next(r for r in runners if r.name == name)
            if bad.error is not None:
                raise RuntimeError(f"baseline {name} failed: {bad.error}")
        if errors is not None:
            errors.update({r.name: r.error for r in runners if r.error is not None})
        runners = [r for r in runners if r.error is None]
        mean = {r.name: r.wall / r.steps for r in runners}
        by_name = {r.name: r for r in runners}
        sgd_bytes = max(1, by_name["sgd"].peak_bytes)
        out: dict[str, dict[str, Any]] = {}
        for r in runners:
            now = r.phases()
            phases = {k: v / r.steps for k, v in r.split.items()}
            phases.update({k: (now[k] - r.phase0.get(k, 0.0)) / r.steps for k in now})
            out[r.name] = {
                "mean_step_s": mean[r.name],
                "ratio_vs_sgd": mean[r.name] / mean["sgd"],
                "ratio_vs_adamw": mean[r.name] / mean["adamw"],
                "cpu_step_s": r.cpu / r.steps,
                "phases": phases,
                "peak_mem_mb": r.peak_bytes / 2**20,
                "mem_vs_sgd": r.peak_bytes / sgd_bytes,
                "memory": _instrumented(r.optimizer)[1],
                "max_rss_mb": rss_mb,
                "steps": r.steps,
                "warmup": warmup,
                "refresh_every": r.freq,
                "peer": r.name not in names,
                "model": work.label,
                "task": task,
                "batch_size": work.batch_size,
                "threads": torch.get_num_threads(),
                "device": str(dev),
                "autocast": autocast,
                "lr_scale": lr_scale,
                "finite": all(bool(torch.isfinite(p).all()) for p in r.model.parameters()),
            }
            if dev.type == "cuda":
                out[r.name]["max_cuda_alloc_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        if floor:
            add_floors(out, work, by_name, dev)
    for row in out.values():
        row["flush_denormal"] = flushed
    return out


@contextlib.contextmanager
def _flushed_denormals(flag: bool) -> Iterator[bool]:
    """Denormals flushed to zero on the CPU inside (when ``flag`` and the CPU can; torch's
    default restored after); yields whether they are."""
    flushed = torch.set_flush_denormal(flag)
    try:
        yield bool(flag and flushed)
    finally:
        torch.set_flush_denormal(False)


def add_floors(out: dict[str, dict[str, Any]], work: Workload, runners: dict[str, Runner],
               device: torch.device) -> None:
    """Add the cost model's ``floor_ratio``, ``floor_phases``, ``excess_phase`` and
    ``mem_floor_mb`` to every result row of one of our optimizers (:mod:`runners.costmodel`:
    kernels timed at the layers' exact shapes in this process)."""
    from . import costmodel

    base = runners["sgd"].model
    all_shapes = costmodel.layer_shapes(base, lambda: work.loss(base, work.batch))
    trainable = [p for p in base.parameters() if p.requires_grad]
    params = sum(p.numel() for p in trainable)
    param_shapes = [tuple(p.shape) for p in trainable]
    rates = costmodel.Rates(device)
    sgd = out["sgd"]
    for name, row in out.items():
        r = runners.get(name)
        if r is None or row["peer"]:
            continue
        method = parse_variant(name)[0]
        settings = costmodel.settings_of(r.optimizer)
        registered = getattr(r.optimizer, "layers", None)  # the layers it has blocks for
        shapes = [s for s in all_shapes if registered is None or s.name in registered]
        pred = costmodel.predict(method, settings, shapes, rates, params, param_shapes)
        mem = costmodel.memory_floor(method, settings, shapes, params, param_shapes)
        row["mem_floor_mb"] = None if mem is None else mem / 2**20
        if pred is None:
            row["floor_ratio"] = row["excess_phase"] = None
            continue
        floor = sgd["mean_step_s"] + sum(pred.values())
        row["floor_step_s"] = floor
        row["floor_ratio"] = floor / sgd["mean_step_s"]
        row["floor_phases"] = pred
        measured = dict(row["phases"])
        if method == "adamw":  # no phase timers: its extra is in the optimizer call
            measured["update"] = measured.get("optimizer", 0.0) - sgd["phases"]["optimizer"]
        excess = {k: measured.get(k, 0.0) - v for k, v in pred.items() if k in measured}
        excess["other"] = row["mean_step_s"] - floor - sum(excess.values())
        row["excess_s"] = excess
        row["excess_phase"] = max(excess, key=excess.__getitem__) if name != "sgd" else None
    out["sgd"]["rates"] = rates.summary()


def combine_repeats(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median over repeated benchmarks (each a fresh set of models, the same process): the
    step times, ratios, CPU times and phases are the medians; ``ratio_vs_sgd_runs`` /
    ``ratio_vs_adamw_runs`` keep every repeat's ratio, so the spread is visible."""
    import statistics

    if len(runs) == 1:
        return runs[0]
    out: dict[str, dict[str, Any]] = {}
    for name in runs[0]:
        rs = [r[name] for r in runs if name in r]
        row = dict(rs[-1])
        for key in ("mean_step_s", "ratio_vs_sgd", "ratio_vs_adamw", "cpu_step_s"):
            row[key] = statistics.median(r[key] for r in rs)
        keys = {k for r in rs for k in r["phases"]}
        row["phases"] = {
            k: statistics.median(r["phases"].get(k, 0.0) for r in rs) for k in sorted(keys)
        }
        floors = [r["floor_ratio"] for r in rs if r.get("floor_ratio") is not None]
        if floors:
            row["floor_ratio"] = statistics.median(floors)
        row["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rs)
        row["finite"] = all(r.get("finite", True) for r in rs)
        row["max_rss_mb"] = max(r["max_rss_mb"] for r in rs)
        row["ratio_vs_sgd_runs"] = [r["ratio_vs_sgd"] for r in rs]
        row["ratio_vs_adamw_runs"] = [r["ratio_vs_adamw"] for r in rs]
        row["repeats"] = len(rs)
        out[name] = row
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    cols = ["statistics", "inverse", "precondition", "communication"]
    w = max(14, *(len(k) + (0 if r.get("finite", True) else 7) for k, r in results.items()))
    head = (f"{'optimizer':<{w}} {'step ms':>9} {'cpu ms':>9} {'x sgd':>7} {'x adamw':>8} "
            f"{'fwd ms':>8} {'bwd ms':>8} {'opt ms':>8} "
            + " ".join(f"{c[:6] + ' ms':>9}" for c in cols)
            + f" {'floor':>6} {'excess in':>12} {'mem MB':>8} {'x sgd':>6} {'floor MB':>8}")
    repeats = max(int(r.get("repeats", 1)) for r in results.values())
    if repeats > 1:
        head += f" {'x sgd range':>12}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        ph = r["phases"]

        def ms(key: str, ph: dict = ph) -> str:
            return f"{1e3 * ph[key]:.2f}" if key in ph else "-"

        if "forward" in ph:
            split = f"{ms('forward'):>8} {ms('backward'):>8} {ms('optimizer'):>8}"
        else:  # ASDL: one forward/backward/curvature/preconditioning call
            split = f"{'(all) ' + ms('forward_backward_precondition'):>17} {ms('optimizer'):>8}"
        label = name if r.get("finite", True) else f"{name} (NaN!)"
        lines.append(
            f"{label:<{w}} {1e3 * r['mean_step_s']:>9.2f} {1e3 * r['cpu_step_s']:>9.2f} "
            f"{r['ratio_vs_sgd']:>7.2f} {r['ratio_vs_adamw']:>8.2f} {split} "
            + " ".join(f"{ms(c):>9}" for c in cols)
            + f" {_num(r.get('floor_ratio'), 6)} {r.get('excess_phase') or '-':>12}"
            + f" {r['peak_mem_mb']:>8.2f} {_num(r.get('mem_vs_sgd'), 6)}"
            + f" {_num(r.get('mem_floor_mb'), 8)}"
            + (f" {min(r['ratio_vs_sgd_runs']):>5.2f}-{max(r['ratio_vs_sgd_runs']):<6.2f}"
               if repeats > 1 else "")
        )
    any_r = next(iter(results.values()))
    lines.append(
        f"model {any_r['model']}, batch {any_r['batch_size']}, {any_r['threads']} threads, "
        f"mean over {any_r['steps']} steps after {any_r['warmup']} warm-up"
        + (f", median of {repeats} repeats (x sgd range: min-max)" if repeats > 1 else "")
        + "; "
        f"process max RSS {any_r['max_rss_mb']:.0f} MB. asdl_* fold forward/backward/"
        "preconditioning into one phase."
    )
    bad = [n for n, r in results.items() if not r.get("finite", True)]
    if bad:
        lines.append(
            f"(NaN!): {', '.join(bad)} ended with non-finite parameters at lr scale "
            f"{any_r.get('lr_scale', 1.0):g}: their times are NaN arithmetic, not a real step; "
            "rerun with a smaller --lr-scale (e.g. 0.1 or 0.01)."
        )
    if any(r.get("floor_ratio") for r in results.values()):
        rates = results.get("sgd", {}).get("rates", {})
        lines.append(
            "floor: x sgd predicted by runners/costmodel.py (kernels timed at the layers' "
            "shapes here: GEMM 512^3 "
            f"{rates.get('gemm512_gflops', 0):.0f} GFLOP/s, eigh 256 "
            f"{rates.get('eigh256_ms', 0):.2f} ms, {rates.get('call_us', 0):.1f} us/call); "
            "excess in: the phase furthest above its prediction ('other': hooks, bookkeeping). "
            "mem MB: optimizer state (sgd: momentum, adamw: moments); floor MB: the "
            "method's minimal state."
        )
    return "\n".join(lines)


def _num(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    from .bench_args import parser

    a = parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"ngbench bench: error: {msg}", file=sys.stderr)
        return 2

    if a.task is None and a.model not in MODELS:
        return fail(f"--model {a.model!r} is not valid; valid choices: {', '.join(MODELS)}")
    if a.task is not None:
        try:
            task_name = parse_variant(a.task)[0]
        except ValueError as exc:
            return fail(str(exc).replace("--optimizers", "--task"))
        if task_name not in _task_names():
            return fail(f"--task {task_name!r} is not valid; valid choices: "
                        + ", ".join(_task_names()))
        if a.peers:
            return fail("--peers run on --model workloads only (their loss call differs)")
    from ngbench.optimizers import list_optimizers

    known = list_optimizers()
    try:
        names = [parse_variant(o)[0] for o in a.optimizers]
    except ValueError as exc:
        return fail(str(exc))
    bad = [o for o, name in zip(a.optimizers, names, strict=True) if name not in known]
    if bad:
        return fail(f"--optimizers: {bad[0]!r} is not registered; valid choices: "
                    + ", ".join(known))
    from ngbench.optimizers.registry import OptimizerConfigError
    from ngbench.tasks import DataNotFoundError, TaskConfigError
    bad = [o for o in a.peers if o not in PEERS]
    if bad:
        return fail(f"--peers: {bad[0]!r} is not valid; valid choices: {', '.join(PEERS)}")
    for key in ("steps", "chunk", "threads", "batch_size", "repeat"):
        v = getattr(a, key)
        if v is not None and v < 1:
            return fail(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    if a.warmup < 0:
        return fail(f"--warmup must be >= 0, got {a.warmup}")
    if not a.lr_scale > 0:
        return fail(f"--lr-scale must be > 0, got {a.lr_scale}")
    torch.set_num_threads(a.threads)
    runs = []
    for i in range(a.repeat):
        if a.repeat > 1 and not a.quiet:
            print(f"ngbench bench: repeat {i + 1}/{a.repeat}", file=sys.stderr)
        try:
            runs.append(run_bench(
                model=a.model, optimizers=a.optimizers, peers=a.peers, steps=a.steps,
                warmup=a.warmup, chunk=min(a.chunk, a.steps or a.chunk),
                batch_size=a.batch_size, seed=a.seed, progress=not a.quiet, task=a.task,
                device=a.device, autocast=a.autocast, floor=not a.no_floor,
                lr_scale=a.lr_scale, flush_denormal=not a.keep_denormals,
            ))
        except OptimizerConfigError as exc:
            return fail(f"--optimizers: {exc}")
        except BenchError as exc:
            return fail(str(exc))
        except (TaskConfigError, DataNotFoundError) as exc:
            return fail(f"--task {a.task}: {exc}")
    results = combine_repeats(runs)
    print(format_table(results))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(a.json.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
