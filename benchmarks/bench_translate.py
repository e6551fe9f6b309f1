"""Translating a file with a trained checkpoint: beam search as ``translate.py`` runs it, per precision.

    python benchmarks/bench_translate.py --model_fn CHECKPOINT --input FILE [--before REF]
                                         [--precisions fp32,bf16] [--beam_size 5] [--batch_size 128]
                                         [--device cuda] [--threads 1] [--repeat 2]

Unlike ``bench_decoding.py``, whose untrained models decode every output to the length limit, a
trained model's outputs end where its translations end, so that this measures what stopping the
work on ended hypotheses and sources saves. Each measurement runs in a process of its own, which
imports ``simple_nmt`` from the code measured and calls ``translate.py``'s entry point on the
whole file (the checkpoint's loading included); the time is the fastest of ``--repeat`` calls.
``--before REF`` measures the same with the project at git revision REF beside it (alternating
which runs first) and gives the speed-up and how many output lines are the same in both.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROJECT, checkout, machine, now_and_before, print_translation_time, run_worker, table  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    """Translate ``--input`` with the code under ``--code``; print the seconds and the output lines as JSON."""
    sys.path.insert(0, args.code)
    import torch

    torch.set_num_threads(args.threads)
    print_translation_time(["--model_fn", args.model_fn, "--input", args.input, "--beam_size", str(args.beam_size),
                            "--batch_size", str(args.batch_size), "--precision", args.precision,
                            "--gpu_id", "0" if args.device == "cuda" else "-1"], args.repeat)


def measure(args: argparse.Namespace, code: Path, precision: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--code", str(code), "--model_fn", args.model_fn,
               "--input", args.input, "--precision", precision, "--beam_size", str(args.beam_size),
               "--batch_size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads),
               "--repeat", str(args.repeat)]
    return run_worker(command, f"{precision} ({code})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_fn", required=True, help="a checkpoint of train.py or continue_train.py")
    p.add_argument("--input", required=True, help="the source file to translate, one sentence a line")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated --precision values; fp32 first")
    p.add_argument("--before", default=None, help="git revision to measure beside the current code")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code", default=str(PROJECT), help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        p.error("--precisions must start with fp32, the reference of the ratios")
    n_lines = len(Path(args.input).read_text(encoding="utf-8").splitlines())
    headers = ["precision", "seconds", "sentences/s", "against fp32"]
    if args.before:
        headers += [f"seconds at {args.before}", "speed-up", "same output lines"]
    rows, seconds = [], {}
    with checkout(args.before) as before:
        for i, precision in enumerate(precisions):
            now, old = now_and_before(partial(measure, args, precision=precision), before, before_first=i % 2 == 1)
            seconds[precision] = now["seconds"]
            row = [precision, f"{now['seconds']:.2f}", f"{n_lines / now['seconds']:.1f}",
                   f"{seconds['fp32'] / now['seconds']:.2f}x"]
            if old is not None:
                same = sum(a == b for a, b in zip(now["lines"], old["lines"]))
                row += [f"{old['seconds']:.2f}", f"{old['seconds'] / now['seconds']:.2f}x", f"{same} / {n_lines}"]
            rows.append(row)
            print(table(headers, [row]).splitlines()[-1], flush=True)
    import torch

    torch.set_num_threads(args.threads)  # as in the workers, for the header
    print(f"\n# translation on {args.device}: {machine(torch.device(args.device))}; {args.model_fn}, "
          f"{n_lines} lines of {args.input}, beam {args.beam_size}, batches of {args.batch_size}")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
