"""Criteo click logs for DLRM (Naumov et al., "Deep Learning Recommendation Model for
Personalization and Recommendation Systems", arXiv 1906.00091, 2019).

Each line of the Kaggle Display Advertising Challenge ``train.txt`` (and of the Terabyte
``day_*`` files) is tab-separated: the click label, 13 integer features, 26 categorical
features (32-bit hex strings); any feature may be empty.  As in the DLRM reference
preprocessing, integer features become ``log(1 + max(x, 0))`` (missing = 0); categorical
values are hashed (pandas' vectorised 64-bit hash) modulo ``table_size`` when it is > 0, then
renumbered 0..K-1 per feature, so each embedding table has exactly the rows it needs.
Parsed arrays are cached as ``.npz`` beside the source file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataNotFoundError

N_DENSE = 13
N_SPARSE = 26
#: per-feature cardinalities of the Criteo Kaggle data (DLRM's day-wise preprocessing), for
#: benchmarks of "Kaggle-like" shapes without the data
KAGGLE_TABLE_SIZES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
    14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip


@dataclass
class CriteoArrays:
    dense: np.ndarray  # (n, 13) float32, log-transformed
    sparse: np.ndarray  # (n, 26) int32, renumbered per feature
    label: np.ndarray  # (n,) float32 in {0, 1}
    table_sizes: list[int]


def read_criteo_tsv(path: Path, *, max_rows: int | None = None) -> tuple[np.ndarray, ...]:
    """Raw columns of a Criteo TSV: ``(label float32, dense float32 (n, 13), hashes uint64
    (n, 26))``; at most ``max_rows`` lines."""
    import pandas as pd

    if not path.exists():
        raise DataNotFoundError(f"Criteo file not found: {path}")
    names = ["label"] + [f"i{k}" for k in range(N_DENSE)] + [f"c{k}" for k in range(N_SPARSE)]
    dtypes = {"label": "float32", **{f"i{k}": "float64" for k in range(N_DENSE)}}
    dtypes.update({f"c{k}": "object" for k in range(N_SPARSE)})
    labels, denses, hashes = [], [], []
    reader = pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=names,
        dtype=dtypes,
        nrows=max_rows,
        chunksize=1_000_000,
        na_filter=True,
        keep_default_na=False,
        na_values=[""],
    )
    for chunk in reader:
        labels.append(chunk["label"].to_numpy(np.float32))
        d = chunk[[f"i{k}" for k in range(N_DENSE)]].fillna(0.0).to_numpy(np.float64)
        denses.append(np.log1p(np.maximum(d, 0.0)).astype(np.float32))
        cats = chunk[[f"c{k}" for k in range(N_SPARSE)]].fillna("")
        h = np.stack(
            [pd.util.hash_array(cats[c].to_numpy(dtype=object)) for c in cats.columns], axis=1
        )
        hashes.append(h)
    if not labels:
        raise DataNotFoundError(f"Criteo file {path} is empty")
    label = np.concatenate(labels)
    if not np.isin(label, (0.0, 1.0)).all():
        raise DataNotFoundError(f"{path}: the first column must be the 0/1 click label")
    return label, np.concatenate(denses), np.concatenate(hashes)


def encode_sparse(
    hashes: list[np.ndarray], *, table_size: int
) -> tuple[list[np.ndarray], list[int]]:
    """Hash modulo ``table_size`` (if > 0) and renumber each feature 0..K-1 over all parts."""
    n_parts = [len(h) for h in hashes]
    allh = np.concatenate(hashes)
    if table_size > 0:
        allh = allh % np.uint64(table_size)
    out = np.empty(allh.shape, dtype=np.int32)
    sizes = []
    for k in range(allh.shape[1]):
        uniq, inv = np.unique(allh[:, k], return_inverse=True)
        out[:, k] = inv
        sizes.append(len(uniq))
    return list(np.split(out, np.cumsum(n_parts)[:-1])), sizes


def load_criteo(
    train_file: Path, val_file: Path | None, *, table_size: int, max_rows: int | None = None
) -> tuple[CriteoArrays, CriteoArrays]:
    """Training and validation arrays (cached).  Without ``val_file`` the rows of
    ``train_file`` are split as in DLRM's Kaggle setup: the first 6/7 train, the next 1/14
    (the first half of the last day) validate."""
    key = f"{train_file.resolve()}:{train_file.stat().st_size}:{train_file.stat().st_mtime_ns}"
    if val_file is not None:
        key += f":{val_file.resolve()}:{val_file.stat().st_size}:{val_file.stat().st_mtime_ns}"
    key += f":{table_size}:{max_rows}:v1"
    cache = train_file.with_name(
        f"{train_file.name}.dlrm-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    )
    if cache.exists():
        z = np.load(cache)
        sizes = [int(s) for s in z["table_sizes"]]
        return (
            CriteoArrays(z["tr_dense"], z["tr_sparse"], z["tr_label"], sizes),
            CriteoArrays(z["va_dense"], z["va_sparse"], z["va_label"], sizes),
        )
    tr = read_criteo_tsv(train_file, max_rows=max_rows)
    if val_file is not None:
        va = read_criteo_tsv(val_file, max_rows=max_rows)
    else:
        n = len(tr[0])
        n_tr = (6 * n) // 7
        n_va = max(1, (n - n_tr) // 2)
        if n_tr < 1:
            raise DataNotFoundError(f"{train_file}: too few rows ({n}) to split off validation")
        va = tuple(a[n_tr : n_tr + n_va] for a in tr)
        tr = tuple(a[:n_tr] for a in tr)
    (tr_sparse, va_sparse), sizes = encode_sparse([tr[2], va[2]], table_size=table_size)
    train = CriteoArrays(tr[1], tr_sparse, tr[0], sizes)
    val = CriteoArrays(va[1], va_sparse, va[0], sizes)
    tmp = cache.with_name(cache.name + ".partial.npz")
    np.savez(
        tmp,
        tr_dense=train.dense, tr_sparse=train.sparse, tr_label=train.label,
        va_dense=val.dense, va_sparse=val.sparse, va_label=val.label,
        table_sizes=np.asarray(sizes),
    )  # fmt: skip
    tmp.replace(cache)
    return train, val
