"""The ResNet task: model shapes against the papers' architectures, option-A shortcuts,
zero-init residuals, data order and sharding, the sampled-label loss, hooks on every layer, the
ImageFolder path of the full flavor, and a tiny run that learns."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ngbench import optimizers
from ngbench.tasks import DataNotFoundError, TaskConfigError, build_task
from ngbench.tasks.resnet import PadShortcut, build_resnet
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for these small models: on a shared 2-core machine several threads
    spin against each other (measured: several times slower under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _task(**kw):
    cfg = {"name": "resnet", "flavor": "tiny", "dataset": "cifar10", "num_workers": 0}
    cfg.update(kw)
    return build_task(cfg)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_param_counts_match_the_architectures():
    # torchvision's documented ResNet-50 size
    assert _n_params(build_resnet("resnet50", num_classes=1000)) == 25_557_032
    # ResNet-18 with the CIFAR stem: torchvision's 11,689,512 minus the 7x7 stem (9,408) and the
    # 1000-way classifier (513,000), plus a 3x3 stem (1,728) and a 10-way classifier (5,130)
    assert _n_params(build_resnet("resnet18", num_classes=10)) == 11_173_962
    # He et al. 2016 CIFAR ResNet-6n+2 with option-A shortcuts, from the layer list
    for depth in (20, 32):
        n = (depth - 2) // 6
        total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
        c_in = 16
        for c in (16, 32, 64):
            for _ in range(n):
                total += c_in * c * 9 + c * c * 9 + 4 * c  # two convs, two BNs
                c_in = c
        total += 64 * 10 + 10
        assert _n_params(build_resnet(f"resnet{depth}", num_classes=10)) == total
    assert total == 464_154  # ResNet-32: "0.46M" in He et al. Table 6


def test_cifar_models_keep_resolution_in_the_stem():
    m = build_resnet("resnet18", num_classes=10)
    assert isinstance(m.maxpool, nn.Identity)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    # after the stem the feature map is still 32x32
    assert m.bn1(m.conv1(x)).shape[-2:] == (32, 32)
    assert build_resnet("resnet32", num_classes=100)(x).shape == (2, 100)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_zero_init_residual_makes_identity_blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    for name in ("resnet32", "resnet50"):
        m = build_resnet(name, num_classes=10, zero_init_residual=True).eval()
        blocks = [b for b in m.modules() if isinstance(b, (BasicBlock, Bottleneck))]
        plain = [b for b in blocks if b.downsample is None]
        assert plain
        for b in plain[:3]:
            c = b.conv1.in_channels
            x = torch.randn(2, c, 8, 8)
            # the residual branch is zero: the block is relu(x)
            torch.testing.assert_close(b(x.clone()), torch.relu(x))
    m = build_resnet("resnet32", num_classes=10, zero_init_residual=False)
    assert all(
        float(b.bn2.weight.abs().sum()) > 0 for b in m.modules() if isinstance(b, BasicBlock)
    )


def test_batches_are_a_function_of_seed_and_epoch_and_shard_by_rank():
    task = _task()
    a = [y for _, y in task.train_batches(epoch=0, batch_size=100, seed=3)]
    b = [y for _, y in task.train_batches(epoch=0, batch_size=100, seed=3)]
    c = [y for _, y in task.train_batches(epoch=1, batch_size=100, seed=3)]
    assert len(a) == 40 == task.steps_per_epoch(100)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a, c, strict=True))
    x0 = [x for x, _ in task.train_batches(epoch=2, batch_size=100, seed=1)]
    r0 = [x for x, _ in task.train_batches(epoch=2, batch_size=100, seed=1, rank=0, world_size=2)]
    r1 = [x for x, _ in task.train_batches(epoch=2, batch_size=100, seed=1, rank=1, world_size=2)]
    for full, p0, p1 in zip(x0, r0, r1, strict=True):
        assert p0.shape[0] == p1.shape[0] == 50
        assert torch.equal(torch.cat([p0, p1]), full)
    x, y = next(task.train_batches(epoch=0, batch_size=8, seed=0))
    assert x.shape == (8, 1, 14, 14) and y.dtype == torch.int64


def test_sampled_loss_draws_labels_from_the_softmax():
    """E_y~p[grad CE(z, y)] = p - E[onehot(y)] = 0: the summed gradient over many identical rows
    averages out, while the gradient against a fixed label does not."""
    torch.manual_seed(0)
    task = _task()
    z0 = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    z = z0.repeat(20_000, 1).requires_grad_(True)
    task.sampled_loss(z).backward()
    g = z.grad.sum(0)  # = p - (label frequencies)
    assert float(g.abs().max()) < 0.02
    fixed = torch.nn.functional.cross_entropy(z0[None].requires_grad_(), torch.tensor([0]))
    assert float(fixed) > 0.3  # not degenerate: p(label 0) ~ 0.5


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_hooks_fire_on_every_conv_and_linear_layer():
    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    seen_fwd, seen_bwd = set(), set()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert len(layers) == 6  # stem, 2 convs x 2 blocks, fc (option-A shortcuts have no conv)
    for name, mod in layers.items():
        mod.register_forward_pre_hook(lambda m, i, n=name: seen_fwd.add(n))
        mod.register_full_backward_hook(lambda m, gi, go, n=name: seen_bwd.add(n))
    batch = next(task.train_batches(epoch=0, batch_size=16, seed=0))
    loss, out = task.loss(model, batch)
    loss.backward()
    assert seen_fwd == seen_bwd == set(layers)


def test_tiny_run_learns_well_above_chance():
    """150 AdamW steps of batch 128 on 4,000 real digits: measured ~0.86 validation accuracy
    (about 3 s of CPU time), far above chance (0.1)."""
    torch.manual_seed(0)
    task = _task()
    model = task.build_model()
    opt = optimizers.build_optimizer("adamw", model, lr=3e-3)
    before = task.evaluate(model, torch.device("cpu"))
    t0 = time.process_time()
    batches = (
        b for epoch in range(10) for b in task.train_batches(epoch=epoch, batch_size=128, seed=0)
    )
    for _, batch in zip(range(150), batches, strict=False):
        opt.zero_grad(set_to_none=True)
        loss, _ = task.loss(model, batch)
        loss.backward()
        opt.step()
    after = task.evaluate(model, torch.device("cpu"))
    assert time.process_time() - t0 < 60
    assert set(after) == {"val_acc", "val_loss"}
    assert after["val_acc"] > 0.5, after
    assert after["val_loss"] < before["val_loss"] - 0.5, (before, after)


def test_config_errors_name_the_key():
    with pytest.raises(TaskConfigError, match=r"task.model='resnet7'.*valid choices: resnet50"):
        _task(model="resnet7")
    with pytest.raises(TaskConfigError, match=r"task.dataset='svhn'.*imagenet, cifar10"):
        _task(dataset="svhn")
    with pytest.raises(TaskConfigError, match="task.label_smoothing"):
        _task(label_smoothing=1.5)


def test_missing_full_data_names_the_path_and_the_command(tmp_path):
    for ds in ("imagenet", "cifar10", "cifar100", "mnist"):
        task = _task(flavor="full", dataset=ds, data_root=str(tmp_path))
        with pytest.raises(DataNotFoundError, match=str(tmp_path)) as err:
            task.num_train_examples()
        assert f"ngbench data {ds}" in str(err.value)


def _write_image_folder(root: Path, n_classes: int, per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(n_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (40 + 4 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.png")


def test_full_imagenet_path_reads_an_image_folder_with_workers(tmp_path):
    """The full flavor's ImageFolder + augmentation + multi-worker loader on a fake 3-class
    folder (a cheap model stands in for ResNet-50)."""
    _write_image_folder(tmp_path / "imagenet", n_classes=3, per_class=4)
    task = _task(
        flavor="full",
        dataset="imagenet",
        data_root=str(tmp_path),
        model="tiny_resnet",
        num_workers=2,
        eval_batch_size=5,
    )
    assert "found under" in type(task).prepare_data("imagenet", tmp_path)
    assert task.num_train_examples() == 12
    batches = list(task.train_batches(epoch=0, batch_size=4, seed=0, rank=1, world_size=2))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (2, 3, 224, 224) and y.dtype == torch.int64
    again = list(task.train_batches(epoch=0, batch_size=4, seed=0, rank=1, world_size=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    model = task.build_model()
    assert model.fc.out_features == 1000
    metrics = task.evaluate(model, torch.device("cpu"))
    assert set(metrics) == {"val_top1", "val_top5", "val_loss"}
    assert 0.0 <= metrics["val_top1"] <= metrics["val_top5"] <= 1.0
