"""Decoding speed against its limit: greedy, sampling and beam 5, per precision, and against an earlier version.

    python benchmarks/bench_decoding.py [--device cuda] [--precisions fp32,bf16] [--before REF]
                                        [--models transformer,seq2seq] [--methods greedy,sampling,"beam 5"]
                                        [--length 40] [--batch_size 64] [--n_samples 5] [--repeat 5]
                                        [--threads 1] [--compile] [--glibc_tunables STR]

For both models (the sizes of ``common.py``, untrained, so that every output runs to
``--length`` tokens), each method decodes ``--batch_size`` sources of 20 tokens;
sampling draws ``--n_samples`` outputs per source, beam search keeps 5 hypotheses.
The table gives the decoding time and its matrix-product time: every product of the
model's linear layers (and LSTM gates) during that decoding, recorded by hooks and
replayed alone, at the same shapes, under the same precision. That is the limit a
decoding loop could reach without computing less; the ratio says how far the loop is
from it. The no-cache Transformer is the same model whose step re-runs the decoder over
the whole prefix, as a decoder without a cache must.

``--compile`` runs the step as ``torch.compile(model.decode_step, dynamic=True)``, the Transformer's
writes into its cache and attention over it (``append_to_cache``, ``attend_few``) left eager (the
compilation falls in the warm-up run, outside the times).

``--before REF`` measures the same rows with the project's code at git revision REF
(checked out into a temporary worktree) in the same run, alternating with the current
code, and adds the speed-up. Each measurement runs in a process of its own; times are
medians of ``--repeat`` runs after a warm-up.

``--glibc_tunables STR`` measures each row once more with the workers under
``GLIBC_TUNABLES=STR`` (glibc's malloc settings, e.g.
``glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2000000000``, under which
freed memory is kept for the next allocation instead of being returned to the system and
faulted in again), alternating with the default, and adds those times and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODELS,
    PROJECT,
    VOCAB,
    checkout,
    in_turn,
    machine,
    now_and_before,
    recorded_products,
    replay_products,
    run_worker,
    table,
)

METHODS = ("greedy", "sampling", "beam 5")
NAMES = ("transformer", "transformer (no cache)", "seq2seq")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def worker(args: argparse.Namespace) -> dict:
    """Measure one (model, method, precision) with the code on sys.path; the numbers as a dict."""
    import torch

    from simple_nmt.models import Seq2Seq, Transformer

    class NoCacheTransformer(Transformer):
        """The same Transformer, decoding without a self-attention key/value cache."""

        def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict:
            state = super().encode(src, src_lengths)
            return dict(state, prefix=src.new_zeros(src.size(0), 0))

        def decode_step(self, y_prev: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
            prefix = torch.cat([state["prefix"], y_prev[:, None]], dim=1)  # |prefix| = (batch_size, t)
            h, _ = self._run_decoder(self._embed(self.tgt_emb, prefix), state, causal=True)  # cache stays empty
            return self.generator(h[:, -1]).float().log_softmax(dim=-1), dict(state, prefix=prefix)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sizes = {k: v for k, v in MODELS[args.model.split(" ")[0]].items() if k != "use_transformer"}
    if args.model == "seq2seq":
        model = Seq2Seq(VOCAB, VOCAB, **sizes)
    else:
        model = (NoCacheTransformer if "no cache" in args.model else Transformer)(VOCAB, VOCAB, **sizes)
    model = model.to(device).eval()
    if args.compile:
        import simple_nmt.models.transformer as transformer

        # the cache's in-place writes into its room, and attention's reads of it, run eagerly: traced,
        # they fail (as_strided_scatter out of the bounds of the traced storage)
        for name in ("append_to_cache", "attend_few"):
            setattr(transformer, name, torch.compiler.disable(getattr(transformer, name)))
        model.decode_step = torch.compile(model.decode_step, dynamic=True)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (args.batch_size, 20), generator=g).to(device)
    lengths = torch.full((args.batch_size,), 20, device=device)
    dtype = getattr(torch, DTYPES[args.precision]) if args.precision in DTYPES else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def decode() -> None:
        with autocast():
            if args.method == "greedy":
                model.search(src, lengths, max_length=args.length)
            elif args.method == "sampling":
                model.search(src, lengths, is_greedy=False, max_length=args.length, n_samples=args.n_samples)
            else:
                model.batch_beam_search(src, lengths, beam_size=5, max_length=args.length)

    with recorded_products(model) as products, torch.no_grad():  # the products of one decoding
        decode()
    products_alone, gflop = replay_products(products, device, dtype)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"seconds": median_time(decode), "matmul_seconds": median_time(products_alone), "gflop": gflop}


def measure(args: argparse.Namespace, code: Path, model: str, method: str, precision: str,
            tunables: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", "--code", str(code), "--model", model, "--method", method,
               "--precision", precision, "--device", args.device, "--length", str(args.length), "--batch_size",
               str(args.batch_size), "--n_samples", str(args.n_samples), "--repeat", str(args.repeat),
               "--threads", str(args.threads), *(["--compile"] if args.compile else [])]
    env = None if tunables is None else {"GLIBC_TUNABLES": tunables}
    return run_worker(command, f"{model}, {method}, {precision} ({code})", env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--before", default=None, help="git revision to measure beside the current code")
    p.add_argument("--models", default=",".join(NAMES), help="comma-separated, of: " + ", ".join(NAMES))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--n_samples", type=int, default=5, help="samples per source (sampling)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step")
    p.add_argument("--glibc_tunables", default=None, help="also measure each row with GLIBC_TUNABLES set to this")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--code", default=str(PROJECT), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, args.code)
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(args.threads)  # as in the workers, for the header
    headers = ["model", "method", "precision", "GFLOP", "seconds", "matmul seconds", "decode / matmul",
               "sources/s"]
    if args.before:
        headers += [f"seconds at {args.before}", "speed-up"]
    if args.glibc_tunables:
        headers += ["seconds, tunables", "decode / matmul, tunables", "speed-up, tunables"]
    rows = []
    with checkout(args.before) as before:
        for model in args.models.split(","):
            for method in args.methods.split(","):
                for precision in args.precisions.split(","):
                    odd = len(rows) % 2 == 1
                    default = partial(now_and_before, partial(measure, args, model=model, method=method,
                                                              precision=precision), before, odd)
                    if args.glibc_tunables:  # with the tunables before the default in odd rows
                        (now, old), kept = in_turn(default, partial(measure, args, PROJECT, model, method, precision,
                                                                    args.glibc_tunables), odd)
                    else:
                        (now, old), kept = default(), None
                    row = [model, method, precision, f"{now['gflop']:.1f}", f"{now['seconds']:.3f}",
                           f"{now['matmul_seconds']:.3f}", f"{now['seconds'] / now['matmul_seconds']:.2f}x",
                           f"{args.batch_size / now['seconds']:.1f}"]
                    if old is not None:
                        row += [f"{old['seconds']:.3f}", f"{old['seconds'] / now['seconds']:.2f}x"]
                    if kept is not None:
                        row += [f"{kept['seconds']:.3f}", f"{kept['seconds'] / kept['matmul_seconds']:.2f}x",
                                f"{now['seconds'] / kept['seconds']:.2f}x"]
                    rows.append(row)
                    print(table(headers, [row]).splitlines()[-1], flush=True)
    print(f"\n# decoding on {args.device}: {machine(torch.device(args.device))}; "
          f"batch {args.batch_size}, output length {args.length}, {args.n_samples} samples per source")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
