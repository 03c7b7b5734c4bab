"""Molecular data for the SchNet task (Schütt et al., "SchNet: A continuous-filter
convolutional neural network for modeling quantum interactions", NeurIPS 2017; J. Chem. Phys.
148, 241722, 2018), in schnetpack's own ``ASEAtomsData`` format.

* ``qm9``: the QM9 database file written by schnetpack (``schnetpack.datasets.QM9`` saves it
  as ``qm9.db``; energies stored in Hartree with the GDB-9 single-atom references in its
  metadata).  Looked for under ``<data_root>/qm9.db`` or ``<data_root>/qm9/qm9.db``.
* ``ase_emt``: a small real data set made offline: the molecules of ASE's G2 collection whose
  elements ASE's effective-medium-theory calculator (EMT) supports, each randomly displaced
  (fixed seed), with EMT energies and forces.  The single-atom EMT energies are stored as the
  data set's ``atomrefs`` (schnetpack's convention for reference energies).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import DataNotFoundError

#: elements ASE's EMT calculator has parameters for
EMT_ELEMENTS = frozenset({"H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"})
EMT_FILE = "ase_emt/ase_emt_g2.db"
QM9_CANDIDATES = ("qm9.db", "qm9/qm9.db")


def qm9_path(root: Path) -> Path:
    """The schnetpack QM9 database under ``root``; :class:`DataNotFoundError` when absent."""
    for name in QM9_CANDIDATES:
        if (root / name).exists():
            return root / name
    looked = ", ".join(str(root / n) for n in QM9_CANDIDATES)
    raise DataNotFoundError(
        f"QM9 not found: looked at {looked}. Create it on a connected machine with schnetpack "
        f"(python -c \"import schnetpack as spk; spk.datasets.QM9('{root}/qm9.db', "
        'batch_size=100).prepare_data()"), copy it there, or point task.data_root at its '
        "folder. Check with: ngbench data qm9"
    )


def emt_molecules() -> list:
    """The G2 molecules (≥ 2 atoms) made only of EMT elements, in a fixed order."""
    from ase.collections import g2

    out = []
    for name in sorted(g2.names):
        atoms = g2[name]
        if len(atoms) >= 2 and set(atoms.get_chemical_symbols()) <= EMT_ELEMENTS:
            out.append(atoms)
    return out


def build_emt_dataset(
    path: Path, *, per_molecule: int = 24, sigma: float = 0.08, seed: int = 0
) -> int:
    """Write the ``ase_emt`` data set to ``path`` (an ASE SQLite ``.db``) and return its size.

    Each molecule gets ``per_molecule`` copies with Gaussian displacements of ``sigma`` Å;
    properties ``energy`` (eV) and ``forces`` (eV/Å) come from EMT.
    """
    from ase import Atoms
    from ase.calculators.emt import EMT
    from schnetpack.data import ASEAtomsData

    rng = np.random.default_rng(seed)
    calc = EMT()
    atomref = np.zeros(100)
    for z in sorted({int(z) for a in emt_molecules() for z in a.numbers}):
        single = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        single.calc = calc
        atomref[z] = single.get_potential_energy()

    props, structures = [], []
    for mol in emt_molecules():
        for _ in range(per_molecule):
            atoms = mol.copy()
            atoms.positions = atoms.positions + rng.normal(0.0, sigma, atoms.positions.shape)
            atoms.calc = calc
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            atoms.calc = None
            structures.append(atoms)
            props.append(
                {
                    "energy": np.array([energy], dtype=np.float64),
                    "forces": forces.astype(np.float64),
                }
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.db")
    if tmp.exists():
        tmp.unlink()
    logging.getLogger("schnetpack").setLevel(logging.WARNING)
    data = ASEAtomsData.create(
        str(tmp),
        distance_unit="Ang",
        property_unit_dict={"energy": "eV", "forces": "eV/Ang"},
        atomrefs={"energy": atomref.tolist(), "forces": np.zeros(100).tolist()},
    )
    with data.conn:
        data.add_systems(props, structures)
    n = len(data)
    del data
    tmp.replace(path)
    return n


def emt_path(root: Path, *, create: bool = True) -> Path:
    """The cached ``ase_emt`` data set under ``root`` (built on first use, a few seconds)."""
    path = root / EMT_FILE
    if not path.exists():
        if not create:
            raise DataNotFoundError(
                f"ase_emt data not found at {path}; build it with: ngbench data ase_emt"
            )
        build_emt_dataset(path)
    return path
