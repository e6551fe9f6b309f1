"""Minimum Bayes risk selection: ``simple_nmt.mbr`` against sacrebleu loops (BLEU, chrF) and fastchrf.

    python benchmarks/bench_mbr.py [--sizes 16,64,256,1024] [--loop_pairs 16384] [--batch_pairs 65536] [--repeat 3]

Each source has N candidates that look like sampled translations of one sentence (15-35 words of a
Zipf-distributed vocabulary with punctuation; each candidate keeps a word with probability 0.8 and
otherwise substitutes, drops or inserts one), scored against the N candidates themselves
(pseudo-references); the candidate of the highest mean utility is selected. Methods:

- ``mbr_select(..., "bleu")``, and the loop the ``mbrs`` library runs: sacrebleu's
  ``BLEU(effective_order=True).sentence_score`` per (candidate, reference) pair, then mean and argmax;
- ``mbr_select(..., "chrf")``; ``fastchrf.pairwise_chrf`` on all pairs, then mean and argmax (the chrF
  implementation it uses, alone); and sacrebleu's ``CHRF().sentence_score`` per pair.

Each (N, method) runs in a process of its own on one CPU thread (``torch.set_num_threads(1)``,
``RAYON_NUM_THREADS=1`` for fastchrf). The library and fastchrf are timed on a batch of sources in one
call (best of ``--repeat``), divided by the number of sources. A sacrebleu loop scores the first
``ceil(loop_pairs / N)`` candidates of a source against all N references, over as many sources as fit
in ``--loop_pairs`` pairs (one at least): above N = 64 that is a subset of each source's pairs, and its
time is extrapolated to all N x N pairs (the "loop pairs" column says how many were timed). Peak memory
is the growth of the process's peak resident memory over its calls. "max |du|" compares the expected
utilities of the candidates the loop scored with the library's; "same pick" counts the sources whose
selection is the loop's (where the loop scored every pair).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import current_rss_mb, machine, peak_rss_mb, run_worker, table  # noqa: E402

METHODS = ("library bleu", "sacrebleu bleu", "library chrf", "fastchrf", "sacrebleu chrf")
WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will more "
         "house river city government people report market children water police council minister "
         "announced decided reported increased expected remained protested Berlin Geneva Obama "
         "2012 3.5 1,000 U.S. don't it's e-mail").split()
PUNCTUATION = (",", ".", "!", "?", ";", ":", '"', "(", ")", "-", "'s")


def make_sources(sources: int, n: int, seed: int = 0) -> list[list[str]]:
    """``sources`` lists of ``n`` candidates, each a noisy copy of the source's own sentence."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]  # Zipf

    def word() -> str:
        return rng.choices(WORDS, weights)[0] if rng.random() < 0.9 else rng.choice(PUNCTUATION)

    out = []
    for _ in range(sources):
        base = [word() for _ in range(rng.randint(15, 35))] + ["."]
        candidates = []
        for _ in range(n):
            words = []
            for w in base:
                r = rng.random()
                words += [w] if r < 0.8 else [word()] if r < 0.9 else [] if r < 0.95 else [w, word()]
            candidates.append(" ".join(words))
        out.append(candidates)
    return out


