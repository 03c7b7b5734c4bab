"""K-FAC vs SGD step time and the KAISA communication phase with 1 and 2 CPU processes.

KAISA (Pauloski et al., SC 2021) distributes K-FAC's curvature work over DDP ranks; this driver
measures what that costs on CPU/gloo for the benchmark's small CNN: a fixed *global* batch of
128 (64 per rank with 2 processes), SGD with momentum and K-FAC (statistics every 10, inverses
every 100 steps) with ``grad_worker_fraction`` 1 (COMM_OPT) and 1/2 (MEM_OPT), each rank with
``--threads`` torch threads.  It launches itself under ``torch.distributed.run`` and prints a
table of mean step time, the communication phase per step and the curvature memory per rank.

    .venv/bin/python scripts/bench_scaling.py [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (("sgd", None), ("kfac", 1.0), ("kfac", 0.5))


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from ngbench.optimizers.kfac import KFAC
    from ngbench.runners.bench import SmallCNN
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    per = 128 // world
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    out = {}
    for name, frac in VARIANTS:
        if name == "kfac" and world == 1 and frac != 1.0:
            continue
        torch.manual_seed(0)
        model = SmallCNN()
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = KFAC(model, lr=0.01, grad_worker_fraction=frac)
        net = DistributedDataParallel(model) if world > 1 else model
        wall = cpu = 0.0
        for k in range(args.warmup + args.steps):
            if k == args.warmup:
                phases0 = dict(getattr(opt, "phase_times", dict)())
            w0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if k >= args.warmup:
                wall += time.perf_counter() - w0
                cpu += time.process_time() - c0
        phases = dict(getattr(opt, "phase_times", dict)())
        label = name if frac is None else f"kfac f={frac:g}"
        out[label] = {
            "step_ms": 1e3 * wall / args.steps,
            "cpu_ms": 1e3 * cpu / args.steps,
            "comm_ms": 1e3 * (phases.get("communication", 0.0)
                              - phases0.get("communication", 0.0)) / args.steps,
            "mem_mb": (opt.memory_usage()["total"] / 2**20) if name == "kfac" else 0.0,
        }
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        dist.destroy_process_group()
    else:
        gathered = [out]
    if rank == 0:
        Path(args.out).write_text(json.dumps(gathered))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--procs", default="1,2", help="process counts to compare")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return 0
    rows = []
    for n in [int(v) for v in args.procs.split(",")]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "res.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                   f"--master_port={port}", __file__, "--worker", "--out", str(res),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            print(f"running {n} process(es) ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            per_rank = json.loads(res.read_text())
        for label in per_rank[0]:
            r0 = per_rank[0][label]
            rows.append((n, label, r0["step_ms"], r0["cpu_ms"], r0["comm_ms"],
                         [r[label]["mem_mb"] for r in per_rank]))
    sgd = {n: ms for n, label, ms, *_ in rows if label == "sgd"}
    print(f"{'procs':>5} {'optimizer':<12} {'step ms':>9} {'x sgd':>7} {'cpu ms':>9} "
          f"{'comm ms':>8}  curvature MB per rank")
    for n, label, ms, cpu, comm, mem in rows:
        print(f"{n:>5} {label:<12} {ms:>9.2f} {ms / sgd[n]:>7.2f} {cpu:>9.2f} {comm:>8.2f}  "
              + ", ".join(f"{m:.2f}" for m in mem))
    print(f"global batch 128, {args.threads} thread(s) per process, rank-0 times, mean over "
          f"{args.steps} steps after {args.warmup} warm-up (gloo, CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
