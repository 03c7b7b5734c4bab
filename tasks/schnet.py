"""SchNet on molecular property prediction (Schütt, Kindermans, Sauceda, Chmiela, Tkatchenko
& Müller, "SchNet: A continuous-filter convolutional neural network for modeling quantum
interactions", NeurIPS 2017; "SchNet - a deep learning architecture for molecules and
materials", J. Chem. Phys. 148, 241722, 2018), one of the NG+ paper's tasks (Yang et al.,
arXiv 2106.07454).

Model and data come from schnetpack 2.2: its ``SchNet`` representation (Gaussian radial basis,
cosine cutoff), an ``Atomwise`` output summed over atoms, ``NeuralNetworkPotential`` with
``PairwiseDistances``; data in its ``ASEAtomsData`` format, neighbour lists from its
``ASENeighborList`` transform, reference energies removed with ``RemoveOffsets`` (single-atom
references plus the training mean per atom), ``CastTo32``, batches from ``_atoms_collate_fn``.
This mirrors schnetpack's own ``qm9_atomwise`` experiment (MSE loss; MAE metric).

Full flavor: QM9 (``energy_U0`` by default, in eV), 128 features, 6 interactions, 20 radial
functions, cutoff 5 Å, batch 100, 110,000 training / 10,000 validation molecules.  The SchNet
papers report about 0.014 eV MAE on U0 with 110k training molecules (figure to double-check
against the paper).  Tiny flavor: the ``ase_emt`` set (G2 molecules, displaced, EMT energies;
see ``tasks/_molecules.py``) with 32 features and 2 interactions.

Curvature optimizers: schnetpack's ``Dense`` is a subclass of ``nn.Linear`` that applies its
activation inside ``forward``, so a hook on it would see the *post*-activation output.
:func:`split_dense_activations` therefore moves each activation into its own module after the
``Dense`` (same parameters, same function), so that the hooked ``nn.Linear`` output is the
pre-activation.  Every trainable parameter then sits in an ``nn.Linear`` (filter networks,
in2f/f2out of each interaction, the atomwise MLP) or the ``nn.Embedding`` of atom types
(100 × features, only the rows of the elements present receive gradient).  The radial basis
and cutoff have no trainable parameters.  Note for K-FAC: those layers act on atoms
(in2f, f2out, atomwise MLP, embedding) or atom pairs (filter networks), so a hook sees rows of
atoms/pairs, not molecules; the loss is a mean over molecules.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._molecules import emt_path, qm9_path
from .base import DataNotFoundError, Task, TaskConfigError, epoch_permutation, shard_indices
from .config import SchNetConfig

PAPER_SIZES = {"n_atom_basis": 128, "n_interactions": 6, "n_rbf": 20, "cutoff": 5.0}
TINY_SIZES = {"n_atom_basis": 32, "n_interactions": 2, "n_rbf": 20, "cutoff": 5.0}
DEFAULT_PROPERTY = {"qm9": "energy_U0", "ase_emt": "energy"}
#: QM9 properties stored in Hartree (converted to eV on loading)
QM9_HARTREE = ("energy_U0", "energy_U", "enthalpy_H", "free_energy", "zpve", "homo", "lumo", "gap")
#: extensive properties (summed over atoms, with single-atom references removed)
EXTENSIVE = (
    "energy",
    "energy_U0",
    "energy_U",
    "enthalpy_H",
    "free_energy",
    "zpve",
    "heat_capacity",
)
QM9_PROPERTIES = (
    "rotational_constant_A", "rotational_constant_B", "rotational_constant_C", "dipole_moment",
    "isotropic_polarizability", "homo", "lumo", "gap", "electronic_spatial_extent", "zpve",
    "energy_U0", "energy_U", "enthalpy_H", "free_energy", "heat_capacity",
)  # fmt: skip
DEFAULT_SPLIT = {"qm9": (110_000, 10_000), "ase_emt": (1_600, None)}


class Activation(nn.Module):
    """A function activation as its own module (so the preceding ``nn.Linear`` is bare)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


