"""Conformance of every registered optimizer (whatever is registered is tested).

Per optimizer: its config dataclass is keyword-only, documented and refuses every bad value the
field declarations imply (wrong type, out of range, bad choice) with an error naming the key;
its preset files hold only what differs from the defaults; a state-dict round trip through
``torch.save`` continues bit-identically; capabilities (:class:`Instrumented`) are reported.
The every-task × every-optimizer smoke run is in ``test_contract.py``; the per-method files
hold the mathematics.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from _helpers import checkpoint_round_trip
from ngbench import optimizers
from ngbench.optimizers import Instrumented, OptimizerConfigError, build_optimizer, config_class
from ngbench.optimizers._config import field_kinds, option_fields
from torch import nn

OPTS = optimizers.list_optimizers()
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "optimizer"
#: short refresh periods, so a few steps cross statistics and refresh steps
FAST = {"stat_every": 1, "inv_every": 2, "precondition_frequency": 2}


def _fast(name: str) -> dict[str, int]:
    keys = config_class(name).keys()
    return {k: v for k, v in FAST.items() if k in keys}


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


# ----------------------------------------------------------------------------- config classes
def _bad_values(cls: type) -> list[tuple[str, object]]:
    """``(key, value)`` pairs every field's declaration refuses."""
    out: list[tuple[str, object]] = []
    for f in option_fields(cls):
        kind, meta = field_kinds(cls)[f.name], f.metadata
        base = kind.base
        if isinstance(base, type) and issubclass(base, enum.Enum):
            out += [(f.name, "no-such-choice"), (f.name, 3)]
        elif base is list:
            out += [(f.name, 3), (f.name, [1, 2])]
        elif base is bool:
            out += [(f.name, "yes"), (f.name, 1)]
        elif base is str:
            out += [(f.name, 3)]
        elif kind.schedule:
            out += [(f.name, 0), (f.name, 2.5), (f.name, "x")]
        elif base in (int, float):
            out += [(f.name, "x"), (f.name, True)]
            if base is int:
                out.append((f.name, 2.5))
            for bound, delta in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                if meta.get(bound) is not None:
                    out.append((f.name, base(meta[bound] + delta)))
    return out


CASES = [(n, k, v) for n in OPTS for k, v in _bad_values(config_class(n))]


@pytest.mark.parametrize(
    ("name", "key", "value"), CASES, ids=[f"{n}-{k}-{v!r}" for n, k, v in CASES]
)
def test_config_refuses_bad_value_naming_the_key(name, key, value):
    pattern = rf"^optimizer\.{re.escape(key)}[ =]"
    with pytest.raises(OptimizerConfigError, match=pattern):
        config_class(name)(**{key: value})
    with pytest.raises(OptimizerConfigError, match=pattern):  # the same through the registry
        build_optimizer(name, _net(), **{key: value})


@pytest.mark.parametrize("name", OPTS)
def test_config_class_is_keyword_only_documented_and_complete(name):
    cls = config_class(name)
    assert issubclass(cls, optimizers.OptimizerConfig)
    with pytest.raises(TypeError):
        cls(0.1)  # keyword-only
    assert cls.keys() and all(cls.docs().values()), cls.docs()
    assert len(_bad_values(cls)) >= len(cls.keys())  # every field declares something to refuse
    defaults = cls()
    assert cls(**defaults.to_dict()) == defaults
    with pytest.raises(OptimizerConfigError, match=r"optimizer\.nosuch .*valid keys: lr"):
        build_optimizer(name, _net(), nosuch=1)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_files_hold_only_what_differs_from_the_defaults(path):
    cfg = yaml.safe_load(path.read_text())
    # the preset composes on its optimizer's schema (runners/schema.py), then its differences
    assert cfg.pop("defaults")[0].startswith(f"/schema/optimizer/{cfg['name']}@_here_")
    name = cfg.pop("name")
    cls = config_class(name)
    defaults = cls().to_dict()
    same = sorted(k for k, v in cfg.items() if k in defaults and v == defaults[k])
    assert not same, f"{path.name} repeats the defaults of {cls.__name__}: {same}"
    assert isinstance(optimizers.make_config(name, **cfg), cls)


# ----------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name", OPTS)
def test_state_dict_round_trip_continues_identically(name):
    torch.manual_seed(0)
    checkpoint_round_trip(
        _net, lambda net: build_optimizer(name, net, **_fast(name)), None, None,
        before=3, after=3, train=lambda net, opt, steps, phase: _train(net, opt, steps, 1 + phase),
    )


@pytest.mark.parametrize("name", OPTS)
def test_capabilities(name):
    spec = optimizers.get_spec(name)
    net = _net()
    opt = build_optimizer(name, net, **_fast(name))
    assert isinstance(opt, spec.cls)
    assert isinstance(opt, Instrumented) == spec.curvature
    if not spec.curvature:
        return
    _train(net, opt, 2, seed=0)
    assert opt.refresh_period() == 2  # the refresh option set above
    assert opt.memory_usage()["total"] > 0
    times = opt.phase_times()
    assert times and all(v >= 0 for v in times.values()) and sum(times.values()) > 0


def test_list_optimizers_verbose_shows_every_key_with_default_and_doc(capsys):
    from ngbench.runners.cli import cmd_list

    assert cmd_list(["optimizers", "-v"]) == 0
    out = capsys.readouterr().out
    for name in OPTS:
        cls = config_class(name)
        for key, doc in cls.docs().items():
            assert f"{key} = {cls().to_dict()[key]!r}  # {doc}" in out, (name, key)
