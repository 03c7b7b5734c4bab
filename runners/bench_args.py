"""``ngbench bench``'s command line, importable without torch (``bench --help`` stays fast).

The names of the benchmark models, the peer packages and the autocast dtypes live here; the
torch side (:mod:`runners.bench`) keys its builders by them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["AUTOCAST", "MODEL_NAMES", "PEERS", "csv_list", "parser"]

#: ``--model`` choices (:data:`runners.bench.MODELS` builds each)
MODEL_NAMES = ("small_cnn", "autoencoder", "resnet50")
#: ``--peers``: package -> (import name, the peer runners it adds)
PEERS = {
    "asdl": ("asdl", ("asdl_kfac", "asdl_ekfac")),
    "pytorch_optimizer": ("pytorch_optimizer", ("pto_shampoo",)),
}
#: ``--autocast`` choices -> torch dtype name
AUTOCAST = {"bf16": "bfloat16"}


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ngbench bench",
        description="Optimizer step overhead (mean step time vs SGD and AdamW, phases, memory).",
    )
    p.add_argument("--model", default="small_cnn", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--task", default=None, metavar="NAME[:KEY=VALUE...]",
                   help="a task's tiny flavor instead of --model (its model, loss and first "
                        "batch): autoencoder, resnet, transformer, schnet, recommender "
                        "(NCF; recommender:model=dlrm for DLRM)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    p.add_argument("--autocast", default=None, choices=sorted(AUTOCAST),
                   help="run forward and loss under torch.autocast with this dtype")
    p.add_argument("--keep-denormals", action="store_true",
                   help="time denormal arithmetic as it comes (default: flush denormals to "
                        "zero on the CPU; the bench repeats one batch, and a method that "
                        "memorises it drives the loss to ~1e-6 and its gradients into the "
                        "denormal range, where a CPU step costs 1.3-2x)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the cost model (floor ratio, excess phase, memory floor)")
    p.add_argument("--optimizers", type=csv_list, default=["sgd", "adamw", "kfac"],
                   help="comma-separated registered optimizers (sgd and adamw always run); "
                   "name:key=value[:key=value] runs a variant, e.g. "
                   "ekfac:projection_dtype=float32")
    p.add_argument("--peers", type=csv_list, default=[],
                   help=f"comma-separated peer packages: {', '.join(PEERS)}")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per optimizer (default: 2 x the largest refresh "
                        "frequency, at least 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--chunk", type=int, default=10, help="steps per optimizer per round")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole benchmark N times in this process (fresh models each "
                        "time) and report medians with the ratio range (default 1)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply every optimizer's bench lr (default 1; the bench repeats one "
                        "fixed batch, so a workload whose loss is a sum may need 0.1 or 0.01 to "
                        "keep every run finite: rows that end non-finite are flagged)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p