def split_dense_activations(model: nn.Module) -> int:
    """Replace every schnetpack ``Dense`` with an activation by ``Sequential(Dense, act)``.

    The ``Dense`` keeps its parameters and gets an identity activation, so the model computes
    the same function while hooks on the ``nn.Linear`` see pre-activations.  Returns how many
    layers were split.
    """
    from schnetpack.nn import Dense

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Dense) and not isinstance(child.activation, nn.Identity):
                act = child.activation
                child.activation = nn.Identity()
                wrapped = act if isinstance(act, nn.Module) else Activation(act)
                setattr(parent, name, nn.Sequential(child, wrapped))
                count += 1
    return count


def _silence_schnetpack() -> None:
    logging.getLogger("schnetpack").setLevel(logging.WARNING)


#: per-structure keys of a schnetpack property dict, by what their first dimension counts
_PER_ATOM = ("_atomic_numbers", "_positions")
_PER_PAIR = ("_idx_i", "_idx_j", "_offsets")


def pack_items(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate schnetpack property dicts (one per structure) into one dict of tensors
    plus ``_n_pairs``; :func:`unpack_items` inverts it with views.  Indices stay local."""
    packed = {k: torch.cat([it[k].reshape(-1, *it[k].shape[1:]) for it in items]) for k in items[0]}
    packed["_n_pairs"] = torch.tensor([len(it["_idx_i"]) for it in items])
    return packed


def unpack_items(packed: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Per-structure views into a packed dict (see :func:`pack_items`)."""
    n_atoms = packed["_n_atoms"].tolist()
    n_pairs = packed["_n_pairs"].tolist()
    parts: dict[str, tuple[Tensor, ...]] = {}
    for key, value in packed.items():
        if key == "_n_pairs":
            continue
        if key in _PER_ATOM:
            sizes = n_atoms
        elif key in _PER_PAIR:
            sizes = n_pairs
        else:
            sizes = [len(value) // len(n_atoms)] * len(n_atoms)
        parts[key] = torch.split(value, sizes)
    return [{k: v[i] for k, v in parts.items()} for i in range(len(n_atoms))]


class SchNetTask(Task):
    name = "schnet"
    config_class = SchNetConfig
    datasets = SchNetConfig.DATASETS
    metric_modes = {"val_mae": "min", "val_rmse": "min", "val_loss": "min"}
    cfg: SchNetConfig

    def __init__(self, cfg: Mapping[str, Any] | SchNetConfig):
        super().__init__(cfg)
        c = self.cfg
        self.property = c.property or DEFAULT_PROPERTY[self.dataset]
        valid = QM9_PROPERTIES if self.dataset == "qm9" else ("energy",)
        if self.property not in valid:
            raise TaskConfigError(
                f"task.property={self.property!r} is not available in {self.dataset}; valid "
                "choices: " + ", ".join(valid)
            )
        defaults = TINY_SIZES if self.flavor == "tiny" else PAPER_SIZES
        self.sizes = {
            key: default if getattr(c, key) is None else type(default)(getattr(c, key))
            for key, default in defaults.items()
        }
        self.n_filters = int(c.n_filters or self.sizes["n_atom_basis"])
        n_tr, n_va = DEFAULT_SPLIT[self.dataset]
        self.n_train = int(c.n_train or n_tr)
        self.n_val = c.n_val or n_va
        self.split_seed = c.split_seed
        self.eval_batch_size = c.eval_batch_size
        self.extensive = self.property in EXTENSIVE
        self._train: list[dict[str, Tensor]] | None = None
        self._val: list[dict[str, Tensor]] = []
        self.stats: dict[str, float] = {}

    # -- data -----------------------------------------------------------------
    @classmethod
    def prepare_data(cls, dataset: str, root: Path) -> str:
        from schnetpack.data import ASEAtomsData

        _silence_schnetpack()
        if dataset == "ase_emt":
            path = emt_path(root)
        elif dataset == "qm9":
            path = qm9_path(root)
        else:
            raise TaskConfigError(
                f"dataset {dataset!r} is not a schnet data set; valid choices: qm9, ase_emt"
            )
        n = len(ASEAtomsData(str(path), load_properties=[]))
        return f"{dataset}: {n} structures in {path}"

    def _db_path(self) -> Path:
        return emt_path(self.data_root) if self.dataset == "ase_emt" else qm9_path(self.data_root)

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        n_val = n - self.n_train if self.n_val is None else int(self.n_val)
        if self.n_train + n_val > n or n_val <= 0:
            raise TaskConfigError(
                f"task.n_train={self.n_train} + task.n_val={n_val} exceeds the {n} structures "
                f"of {self.dataset}"
            )
        perm = np.random.default_rng(self.split_seed).permutation(n)
        return perm[: self.n_train], perm[self.n_train : self.n_train + n_val]

    def _raw_items(self) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Packed training and validation structures with neighbour lists (cached under
        the data folder) and the single-atom references of the property."""
        import schnetpack.transform as trn
        from schnetpack.data import ASEAtomsData

        _silence_schnetpack()
        path = self._db_path()
        units = {self.property: "eV"} if self.property in QM9_HARTREE else None
        data = ASEAtomsData(str(path), load_properties=[self.property], property_units=units)
        tr_idx, va_idx = self._split(len(data))
        arefs = data.atomrefs if self.extensive else {}
        atomref = arefs.get(self.property)
        atomref = torch.zeros(100) if atomref is None else atomref.to(torch.float64)

        key = f"{path.stat().st_size}-{self.property}-{self.sizes['cutoff']}-{self.split_seed}"
        key += f"-{self.n_train}-{len(va_idx)}-packed2"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        cache = path.with_name(f"{path.stem}.schnet-{digest}.pt")
        if cache.exists():
            blob = torch.load(cache, weights_only=True)
            return blob["train"], blob["val"], atomref
        neighbours = trn.ASENeighborList(cutoff=self.sizes["cutoff"])
        center = trn.SubtractCenterOfMass()

        def load(indices: np.ndarray) -> dict[str, Tensor]:
            out = []
            for i in indices.tolist():
                out.append(neighbours(center(data[i])))
            return pack_items(out)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny float64 matmuls per molecule: threads only add overhead
        try:
            train, val = load(tr_idx), load(va_idx)
        finally:
            torch.set_num_threads(threads)
        tmp = cache.with_suffix(".partial")
        torch.save({"train": train, "val": val}, tmp)
        tmp.replace(cache)
        return train, val, atomref

    def _data(self) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
        if self._train is None:
            import schnetpack.transform as trn

            train, val, atomref = self._raw_items()
            prop = self.property
            n_atoms = train["_n_atoms"].double()
            refs = torch.stack([atomref[it["_atomic_numbers"]].sum() for it in unpack_items(train)])
            raw_tr, raw_va = train[prop].double(), val[prop].double()
            per = (raw_tr - refs) / n_atoms if self.extensive else raw_tr
            mean = float(per.mean())
            offsets = trn.RemoveOffsets(
                prop,
                remove_mean=True,
                remove_atomrefs=self.extensive,
                is_extensive=self.extensive,
                atomrefs=atomref if self.extensive else None,
                property_mean=torch.tensor([mean], dtype=torch.float64),
            )
            cast = trn.CastTo32()

            def finish(packed: dict[str, Tensor]) -> list[dict[str, Tensor]]:
                packed = dict(packed)
                packed[prop] = packed[prop].to(torch.float64).clone()
                for item in unpack_items(packed):  # views: RemoveOffsets edits ``packed``
                    offsets(item)
                return unpack_items(cast(packed))

            self._train, self._val = finish(train), finish(val)
            self.stats = {"mean_per_atom": mean, **self._baselines(raw_tr, raw_va)}
        return self._train, self._val

    def _baselines(self, raw_train: Tensor, raw_val: Tensor) -> dict[str, float]:
        """Validation MAE of two trivial predictors: the training mean of the property
        (``baseline_mean_mae``) and atom references plus the training mean per atom times the
        atom count (``baseline_offsets_mae``, i.e. predicting 0 after ``RemoveOffsets``)."""
        assert self._val is not None
        va = torch.cat([it[self.property] for it in self._val]).double()
        return {
            "baseline_mean_mae": float((raw_val - raw_train.mean()).abs().mean()),
            "baseline_offsets_mae": float(va.abs().mean()),
        }

    def num_train_examples(self) -> int:
        return len(self._data()[0])

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        from schnetpack.data.loader import _atoms_collate_fn

        return _atoms_collate_fn(items)

    def train_batches(
        self, *, epoch: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[dict[str, Tensor]]:
        train, _ = self._data()
        perm = epoch_permutation(len(train), seed=seed, epoch=epoch)
        for idx in shard_indices(perm, batch_size=batch_size, rank=rank, world_size=world_size):
            yield self.collate([train[i] for i in idx.tolist()])

    # -- model, loss, evaluation -------------------------------------------------
    def build_model(self) -> nn.Module:
        import schnetpack as spk
        from schnetpack.nn.activations import shifted_softplus

        s = self.sizes
        representation = spk.representation.SchNet(
            n_atom_basis=s["n_atom_basis"],
            n_interactions=s["n_interactions"],
            radial_basis=spk.nn.GaussianRBF(n_rbf=s["n_rbf"], cutoff=s["cutoff"]),
            cutoff_fn=spk.nn.CosineCutoff(s["cutoff"]),
            n_filters=self.n_filters,
        )
        head = spk.atomistic.Atomwise(
            n_in=s["n_atom_basis"],
            output_key=self.property,
            aggregation_mode="sum" if self.extensive else "avg",
            activation=shifted_softplus,
        )
        model = spk.model.NeuralNetworkPotential(
            representation=representation,
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[head],
            do_postprocessing=False,
        )
        split_dense_activations(model)
        return model

    def describe(self) -> str:
        s = self.sizes
        return (
            f"SchNet ({s['n_atom_basis']} features, {s['n_interactions']} interactions, cutoff "
            f"{s['cutoff']} Å) on {self.dataset}/{self.property}; parameters outside "
            "Linear layers: the atom-type nn.Embedding only"
        )

    def _predict(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        dtype = next(model.parameters()).dtype
        inputs = {
            k: (v.to(dtype) if v.is_floating_point() and k != self.property else v)
            for k, v in batch.items()
        }
        return model(inputs)[self.property]

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pred = self._predict(model, batch)
        return F.mse_loss(pred, batch[self.property].to(pred.dtype)), pred

    def sampled_loss(self, outputs: Tensor) -> Tensor:
        """Gaussian likelihood with unit variance: targets = prediction + N(0, 1)."""
        with torch.no_grad():
            y = outputs + torch.randn_like(outputs)
        return F.mse_loss(outputs, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        _, val = self._data()
        was_training = model.training
        model.eval()
        abs_err, sq_err, n = 0.0, 0.0, 0
        for start in range(0, len(val), self.eval_batch_size):
            batch = self.to_device(self.collate(val[start : start + self.eval_batch_size]), device)
            pred = self._predict(model, batch).double()
            err = pred - batch[self.property].to(device).double()
            abs_err += float(err.abs().sum())
            sq_err += float(err.pow(2).sum())
            n += len(err)
        model.train(was_training)
        if n == 0:
            raise DataNotFoundError(f"{self.dataset}: the validation split is empty")
        return {"val_mae": abs_err / n, "val_rmse": (sq_err / n) ** 0.5, "val_loss": sq_err / n}
