"""Recommendation: NCF/NeuMF (He, Liao, Zhang, Nie, Hu & Chua, "Neural Collaborative
Filtering", WWW 2017) on MovieLens and DLRM (Naumov et al., "Deep Learning Recommendation Model
for Personalization and Recommendation Systems", arXiv 1906.00091) on Criteo; DLRM is the
recommendation task of the NG+ paper (Yang et al., arXiv 2106.07454).

``task.model=ncf``: NeuMF = GMF (element-wise product of user and item embeddings) beside an
MLP tower on concatenated embeddings, joined by one output layer; binary cross-entropy on the
observed interactions plus ``num_negatives`` (4) uniformly sampled unobserved items per
positive, redrawn every epoch (a pure function of seed and epoch).  Evaluation follows the
paper's leave-one-out protocol: each user's latest interaction is held out and ranked against
99 items the user never rated (fixed seed); metrics ``val_hr10`` and ``val_ndcg10``.
Reference target: MLPerf's NCF benchmark (ML-20M, factors 64, MLP 256-256-128-64) stops at
HR@10 = 0.635.  The tiny target on ML-100k was chosen from measurement (see the config).

``task.model=dlrm``: one ``nn.Embedding`` table per categorical feature, a bottom MLP on the
dense features (its last width = the embedding width), the pairwise dot-product interaction of
the bottom output and all embeddings (strict lower triangle) concatenated with the bottom
output, and a top MLP to one logit; binary cross-entropy; metrics ``val_auc`` and
``val_logloss``.  Full: Criteo Kaggle shapes from the DLRM reference (``13-512-256-64-16``
bottom, 16-d embeddings, ``512-256-1`` top); MLPerf's DLRM target (Criteo Terabyte) is AUC
0.8025.  Tiny: the same architecture, narrower, on MovieLens-100k cast as click prediction
(label: rating ≥ 4; categorical user, item, weekday, hour; dense log activity counts and time).

All embeddings are plain ``nn.Embedding`` with dense gradients (``sparse=False``), so curvature
optimizers can precondition or skip them; every other parameter is in an ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _criteo, _movielens
from .base import DataNotFoundError, Task, TaskConfigError, epoch_permutation, shard_indices
from .config import (
    MOVIELENS,
    RECOMMENDER_DATASETS,
    RECOMMENDER_DEFAULT_DATASET,
    RECOMMENDER_MODELS,
    RecommenderConfig,
)

MODELS = RECOMMENDER_MODELS
DATASETS = RECOMMENDER_DATASETS
DEFAULT_DATASET = RECOMMENDER_DEFAULT_DATASET
#: model sizes per (flavor, model); every key can be overridden under ``task.``
SIZES: dict[tuple[str, str], dict[str, Any]] = {
    # NCF paper defaults (predictive factors 8, MLP 64-32-16-8)
    ("tiny", "ncf"): {"gmf_dim": 8, "mlp_layers": [64, 32, 16, 8]},
    # MLPerf NCF shapes (factors 64, MLP 256-256-128-64)
    ("full", "ncf"): {"gmf_dim": 64, "mlp_layers": [256, 256, 128, 64]},
    ("tiny", "dlrm"): {"emb_dim": 16, "bottom_mlp": [32, 16], "top_mlp": [64, 32]},
    # DLRM reference Criteo Kaggle configuration
    ("full", "dlrm"): {"emb_dim": 16, "bottom_mlp": [512, 256, 64, 16], "top_mlp": [512, 256]},
}


# ----------------------------------------------------------------------------- models
class NeuMF(nn.Module):
    """NeuMF: ``logit = h·[p_u^G ⊙ q_i^G ; MLP([p_u^M ; q_i^M])]`` (He et al. 2017, eq. 12)."""

    def __init__(self, n_users: int, n_items: int, *, gmf_dim: int, mlp_layers: Sequence[int]):
        super().__init__()
        if len(mlp_layers) < 1 or mlp_layers[0] % 2:
            raise TaskConfigError(
                f"task.mlp_layers must start with an even width (user and item halves), "
                f"got {list(mlp_layers)}"
            )
        self.gmf_user = nn.Embedding(n_users, gmf_dim)
        self.gmf_item = nn.Embedding(n_items, gmf_dim)
        self.mlp_user = nn.Embedding(n_users, mlp_layers[0] // 2)
        self.mlp_item = nn.Embedding(n_items, mlp_layers[0] // 2)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(mlp_layers[:-1], mlp_layers[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.mlp = nn.Sequential(*layers)
        self.predict = nn.Linear(gmf_dim + mlp_layers[-1], 1)
        for emb in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(emb.weight, std=0.01)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.predict.bias)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], dim=-1))
        return self.predict(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


def _mlp(sizes: Sequence[int], *, last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        lin = nn.Linear(d_in, d_out)
        nn.init.normal_(lin.weight, std=(2.0 / (d_in + d_out)) ** 0.5)
        nn.init.normal_(lin.bias, std=(1.0 / d_out) ** 0.5)
        layers.append(lin)
        if last_relu or k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """DLRM with the dot interaction (Naumov et al. 2019, Fig. 1; reference initialisation:
    embeddings U(±1/√rows), MLP weights N(0, 2/(fan_in+fan_out)))."""

    _rows: Tensor  # buffers (register_buffer below)
    _cols: Tensor

    def __init__(
        self,
        *,
        n_dense: int,
        table_sizes: Sequence[int],
        emb_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
    ):
        super().__init__()
        if not bottom_mlp or bottom_mlp[-1] != emb_dim:
            raise TaskConfigError(
                f"task.bottom_mlp must end with the embedding width task.emb_dim={emb_dim}, "
                f"got {list(bottom_mlp)}"
            )
        embeddings = [nn.Embedding(int(n), emb_dim) for n in table_sizes]
        self.embeddings = nn.ModuleList(embeddings)
        for emb in embeddings:
            bound = 1.0 / max(1, emb.num_embeddings) ** 0.5
            nn.init.uniform_(emb.weight, -bound, bound)
        self.bottom = _mlp([n_dense, *bottom_mlp], last_relu=True)
        n_vec = len(table_sizes) + 1
        rows, cols = torch.tril_indices(n_vec, n_vec, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.top = _mlp([emb_dim + len(rows), *top_mlp, 1], last_relu=False)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        x = self.bottom(dense)
        vecs = [x] + [emb(sparse[:, k]) for k, emb in enumerate(self.embeddings)]
        t = torch.stack(vecs, dim=1)  # (B, F, d)
        z = torch.bmm(t, t.transpose(1, 2))[:, self._rows, self._cols]
        return self.top(torch.cat([x, z], dim=1)).squeeze(-1)


# ----------------------------------------------------------------------------- task
class RecommenderTask(Task):
    name = "recommender"
    config_class = RecommenderConfig
    datasets = RecommenderConfig.DATASETS
    metric_modes = {"val_hr10": "max", "val_ndcg10": "max", "val_auc": "max", "val_logloss": "min"}
    cfg: RecommenderConfig

    def __init__(self, cfg: Mapping[str, Any] | RecommenderConfig):
        super().__init__(cfg)
        c = self.cfg
        self.model_name = c.model
        self.sizes = {
            key: default if getattr(c, key) is None else getattr(c, key)
            for key, default in SIZES[(self.flavor, self.model_name)].items()
        }
        self.num_negatives = c.num_negatives
        self.eval_negatives = c.eval_negatives
        self.eval_seed = c.eval_seed
        self.split_seed = c.split_seed
        self.table_size = c.table_size
        self.max_rows = c.max_rows or None
        self.train_file = c.train_file or None
        self.val_file = c.val_file or None
        self.eval_batch_size = c.eval_batch_size
        self._loo: _movielens.LeaveOneOut | None = None
        self._tables: tuple[dict[str, Tensor], dict[str, Tensor], list[int]] | None = None

    # -- data -----------------------------------------------------------------
    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        if dataset == "movielens_100k":
            path = _movielens.prepare_movielens_100k(root)
            return (
                f"movielens_100k: {len(_movielens.read_ratings(dataset, root))} ratings in {path}"
            )
        if dataset in MOVIELENS:
            path = _movielens.ratings_path(dataset, root)
            return f"{dataset}: found {path}"
        if dataset == "criteo":
            path = cls._criteo_files(root, None, None)[0]
            return f"criteo: found {path}"
        raise TaskConfigError(
            f"dataset {dataset!r} is not a recommender data set; valid choices: "
            + ", ".join(cls.datasets)
        )

    @staticmethod
    def _criteo_files(root: Path, train: Any, val: Any) -> tuple[Path, Path | None]:
        if train:
            path = Path(str(train)).expanduser()
            if not path.exists():
                raise DataNotFoundError(f"task.train_file={path} does not exist")
            vpath = Path(str(val)).expanduser() if val else None
            if vpath is not None and not vpath.exists():
                raise DataNotFoundError(f"task.val_file={vpath} does not exist")
            return path, vpath
        for cand in (root / "criteo" / "train.txt", root / "criteo_kaggle" / "train.txt"):
            if cand.exists():
                return cand, None
        raise DataNotFoundError(
            f"Criteo not found: looked at {root / 'criteo' / 'train.txt'} (the Kaggle Display "
            "Advertising Challenge train.txt: label, 13 integer and 26 categorical tab-separated "
            "columns). For Criteo Terabyte set task.train_file and task.val_file to TSV files "
            "in the same layout. Check with: ngbench data criteo"
        )

    def _movielens_loo(self) -> _movielens.LeaveOneOut:
        if self._loo is None:
            ratings = _movielens.read_ratings(self.dataset, self.data_root)
            self._loo = _movielens.leave_one_out(
                ratings, n_negatives=self.eval_negatives, seed=self.eval_seed
            )
        return self._loo

    def _ctr_tables(self) -> tuple[dict[str, Tensor], dict[str, Tensor], list[int]]:
        """Dense/sparse/label tensors for DLRM: Criteo, or MovieLens-100k as clicks."""
        if self._tables is None:
            if self.dataset == "criteo":
                tr_file, va_file = self._criteo_files(
                    self.data_root, self.train_file, self.val_file
                )
                tr, va = _criteo.load_criteo(
                    tr_file, va_file, table_size=self.table_size, max_rows=self.max_rows
                )
                parts = [tr, va]
                sizes = tr.table_sizes
            else:
                parts, sizes = self._movielens_ctr()
            self._tables = (
                *(
                    {
                        "dense": torch.from_numpy(np.ascontiguousarray(p.dense, np.float32)),
                        "sparse": torch.from_numpy(np.ascontiguousarray(p.sparse)),
                        "label": torch.from_numpy(np.ascontiguousarray(p.label, np.float32)),
                    }
                    for p in parts
                ),
                sizes,
            )  # type: ignore[assignment]
        assert self._tables is not None
        return self._tables

    def _movielens_ctr(self) -> tuple[list[_criteo.CriteoArrays], list[int]]:
        r = _movielens.read_ratings(self.dataset, self.data_root)
        _, users = np.unique(r[:, 0], return_inverse=True)
        _, items = np.unique(r[:, 1], return_inverse=True)
        ts = r[:, 3]
        weekday = (ts // 86_400) % 7
        hour = (ts // 3_600) % 24
        sparse = np.stack([users, items, weekday, hour], axis=1).astype(np.int32)
        sizes = [int(users.max()) + 1, int(items.max()) + 1, 7, 24]
        label = (r[:, 2] >= 4).astype(np.float32)
        perm = np.random.default_rng(self.split_seed).permutation(len(r))
        n_val = len(r) // 10
        va_idx, tr_idx = perm[:n_val], perm[n_val:]
        u_cnt = np.bincount(users[tr_idx], minlength=sizes[0])
        i_cnt = np.bincount(items[tr_idx], minlength=sizes[1])
        span = max(1, int(ts.max() - ts.min()))
        dense = np.stack(
            [np.log1p(u_cnt[users]), np.log1p(i_cnt[items]), (ts - ts.min()) / span], axis=1
        ).astype(np.float32)
        parts = [
            _criteo.CriteoArrays(dense[i], sparse[i], label[i], sizes) for i in (tr_idx, va_idx)
        ]
        return parts, sizes

    def num_train_examples(self) -> int:
        if self.model_name == "ncf":
            return len(self._movielens_loo().train_users) * (1 + self.num_negatives)
        return len(self._ctr_tables()[0]["label"])

    def _ncf_epoch(self, *, epoch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        loo = self._movielens_loo()
        rng = np.random.default_rng([seed, epoch, 1789])
        neg_u, neg_i = _movielens.sample_training_negatives(
            loo, n_negatives=self.num_negatives, rng=rng
        )
        users = torch.from_numpy(np.concatenate([loo.train_users, neg_u]))
        items = torch.from_numpy(np.concatenate([loo.train_items, neg_i]))
        labels = torch.zeros(len(users))
        labels[: len(loo.train_users)] = 1.0
        return users, items, labels

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        if self.model_name == "ncf":
            cols = self._ncf_epoch(epoch=epoch, seed=seed)
        else:
            tr = self._ctr_tables()[0]
            cols = (tr["dense"], tr["sparse"], tr["label"])
        perm = epoch_permutation(len(cols[0]), seed=seed, epoch=epoch)
        for idx in shard_indices(perm, batch_size=batch_size, rank=rank, world_size=world_size):
            a, b, y = (c[idx] for c in cols)
            yield (a, b.long(), y) if self.model_name == "dlrm" else (a, b, y)

    # -- model, loss, evaluation -------------------------------------------------
    def build_model(self) -> nn.Module:
        s = self.sizes
        if self.model_name == "ncf":
            loo = self._movielens_loo()
            return NeuMF(loo.n_users, loo.n_items, gmf_dim=s["gmf_dim"], mlp_layers=s["mlp_layers"])
        tr, _, sizes = self._ctr_tables()
        return DLRM(
            n_dense=tr["dense"].shape[1],
            table_sizes=sizes,
            emb_dim=s["emb_dim"],
            bottom_mlp=s["bottom_mlp"],
            top_mlp=s["top_mlp"],
        )

    def describe(self) -> str:
        shapes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.model_name.upper()} ({shapes}) on {self.dataset}; nn.Embedding + nn.Linear"

    @staticmethod
    def _logits(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        a, b, _ = batch
        if a.is_floating_point():  # DLRM dense features follow the model's dtype
            a = a.to(next(model.parameters()).dtype)
        return model(a, b)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        logits = self._logits(model, batch)
        return F.binary_cross_entropy_with_logits(logits, batch[2].to(logits.dtype)), logits

    def sampled_loss(self, outputs: Tensor) -> Tensor:
        """Bernoulli likelihood: labels drawn from sigmoid(logit)."""
        with torch.no_grad():
            y = torch.bernoulli(torch.sigmoid(outputs))
        return F.binary_cross_entropy_with_logits(outputs, y)

    def popularity_baseline(self) -> dict[str, float]:
        """HR@10 / NDCG@10 of ranking candidates by their number of training interactions."""
        loo = self._movielens_loo()
        counts = np.bincount(loo.train_items, minlength=loo.n_items).astype(np.float64)
        hr, ndcg = _movielens.rank_metrics(counts[loo.eval_candidates])
        return {"val_hr10": hr, "val_ndcg10": ndcg}

    def constant_baseline(self) -> dict[str, float]:
        """AUC / log loss of predicting the training click rate for every example."""
        tr, va, _ = self._ctr_tables()
        p = float(tr["label"].double().mean())
        y = va["label"].double()
        logloss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
        return {"val_auc": 0.5, "val_logloss": float(logloss)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            if self.model_name == "ncf":
                return self._evaluate_ncf(model, device)
            return self._evaluate_ctr(model, device)
        finally:
            model.train(was_training)

    def _evaluate_ncf(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        loo = self._movielens_loo()
        cand = torch.from_numpy(loo.eval_candidates)
        n_cand = cand.shape[1]
        per_chunk = max(1, self.eval_batch_size // n_cand)
        scores = []
        for start in range(0, loo.n_users, per_chunk):
            c = cand[start : start + per_chunk]
            users = torch.arange(start, start + len(c)).repeat_interleave(n_cand)
            out = model(users.to(device), c.reshape(-1).to(device))
            scores.append(out.reshape(len(c), n_cand).double().cpu())
        hr, ndcg = _movielens.rank_metrics(torch.cat(scores).numpy())
        return {"val_hr10": hr, "val_ndcg10": ndcg}

    def _evaluate_ctr(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        _, va, _ = self._ctr_tables()
        logits = []
        dtype = next(model.parameters()).dtype
        for start in range(0, len(va["label"]), self.eval_batch_size):
            sl = slice(start, start + self.eval_batch_size)
            dense = va["dense"][sl].to(device=device, dtype=dtype)
            logits.append(model(dense, va["sparse"][sl].long().to(device)).double().cpu())
        z = torch.cat(logits)
        y = va["label"].double()
        logloss = float(F.binary_cross_entropy_with_logits(z, y))
        labels = y.numpy()
        auc = float(roc_auc_score(labels, z.numpy())) if 0 < labels.sum() < len(labels) else 0.5
        return {"val_auc": auc, "val_logloss": logloss}
