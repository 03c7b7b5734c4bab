"""Run-folder files: atomic writes, provenance, and reading run folders back.

A run folder holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (one row per
evaluation), ``record.json`` (status, target, results, provenance) and, while a run is
unfinished, ``checkpoint.pt``.  It is the source of truth; W&B only mirrors it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where needed: `ngbench report --help` stays fast
    import torch

RECORD = "record.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_PREV = "checkpoint.prev.pt"  # the generation before CHECKPOINT (a torn one falls back)
LOCK = "run.lock"  # flock'ed by the one process that owns the folder; names its holder
STATUSES = ("running", "completed", "diverged", "failed", "preempted", "interrupted")
TERMINAL = ("completed", "diverged")
REPO_ROOT = Path(__file__).resolve().parent.parent


def file_mode() -> int:
    """Mode of a new file under this process's umask (0644 under the usual 022)."""
    try:  # Linux >= 4.7 shows the umask without changing it (os.umask would, for all threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], object], *, keep_previous: Path | None = None
) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old or the new file, never
    half; the mode follows the umask. With ``keep_previous``, the old file moves there first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (a crash right after a write keeps the new name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if type(x).__module__.startswith("torch") and hasattr(x, "numel"):  # a tensor
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x)}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``; a torn last line (killed mid-write) is ignored."""
    rows: list[dict[str, Any]] = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_metrics(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one row durably (a whole line per write, fsynced)."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def config_hash(resolved: dict[str, Any]) -> str:
    """Hash of the parts of a config that decide the result (``ngbench.runners.identity``)."""
    from .identity import config_hash as identity_hash

    return identity_hash(resolved)


def git_commit() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


_PACKAGES = ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "wandb", "ngbench")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware(device: torch.device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def load_run(folder: Path) -> dict[str, Any] | None:
    """``{'record', 'metrics', 'config', 'path'}`` of a run folder, or None if it has no record."""
    folder = Path(folder)
    rec_path = folder / RECORD
    if not rec_path.exists():
        return None
    from omegaconf import OmegaConf

    cfg_path = folder / CONFIG
    cfg = OmegaConf.to_container(OmegaConf.load(cfg_path)) if cfg_path.exists() else {}
    return {
        "path": folder,
        "record": read_json(rec_path),
        "metrics": read_metrics(folder / METRICS),
        "config": cfg,
    }


def find_run_folders(root: Path) -> list[Path]:
    """Every folder below ``root`` (inclusive) that holds a ``record.json`` or a checkpoint."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RECORD)} | {p.parent for p in root.rglob(CONFIG)}
    return sorted(p for p in found if ".hydra" not in p.parts and "wandb" not in p.parts)
