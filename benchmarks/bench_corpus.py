"""Start-up of a training run's data: the in-memory lists (``--cache_dir off``) against the corpus cache.

    python benchmarks/bench_corpus.py [--pairs 1000000,4500000] [--spm_vocab_size 8000] [--modes lists,build,...]

For each size it writes a synthetic corpus (``simple_nmt/toy.py``) to a temporary folder and runs,
each in a fresh worker process, one after the other: ``lists`` (today's path: read, train SentencePiece,
encode to lists), ``build`` (an empty cache: the same, encoded into the cache), ``reuse`` (a second
run: map the cache) and ``torchrun x2`` (two processes under torchrun, gloo, reusing the cache). A
worker times the data from its start (after the imports) to the first training batch, and reports its
peak memory, the memory the data added to it (peak less the memory after the imports), and the peak of
its encoding processes (their ``ru_maxrss``, which counts the pages they share with the worker
at the fork). The pairs per second of ``build`` count the whole start-up, SentencePiece included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import current_rss_mb, table  # noqa: E402

MODES = ("lists", "build", "reuse", "torchrun x2")


def high_water_mb() -> float:
    """This process's peak resident memory, in MiB, since it started its program (``VmHWM``: unlike
    ``ru_maxrss``, which Linux keeps across ``exec``, it does not start at the parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def worker(train: str, valid: str, cache_dir: str, spm_vocab_size: int) -> None:
    """Build the data of a run as ``train.py`` does and print what it took as JSON (one line per rank)."""
    import ignite.distributed as idist

    from simple_nmt.config import default_config
    from simple_nmt.corpus import Corpus
    from simple_nmt.distributed import process_group

    with process_group(use_gpu=False):
        base = current_rss_mb()
        start = time.perf_counter()
        config = default_config(train=train, valid=valid, cache_dir=cache_dir, spm_vocab_size=spm_vocab_size,
                                batch_size=64)
        corpus = Corpus(config, None, lambda _: None)
        sampler, loader, _ = corpus.loaders(config)
        sampler.set_epoch(1)
        next(iter(loader))
        print(json.dumps({"rank": idist.get_rank(), "seconds": time.perf_counter() - start, "base_mb": base,
                          "peak_mb": high_water_mb(), "pairs": len(corpus.train.line_numbers),
                          "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}),
              flush=True)


def measure(mode: str, folder: Path, spm_vocab_size: int) -> dict:
    """Run a worker for ``mode``; its figures (the slowest rank's time, the largest rank's memory)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if mode == "torchrun x2" else []
    cache_dir = "off" if mode == "lists" else str(folder / "cache")
    command = [sys.executable, *launcher, __file__, "--worker", str(folder / "train"), str(folder / "valid"),
               cache_dir, str(spm_vocab_size)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{mode}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"wall": wall, "seconds": max(r["seconds"] for r in ranks), "pairs": ranks[0]["pairs"],
            "peak_mb": max(r["peak_mb"] for r in ranks),
            "added_mb": max(r["peak_mb"] - r["base_mb"] for r in ranks),
            "children_mb": max(r["children_mb"] for r in ranks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="1000000,4500000", help="training pairs of each synthetic corpus")
    p.add_argument("--spm_vocab_size", type=int, default=8000)
    p.add_argument("--modes", default=",".join(MODES), help=f"which runs, in order: {', '.join(MODES)}")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        train, valid, cache_dir, spm = args.worker
        worker(train, valid, cache_dir, int(spm))
        return
    from simple_nmt.toy import write_corpus

    modes = args.modes.split(",")
    if not set(modes) <= set(MODES) or "reuse" in modes and "build" not in modes:
        p.error(f"--modes: some of {', '.join(MODES)}; reuse after build")
    print(f"{os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}; --spm_vocab_size {args.spm_vocab_size}")
    rows = []
    for n in (int(x) for x in args.pairs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_corpus(tmp, {"train": n, "valid": 1000}, seed=1)
            for mode in modes:
                r = measure(mode, folder, args.spm_vocab_size)
                rate = f"{n / r['seconds']:,.0f}" if mode in ("lists", "build") else ""
                rows.append([f"{n:,}", mode, f"{r['seconds']:.1f}", f"{r['wall']:.1f}", rate, f"{r['peak_mb']:,.0f}",
                             f"{r['added_mb']:,.0f}", f"{r['children_mb']:,.0f}"])
                print(table(HEADERS, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(HEADERS, rows))


HEADERS = ["pairs", "run", "data start-up s", "process s", "pairs/s", "peak MiB", "added MiB", "encoders' peak MiB"]

if __name__ == "__main__":
    main()