def worker(args: argparse.Namespace) -> dict:
    """Measure one (N, method); the numbers as a dict."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # before fastchrf starts its thread pool
    import fastchrf
    import torch
    from sacrebleu.metrics import BLEU, CHRF

    from simple_nmt.mbr import mbr_select

    torch.set_num_threads(1)
    n, sources = args.n, max(1, args.batch_pairs // args.n**2)
    candidates = make_sources(sources, n)
    rss_before = current_rss_mb()
    if args.method.startswith("sacrebleu"):
        metric = BLEU(effective_order=True) if args.method.endswith("bleu") else CHRF()
        rows = min(n, math.ceil(args.loop_pairs / n))
        looped = candidates[: max(1, args.loop_pairs // (rows * n))]

        def run() -> list[list[float]]:
            return [[math.fsum(metric.sentence_score(c, [r]).score for r in source) / n for c in source[:rows]]
                    for source in looped]

        start = time.perf_counter()
        utilities = run()
        seconds = (time.perf_counter() - start) / len(looped) * n / rows
        selected = [u.index(max(u)) for u in utilities] if rows == n else None
        return {"seconds": seconds, "memory_mb": peak_rss_mb() - rss_before, "pairs": len(looped) * rows * n,
                "utilities": utilities, "selected": selected}

    if args.method == "fastchrf":
        def run() -> list[list[float]]:
            scores = torch.tensor(fastchrf.pairwise_chrf(candidates, candidates), dtype=torch.float64)
            return scores.mean(dim=-1).tolist()  # |scores| = (sources, n, n)
    else:
        def run() -> list[list[float]]:
            return mbr_select(candidates, utility=args.method.split()[1]).utilities

    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        utilities = run()
        times.append(time.perf_counter() - start)
    distinct = sum(len(set(source)) for source in candidates) / (sources * n)
    return {"seconds": min(times) / sources, "memory_mb": peak_rss_mb() - rss_before, "sources": sources,
            "distinct": distinct, "utilities": utilities, "selected": [u.index(max(u)) for u in utilities]}


def compare(library: dict, loop: dict) -> tuple[float, str]:
    """The largest difference of the expected utilities the loop computed, and how many picks agree."""
    du = max(abs(a - b) for got, expected in zip(library["utilities"], loop["utilities"])
             for a, b in zip(got, expected))
    if loop["selected"] is None:
        return du, "-"
    same = sum(a == b for a, b in zip(library["selected"], loop["selected"]))
    return du, f"{same}/{len(loop['selected'])}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16,64,256,1024", help="comma-separated numbers of candidates N")
    p.add_argument("--loop_pairs", type=int, default=16384, help="pairs a sacrebleu loop scores, at least one row")
    p.add_argument("--batch_pairs", type=int, default=65536,
                   help="library and fastchrf: sources per call, as many as make about this many pairs (one at least)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(1)  # as in the workers, for the header
    bleu_rows, chrf_rows, headline = [], [], None
    for n in map(int, args.sizes.split(",")):
        r = {}
        for method in METHODS:
            command = [sys.executable, __file__, "--worker", "--method", method, "--n", str(n), "--loop_pairs",
                       str(args.loop_pairs), "--batch_pairs", str(args.batch_pairs), "--repeat", str(args.repeat)]
            r[method] = run_worker(command, f"N={n}, {method}")
        ms = {method: r[method]["seconds"] * 1e3 for method in METHODS}
        mib = {method: f"{max(0, r[method]['memory_mb']):.0f}" for method in METHODS}
        library, loop = r["library bleu"], r["sacrebleu bleu"]
        timed = f"{loop['pairs']}" + (" (extrapolated)" if loop["selected"] is None else "")
        du, same = compare(library, loop)
        bleu_rows.append([str(n), str(library["sources"]), f"{library['distinct']:.0%}", f"{ms['library bleu']:.2f}",
                          f"{ms['sacrebleu bleu']:.1f}", f"{ms['sacrebleu bleu'] / ms['library bleu']:.1f}x",
                          mib["library bleu"], mib["sacrebleu bleu"], f"{du:.1e}", same, timed])
        du, same = compare(r["library chrf"], r["sacrebleu chrf"])
        chrf_rows.append([str(n), f"{ms['library chrf']:.2f}", f"{ms['fastchrf']:.2f}",
                          f"{ms['fastchrf'] / ms['library chrf']:.2f}x", f"{ms['sacrebleu chrf']:.1f}",
                          f"{ms['sacrebleu chrf'] / ms['library chrf']:.1f}x", mib["library chrf"], mib["fastchrf"],
                          mib["sacrebleu chrf"], f"{du:.1e}", same, timed])
        print(f"N = {n} measured", file=sys.stderr, flush=True)
        if n == 64:
            headline = ms["sacrebleu bleu"] / ms["library bleu"]
    print(f"# MBR selection over N candidates per source (pseudo-references), one CPU thread: "
          f"{machine(torch.device('cpu'))}")
    print("\nBLEU (sacrebleu's sentence BLEU: 13a, exp smoothing, effective order), ms per source")
    print(table(["N", "sources", "distinct", "mbr_select ms", "sacrebleu loop ms", "speed-up", "peak MiB",
                 "loop peak MiB", "max |du|", "same pick", "loop pairs timed"], bleu_rows))
    print("\nchrF (sacrebleu's: character 6-grams, beta 2), ms per source")
    print(table(["N", "mbr_select ms", "fastchrf ms", "fastchrf / mbr_select", "sacrebleu loop ms", "speed-up",
                 "peak MiB", "fastchrf peak MiB", "loop peak MiB", "max |du|", "same pick", "loop pairs timed"],
                chrf_rows))
    if headline is not None:
        print(f"\nheadline: BLEU MBR is {headline:.1f}x the sacrebleu loop at N = 64 (target: 20x)")

if __name__ == "__main__":
    main()
