"""Hydra entry point of ``ngbench train`` (``python -m runners.train`` is the same).

    ngbench train task=autoencoder optimizer=kfac
    ngbench train -m optimizer=sgd,adamw,kfac seed=0,1,2
    ngbench train -m hydra/launcher=slurm optimizer=sgd,kfac seed=0,1

The run folder is ``hydra.run.dir``
(``runs/[debug/<preset>/]<task>_<data>_<flavor>/<optimizer>/<overrides>/seed<N>``): a name
that follows from the config (``runners.identity``), so a rerun finds its own folder, skips
a finished run and resumes an unfinished one.  ``runners.config_check.ValidateConfig`` (a Hydra
callback) refuses a bad config before the folder is made.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from . import identity, schema

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
log = logging.getLogger("ngbench")


def _data_name(task: Any) -> str:
    """Folder component of the data a run really uses (``ngbench.tasks.config``: ``data_name``)."""
    from ngbench.tasks.config import task_config

    # a config's keys are strings
    node = (cast(dict[str, Any], OmegaConf.to_container(task, resolve=True))
            if OmegaConf.is_config(task) else task)
    try:
        return task_config(node).data_name
    except ValueError:  # refused with a clear message by runners.config_check
        return str(node.get("dataset"))


def _register_resolvers() -> None:
    resolvers: dict[str, Callable[..., Any]] = {
        "ngb_tag": lambda overrides: identity.folder_tag(overrides or []),
        "ngb_debug": identity.debug_prefix,
        "ngb_data": _data_name,
        "ngb_neutral": lambda: [*identity.FOLDER_KEYS, *identity.RESULT_NEUTRAL_KEYS],
        "ngb_max": lambda *xs: max(int(x) for x in xs),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_register_resolvers()
schema.register_schemas()


def user_errors() -> tuple[type[BaseException], ...]:
    from ngbench.tasks import DataNotFoundError

    from . import config_check

    return (*config_check.user_errors(), DataNotFoundError)


def _differences_note(cfg: DictConfig, run_dir: Path) -> str:
    """The result-changing keys in which ``cfg`` differs from the run in ``run_dir``."""
    old_path = run_dir / "config.yaml"
    if not old_path.exists():
        return ""
    # a config's keys are strings
    old = cast(dict[str, Any], OmegaConf.to_container(OmegaConf.load(old_path), resolve=False))
    new = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(old, dict) and isinstance(new, dict)
    diff = identity.differences(old, new)
    if not diff:
        return (
            "\nNo result-changing key differs (the folder's record was hashed by an older "
            "ngbench); delete the folder to rerun."
        )
    return "\nKeys that differ (folder's run -> this run):\n  " + "\n  ".join(diff)


def fail(msg: str) -> None:
    print(f"ngbench: error: {msg}", file=sys.stderr)
    sys.exit(2)


def run(cfg: DictConfig) -> float | None:
    from . import distributed
    from .checkpoint import CheckpointError
    from .config_check import check_config
    from .lock import RunLocked
    from .loop import RunAlreadyDone, RunConflict, train

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    try:
        check_config(cfg)
    except user_errors() as exc:
        fail(str(exc))
    assert run_dir is not None
    try:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        record = train(cfg, run_dir, preset=choices.get("optimizer"))
    except RunAlreadyDone as exc:
        print(f"ngbench: {exc}", file=sys.stderr)
        return None
    except RunLocked as exc:
        if multirun:  # a restarted sweep goes on with the cells nobody holds
            log.error("%s (skipped; the sweep goes on)", exc)
            return None
        fail(str(exc))
        return None
    except RunConflict as exc:
        fail(f"{exc}{_differences_note(cfg, run_dir)}")
        return None
    except CheckpointError as exc:
        fail(str(exc))
        return None
    except KeyboardInterrupt:  # a second Ctrl-C, or one during set-up: recorded, no traceback
        print(f"ngbench: aborted; its last checkpoint is kept -> {run_dir}", file=sys.stderr)
        sys.exit(130)
    except user_errors() as exc:
        fail(str(exc))
        return None
    except Exception as exc:  # recorded as failed in record.json
        if multirun:
            log.error(
                "run %s failed: %s: %s (recorded; the sweep goes on)",
                run_dir,
                type(exc).__name__,
                exc,
            )
            return None
        raise
    if distributed.current_rank() == 0:
        print(summary(record, run_dir), file=sys.stderr)
    if record["status"] == "interrupted":
        sys.exit(130)  # Ctrl-C ends a sweep too
    if record["status"] == "preempted" and not multirun:
        sys.exit(3)
    return objective(cfg, record)


def summary(record: dict[str, Any], run_dir: Path) -> str:
    """The one line a run ends with."""
    head = f"{record['status']}: {record['task']}/{record['optimizer']} seed {record['seed']}"
    if record["status"] in ("interrupted", "preempted"):
        return (
            f"{head} at step {record['steps_done']} of {record['steps']}; checkpoint saved, "
            f"the same command resumes it -> {run_dir}"
        )
    reached = record["steps_to_target"]
    return (
        f"{head} steps {record['steps_done']} train_time {record['train_time_s']:.1f}s "
        f"target({record['target']['metric']}) "
        + (f"reached at step {reached}" if reached else "not reached")
        + f" -> {run_dir}"
    )


def objective(cfg: DictConfig, record: dict[str, Any]) -> float:
    """The number a sweeper optimizes: the best value of ``objective_metric`` (default: the
    target metric); +inf (or -inf for a maximized metric) when the run diverged."""
    metric = cfg.get("objective_metric") or record["target"]["metric"]
    mode = record["target"]["mode"] if metric == record["target"]["metric"] else "min"
    worst = float("inf") if mode == "min" else float("-inf")
    if record["status"] != "completed":
        return worst
    value = record["best_metrics"].get(metric)
    return worst if value is None else float(value)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> Any:
    return run(cfg)


if __name__ == "__main__":
    main()
