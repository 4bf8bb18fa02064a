"""Gradient averaging across processes: ``DataParallelSync``'s one all-reduce
after backward against torch's ``DistributedDataParallel`` (a benchmark, not a test).

    python -m benchmarks.studies.ddp_sync                      # 2 processes, gloo, ResNet-32, batch 64 each
    python -m benchmarks.studies.ddp_sync --device cuda        # one process per GPU, nccl

Every process trains the same model (same init) on its own batch. Three ways
to take a step, interleaved over the repeats, each reported as the median
milliseconds per iteration over repeats:

* ``none``: no averaging (the floor; the ranks drift apart);
* ``allreduce``: :func:`avalanche_m2kd.distributed.sync_gradients` after the
  backward pass, what :class:`~avalanche_m2kd.distributed.DataParallelSync` does;
* ``ddp``: the model wrapped in ``DistributedDataParallel``, whose bucketed
  all-reduces overlap the backward pass.

``allreduce`` minus ``none`` is the most that DDP's overlap could win back.
The run also checks that ``allreduce`` and ``ddp`` leave every rank with the
same weights after the same steps from the same start. Writes ddp_sync.json
and ddp_sync.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from avalanche_m2kd import models
from avalanche_m2kd.distributed import sync_gradients

WAYS = ("none", "allreduce", "ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model: nn.Module, wrapped: nn.Module, optimizer, x, y, way: str) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(wrapped(x), y).backward()
    if way == "allreduce":
        sync_gradients(model)
    optimizer.step()


def _fresh(args, device):
    torch.manual_seed(0)  # the same start on every rank
    model = models.create(args.model, num_classes=args.classes, in_channels=3).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _wrap(model: nn.Module, way: str, device) -> nn.Module:
    if way != "ddp":
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(rank: int, world: int, args, port: int, results) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
        x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)

        # the same steps from the same start: allreduce and ddp must agree
        finals = {}
        for way in ("allreduce", "ddp"):
            model, optimizer = _fresh(args, device)
            wrapped = _wrap(model, way, device)
            for _ in range(args.check_steps):
                _step(model, wrapped, optimizer, x, y, way)
            finals[way] = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
        mismatch = float((finals["allreduce"] - finals["ddp"]).abs().max())

        times: Dict[str, List[float]] = {w: [] for w in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                model, optimizer = _fresh(args, device)
                wrapped = _wrap(model, way, device)
                for _ in range(args.warmup):
                    _step(model, wrapped, optimizer, x, y, way)
                _sync(device)
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.iterations):
                    _step(model, wrapped, optimizer, x, y, way)
                _sync(device)
                times[way].append((time.perf_counter() - start) / args.iterations * 1e3)
                dist.barrier()
        if rank == 0:
            results.put({"times_ms": times, "max_weight_difference": mismatch})
    finally:
        dist.destroy_process_group()


def run(args) -> dict:
    """Spawn ``--world`` processes and return rank 0's measurements."""
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"error: --world {args.world} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_worker, args=(args.world, args, _free_port(), results), nprocs=args.world, join=True)
    found = results.get()
    medians = {w: statistics.median(v) for w, v in found["times_ms"].items()}
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "median_ms": medians,
        "all_ms": found["times_ms"],
        "max_weight_difference": found["max_weight_difference"],
        "parameters": sum(p.numel() for p in models.create(args.model, num_classes=args.classes, in_channels=3).parameters()),
    }


def report(result: dict) -> str:
    c, m = result["config"], result["median_ms"]
    lines = [
        f"# Gradient averaging, {c['world']} processes on {c['device']}, {c['model']} "
        f"({result['parameters']:,} parameters), batch {c['batch_size']} per process",
        "",
        f"Median over {c['repeats']} repeats of {c['iterations']} iterations; torch {result['torch']}.",
        f"Command: `{result.get('command', 'python -m benchmarks.studies.ddp_sync')}`.",
        "",
        "| way | ms / iteration | vs none |",
        "|---|---|---|",
    ]
    lines += [f"| {w} | {m[w]:.1f} | {m[w] / m['none']:.3f}x |" for w in WAYS]
    lines += [
        "",
        f"Largest weight difference between allreduce and ddp after {c['check_steps']} identical steps: "
        f"{result['max_weight_difference']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.ddp_sync", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="resnet32_icarl", choices=sorted(models.MODELS))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="per process (default 64: 128 over 2 processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--out", default="results/ddp_sync")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.world < 2:
        raise SystemExit("error: --world must be at least 2 (one process has nothing to average)")
    result = run(args)
    result["command"] = "python -m benchmarks.studies.ddp_sync " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_sync.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (out / "ddp_sync.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
