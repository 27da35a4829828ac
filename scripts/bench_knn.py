"""Benchmark the kNN monitor's memory per rank: gathering the bank against the sharded kNN.

Two gloo processes on CPU hold a random bank (``--bank`` rows of ``--dim`` L2-normalised
features, split in two) and a query set. Three ways of scoring it, in one run:

- gather: every rank gathers the whole bank, then classifies its own queries (the monitor
  before the bank was sharded);
- sharded: each rank keeps its half, the queries are shared a chunk at a time and the top-k
  candidates merged (``knn_correct(..., sharded=True)``);
- sharded fp16: the same with the bank kept in fp16.

Peak feature memory per rank is the bank shard each rank starts with plus the most bytes of
tensors the scoring holds at once, counted op by op (``optim.op_count.peak_bytes``), so it
is deterministic. Time is the median of ``--repeats`` runs. The gather and the fp32 sharded
kNN must count the same correct answers; fp16 may differ by its rounding. Usage:
``python scripts/bench_knn.py [--bank N] [--dim D]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from optim.op_count import peak_bytes
from ssl_toolkit.distributed import all_gather_rows
from ssl_toolkit.knn import knn_correct

WORLD = 2


def _data(args: argparse.Namespace, rank: int) -> tuple[torch.Tensor, ...]:
    """This rank's half of the bank and of the queries, the same on every run."""
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.bank, args.dim, generator=g), dim=1)
    labels = torch.randint(0, 10, (args.bank,), generator=g)
    noise = 0.05 * torch.randn(args.queries, args.dim, generator=g)
    queries = F.normalize(bank[: args.queries] + noise, dim=1)
    query_labels = labels[: args.queries]
    half = lambda x: x.chunk(WORLD)[rank].clone()  # noqa: E731
    return half(bank), half(labels), half(queries), half(query_labels)


def _variants(args: argparse.Namespace, rank: int) -> dict[str, Any]:
    bank, labels, queries, query_labels = _data(args, rank)
    common = {"k": args.k, "num_classes": 10, "normalised": True}

    def gather() -> int:
        whole, whole_labels = all_gather_rows(bank), all_gather_rows(labels)
        correct = knn_correct(whole, whole_labels, queries, query_labels, **common)
        dist.all_reduce(correct)
        return correct.item()

    def sharded(shard: torch.Tensor) -> int:
        return knn_correct(shard, labels, queries, query_labels, sharded=True, **common).item()

    half_bank = bank.half()
    runs = {
        "gather (fp32)": (gather, bank),
        "sharded (fp32)": (lambda: sharded(bank), bank),
        "sharded (fp16)": (lambda: sharded(half_bank), half_bank),
    }
    results = {}
    for name, (run, shard) in runs.items():
        correct, peak = peak_bytes(run)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        held = shard.numel() * shard.element_size()
        results[name] = {"correct": correct, "peak": held + peak, "seconds": times}
    return results


def _rank(rank: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        out[rank] = _variants(args, rank)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000, help="bank rows, all ranks")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension")
    parser.add_argument("--queries", type=int, default=10_000, help="query rows, all ranks")
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, args, out), nprocs=WORLD, join=True)
        ranks = [out[r] for r in range(WORLD)]
    table = Table(
        title=f"kNN on {WORLD} gloo processes: bank {args.bank:,} x {args.dim}, "
        f"{args.queries:,} queries, k={args.k}"
    )
    columns = ("variant", "peak feature MiB per rank", "vs gather", "seconds (median)", "correct")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    gather_peak = max(r["gather (fp32)"]["peak"] for r in ranks)
    for name in ranks[0]:
        peak = max(r[name]["peak"] for r in ranks)
        seconds = statistics.median(t for r in ranks for t in r[name]["seconds"])
        correct = ranks[0][name]["correct"]
        table.add_row(
            name,
            f"{peak / 2**20:,.1f}",
            f"{peak / gather_peak:.2f}",
            f"{seconds:.2f}",
            f"{correct:,} of {args.queries:,}",
        )
    Console(width=120).print(table)
    counts = {r[name]["correct"] for r in ranks for name in ("gather (fp32)", "sharded (fp32)")}
    if len(counts) != 1:
        raise SystemExit(f"the gather and the sharded kNN disagree: {sorted(counts)}")


if __name__ == "__main__":
    main()
