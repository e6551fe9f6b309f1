"""Shared helpers of the benchmarks: timing, memory, machine description."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable

import torch

# The models every benchmark measures: realistic NMT sizes, a shared subword vocabulary size.
VOCAB = 8000
MODELS = {
    "transformer": {"use_transformer": True, "hidden_size": 256, "n_layers": 3, "n_splits": 4, "dropout": 0.1},
    "seq2seq": {"use_transformer": False, "word_vec_size": 256, "hidden_size": 512, "n_layers": 2, "dropout": 0.1},
}


def best_time(fn: Callable[[], object], repeat: int = 5, device: torch.device | None = None) -> float:
    """The fastest of ``repeat`` runs of ``fn`` in seconds, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device) -> str:
    """One line describing where the numbers come from."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
