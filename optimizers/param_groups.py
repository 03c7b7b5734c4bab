"""Parameter groups shared by every optimizer: no weight decay on biases and norms.

Every trainable parameter belongs to exactly one group, and that is asserted.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay: biases, norm affine params, 1-D tensors."""
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _NORM_TYPES) or p_name == "bias" or p.ndim <= 1:
                names.add(full)
    return names


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups, ``decay`` and ``no_decay``, covering every trainable parameter once."""
    skip = no_decay_names(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    assert_partition(model, groups)
    return groups


def assert_partition(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter of ``model`` is in exactly one group, and nothing else is."""
    seen: dict[int, int] = {}
    for g in groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    twice = [trainable.get(i, "?") for i, c in seen.items() if c > 1]
    missing = [n for i, n in trainable.items() if i not in seen]
    extra = [i for i in seen if i not in trainable]
    if twice or missing or extra:
        raise AssertionError(
            f"parameter groups are not a partition: in two groups {twice}, "
            f"in none {missing}, not in the model {len(extra)}"
        )
