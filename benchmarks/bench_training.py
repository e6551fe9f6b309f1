"""MLE training speed: target tokens/s of the engine's step for both models (with and without AMP on GPU).

    python benchmarks/bench_training.py [--device cuda] [--batch_size 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MODELS, VOCAB, machine, table  # noqa: E402

from simple_nmt.cli import default_config  # noqa: E402
from simple_nmt.data import BOS, EOS  # noqa: E402
from simple_nmt.models import build_model  # noqa: E402
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine  # noqa: E402


def tokens_per_second(model_name: str, device: torch.device, amp: bool, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    config = default_config(**MODELS[model_name], off_autocast=not amp)
    model = build_model(config, VOCAB, VOCAB).to(device)
    engine = MaximumLikelihoodEstimationEngine(model, torch.optim.Adam(model.parameters(), lr=1e-4), config,
                                               device=device)
    g = torch.Generator().manual_seed(1)
    batch = {
        "src": torch.randint(4, VOCAB, (batch_size, 30), generator=g),
        "src_lengths": torch.full((batch_size,), 30),
        "tgt": torch.cat([torch.full((batch_size, 1), BOS), torch.randint(4, VOCAB, (batch_size, 30), generator=g),
                          torch.full((batch_size, 1), EOS)], dim=1),
    }
    engine.train_step(batch)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size * 31 / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    rows, results = [], {}
    for name in MODELS:
        for amp in ([False, True] if device.type == "cuda" else [False]):
            results[name, amp] = tokens_per_second(name, device, amp, args.batch_size, args.steps)
            rows.append([name, "bf16/fp16 autocast" if amp else "fp32", f"{results[name, amp]:.0f}"])
    print(f"# MLE training on {args.device}: {machine(device)}; batch {args.batch_size}, 30 target tokens + EOS")
    print(table(["model", "precision", "target tokens/s"], rows))
    if device.type == "cuda":
        ratio = results["transformer", True] / results["transformer", False]
        print(f"headline: autocast trains the Transformer {ratio:.1f}x faster than fp32 ({args.device})")
    else:
        print(f"headline: {results['transformer', False]:.0f} target tokens/s for the Transformer, "
              f"{results['seq2seq', False]:.0f} for Seq2Seq ({args.device})")


if __name__ == "__main__":
    main()
