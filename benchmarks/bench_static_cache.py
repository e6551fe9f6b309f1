"""The Transformer's greedy decoding step compiled: a static key/value cache and ``torch.compile``.

    python benchmarks/bench_static_cache.py [--precisions fp32,bf16] [--length 40] [--batch_size 64]
                                            [--repeat 5] [--threads 1]

The library's decoding step runs eagerly: its cache is a view of a buffer with room that each
step extends in place, which dynamo cannot trace (``bench_decoding.py --compile`` leaves those
parts eager). This measures what a step that compiles whole would give: the same model's greedy
decoding with a static cache (one buffer per layer for all ``--length`` positions, each step
writing its position with ``index_copy_`` and attending over every position, the later ones
masked), run eagerly and as ``torch.compile(step, fullgraph=True)``, and compiled with inductor's
freezing too (the weights become constants of the compiled code, prepacked for oneDNN: valid for
inference only, since RL changes the weights at every step). Beside them, the library's own greedy
decoding and the matrix products of the model's linear layers during it, replayed alone (as in
``bench_decoding.py``). Each row runs in a process of its own; compilation falls in a warm-up run,
outside the times (its seconds are given). The ids column counts the output rows equal to the
library's greedy decoding. The sizes are those of ``common.py``, untrained, 20-token sources.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MODELS,
    PROJECT,
    VOCAB,
    best_time,
    machine,
    recorded_products,
    replay_products,
    run_worker,
    table,
)

VARIANTS = ("library", "static cache, eager", "static cache, compiled", "static cache, compiled, frozen")


def worker(args: argparse.Namespace) -> dict:
    """Measure one (variant, precision); the numbers as a dict."""
    import torch

    from simple_nmt.data import BOS, PAD
    from simple_nmt.models import Transformer
    from simple_nmt.models.transformer import sinusoids
    from simple_nmt.precision import Precision
    from simple_nmt.search import float_log_softmax

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = {k: v for k, v in MODELS["transformer"].items() if k != "use_transformer"}
    model = Transformer(VOCAB, VOCAB, **sizes).eval()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (args.batch_size, 20), generator=g)
    lengths = torch.full((args.batch_size,), 20)
    precision = Precision(args.precision, "cpu")
    hidden, heads = model.hidden_size, model.decoder[0].self_attn.n_splits
    positions = sinusoids(torch.arange(args.length), hidden)  # |positions| = (length, hidden_size)
    never = torch.tensor([PAD, BOS])

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``transformer.attend_few`` without its reading of a cache's room (the static cache has none)."""
        scores = torch.matmul(q, k.transpose(2, 3)).float() * q.size(3) ** -0.5
        return torch.matmul(scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype), v)

    def step(y: torch.Tensor, t: torch.Tensor, caches: list, cross_kv: list, src_mask: torch.Tensor) -> torch.Tensor:
        """One greedy step over the static caches: |y| = (batch_size,), |t| = (1,) -> the next tokens."""
        x = model.tgt_emb(y)[:, None] * math.sqrt(hidden) + positions.index_select(0, t)[None]
        seen = (torch.arange(args.length) <= t)[None, None, None, :]  # the positions written so far
        for block, (k_cache, v_cache), (k_src, v_src) in zip(model.decoder, caches, cross_kv):
            z = block.self_norm(x)
            k, v = block.self_attn.project_kv(z)  # |k| = |v| = (batch_size, heads, 1, head_size)
            k_cache.index_copy_(2, t, k.to(k_cache.dtype))
            v_cache.index_copy_(2, t, v.to(v_cache.dtype))
            q = block.self_attn._split(block.self_attn.q(z))
            o = attend(q, k_cache, v_cache, seen).transpose(1, 2).reshape(x.shape)
            x = x + block.self_attn.out(o)
            q = block.cross_attn._split(block.cross_attn.q(block.cross_norm(x)))
            o = attend(q, k_src, v_src, src_mask).transpose(1, 2).reshape(x.shape)
            x = x + block.cross_attn.out(o)
            x = x + block.ffn(block.ffn_norm(x))
        log_probs = float_log_softmax(model.generator(model.decoder_norm(x).squeeze(1)))
        return log_probs.index_fill(1, never, float("-inf")).argmax(dim=-1)

    if "compiled" in args.variant:
        import torch._inductor.config

        torch._inductor.config.freezing = "frozen" in args.variant
        step = torch.compile(step, fullgraph=True, dynamic=False)

    def decode() -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            if args.variant == "library":
                return model.search(src, lengths, max_length=args.length)[0]
            state = model.encode(src, lengths)
            cache_dtype = state["cross_kv"][0][0].dtype  # the keys' and values' type: float32, or autocast's
            caches = [tuple(torch.zeros(args.batch_size, heads, args.length, hidden // heads, dtype=cache_dtype)
                            for _ in range(2)) for _ in model.decoder]
            y, ids = torch.full((args.batch_size,), BOS), []
            for t in range(args.length):
                y = step(y, torch.tensor([t]), caches, state["cross_kv"], state["src_mask"])
                ids.append(y)
            return torch.stack(ids, dim=1)

    start = time.perf_counter()
    ids = decode()  # the warm-up, and compilation
    warm_up = time.perf_counter() - start
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        decode()
        times.append(time.perf_counter() - start)
    with recorded_products(model) as products, torch.no_grad(), precision.autocast():
        library_ids = model.search(src, lengths, max_length=args.length)[0]
    replay, _ = replay_products(products, torch.device("cpu"), precision.dtype)
    matmul = best_time(replay, args.repeat)
    same = sum(a == b for a, b in zip(ids.tolist(), library_ids.tolist()))
    return {"seconds": statistics.median(times), "matmul_seconds": matmul, "warm_up": warm_up, "same": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, str(PROJECT))
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    headers = ["decoding", "precision", "seconds", "matmul seconds", "decode / matmul", "against the library",
               "warm-up seconds", f"ids equal to the library's (of {args.batch_size})"]
    rows = []
    for precision in args.precisions.split(","):
        library = None
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--worker", "--variant", variant, "--precision", precision,
                       "--length", str(args.length), "--batch_size", str(args.batch_size), "--repeat",
                       str(args.repeat), "--threads", str(args.threads)]
            r = run_worker(command, f"{variant}, {precision}")
            library = library or r["seconds"]
            rows.append([variant, precision, f"{r['seconds']:.3f}", f"{r['matmul_seconds']:.3f}",
                         f"{r['seconds'] / r['matmul_seconds']:.2f}x", f"{library / r['seconds']:.2f}x",
                         f"{r['warm_up']:.1f}", r["same"]])
            print(table(headers, [rows[-1]]).splitlines()[-1], flush=True)
    print(f"\n# greedy decoding on cpu: {machine(torch.device('cpu'))}; batch {args.batch_size}, "
          f"output length {args.length}")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
