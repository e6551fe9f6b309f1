"""Shared helpers of the benchmarks: timing, memory, machine description."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parents[1]

# The models every benchmark measures: realistic NMT sizes, a shared subword vocabulary size.
VOCAB = 8000
MODELS = {
    "transformer": {"use_transformer": True, "hidden_size": 256, "n_layers": 3, "n_splits": 4, "dropout": 0.1},
    "seq2seq": {"use_transformer": False, "word_vec_size": 256, "hidden_size": 512, "n_layers": 2, "dropout": 0.1},
}


def stepped_decoder() -> contextlib.AbstractContextManager:
    """A patch under which Seq2Seq's decoder trains with one ``nn.LSTM`` call per step, on the kernels
    ``precision.lstm_backend`` chooses, as it did before ``UnrolledLSTM``. The project's seq2seq module is
    imported here, not at the top: a worker of the original toolkit imports a package of the same name."""
    import simple_nmt.models.seq2seq

    return unittest.mock.patch.object(simple_nmt.models.seq2seq, "unrolls", lambda lstm, emb: False)


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


def limit_memory(device: torch.device, budget_mb: float) -> None:
    """Let this process allocate at most ``budget_mb`` MiB beyond what it holds now: on CPU through
    RLIMIT_DATA (its heap and private mappings, memory the C library keeps after a free included), on
    GPU through the caching allocator's fraction (memory it reserves, cached blocks included).
    Beyond it, allocations fail with an out-of-memory error (see ``is_out_of_memory``)."""
    budget = int(budget_mb * 2**20)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_reserved(device) + budget) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        return
    with open("/proc/self/status") as f:
        vm_data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    soft = vm_data_kb * 1024 + budget
    if hard != resource.RLIM_INFINITY and soft > hard:
        raise SystemExit(f"--memory_budget_mb {budget_mb:g}: above this shell's hard RLIMIT_DATA ({hard} bytes)")
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: CUDA's, the CPU allocator's, C++'s, oneDNN's (whose
    LSTM reports one as "could not create a primitive") or Python's."""
    message = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(text in message for text in (
        "can't allocate memory", "Cannot allocate memory", "bad_alloc", "could not create a primitive"))


def machine(device: torch.device) -> str:
    """One line describing where the numbers come from."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        where = f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def time_steps(step: Callable[[], object], n_steps: int, device: torch.device, memory_budget_mb: float = 0) -> dict:
    """The fastest of ``n_steps`` calls of ``step`` after a warm-up call, and the peak memory they took beyond
    what the process held before (peak RSS growth on CPU, ``max_memory_allocated`` on GPU), as
    ``{"seconds", "memory_mb"}``; ``{"oom": True}`` if a step ran out of memory (``memory_budget_mb``, if
    > 0, is the budget: see ``limit_memory``)."""
    if memory_budget_mb:
        limit_memory(device, memory_budget_mb)
    rss_before = current_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    try:
        for _ in range(n_steps + 1):  # the first is a warm-up
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            return {"oom": True}
        raise
    memory = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" \
        else peak_rss_mb() - rss_before
    return {"seconds": min(times[1:]), "memory_mb": memory}


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def recorded_products(model: torch.nn.Module) -> Iterator[list[tuple[int, torch.Tensor, bool]]]:
    """Record every matrix product of ``model``'s linear layers and LSTM gates while the block runs, as
    (input rows, weight, whether autograd records it): what ``replay_products`` replays."""
    products: list[tuple[int, torch.Tensor, bool]] = []

    def record(module, inputs, output) -> None:
        if isinstance(module, torch.nn.Linear):
            products.append((inputs[0].numel() // inputs[0].size(-1), module.weight, torch.is_grad_enabled()))
            return
        x = inputs[0].data if hasattr(inputs[0], "batch_sizes") else inputs[0]  # packed sequences
        rows = x.numel() // x.size(-1)
        for name, weight in module.named_parameters():
            if name.startswith("weight_"):
                products.append((rows, weight, torch.is_grad_enabled()))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (torch.nn.Linear,
                                                                                           torch.nn.LSTM))]
    try:
        yield products
    finally:
        for h in hooks:
            h.remove()


def replay_products(products: list[tuple[int, torch.Tensor, bool]], device: torch.device,
                    dtype: torch.dtype | None = None) -> tuple[Callable[[], None], float]:
    """A function that runs the recorded products alone, at the same shapes (under autocast to ``dtype``
    if given), and their GFLOP. A product autograd recorded is replayed with its two backward products
    (the input's gradient and the weight's), so that the replay is the limit of a forward and backward
    that computes no less. The weights are the model's parameters themselves, so that autocast casts each
    of them once per replay, as it does once per forward pass or decoding (its cache keeps the casts of
    parameters), not once per product."""
    work = []
    for rows, w, with_grad in products:
        x = torch.randn(rows, w.size(1), device=device)  # |x| = (rows, in_features)
        g = torch.randn(rows, w.size(0), device=device) if with_grad else None  # |g| = (rows, out_features)
        work.append((x, w, g))

    def replay() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for x, w, g in work:
                F.linear(x, w)
                if g is not None:
                    g @ w  # the input's gradient
                    g.t() @ x  # the weight's gradient

    flop = sum(2 * x.numel() * w.size(0) * (1 if g is None else 3) for x, w, g in work)
    return replay, flop / 1e9


@contextlib.contextmanager
def checkout(ref: str | None):
    """A worktree of the project at ``ref`` (None: nothing)."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "before"
        subprocess.run(["git", "-C", str(PROJECT), "worktree", "add", "--detach", str(path), ref], check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(PROJECT), "worktree", "remove", "--force", str(path)], check=True)


def in_turn(first: Callable[[], Any], second: Callable[[], Any], second_first: bool) -> tuple[Any, Any]:
    """``first()`` and ``second()``, ``second`` run first if ``second_first``: alternating which runs first
    from one measurement to the next keeps a drift of the machine out of the ratios."""
    if second_first:
        other = second()
        return first(), other
    return first(), second()


def now_and_before(measure: Callable[[Path], dict], before: Path | None, before_first: bool
                   ) -> tuple[dict, dict | None]:
    """``measure`` of the current code (``PROJECT``) and, given a checkout ``before``, of that code too
    (None without), ``before`` measured first if ``before_first`` (``in_turn``)."""
    if before is None:
        return measure(PROJECT), None
    return in_turn(lambda: measure(PROJECT), lambda: measure(before), before_first)


def run_worker(command: list[str], what: str, env: dict[str, str] | None = None) -> dict:
    """Run a benchmark's worker process (with ``env`` added to the environment); the JSON of its last
    output line, or exit naming ``what``."""
    proc = subprocess.run(command, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if proc.returncode:
        sys.exit(f"{what}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_translation_time(command: list[str], repeat: int) -> None:
    """Run ``translate.py``'s entry point with ``command`` (plus ``--output``) ``repeat`` times; print, as
    JSON, the best time in seconds and the lines it wrote (what a worker process reports)."""
    from simple_nmt.cli import main_translate

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "out.txt"
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            main_translate([*command, "--output", str(output)])
            times.append(time.perf_counter() - start)
        lines = output.read_text(encoding="utf-8").splitlines()
    print(json.dumps({"seconds": min(times), "lines": lines}))

