"""MLE training speed: target tokens/s of the engine's step for both models, per --precision.

    python benchmarks/bench_training.py [--device cuda] [--precisions fp32,bf16,fp16] [--batch_size 64] [--steps 5]

Each precision of a model is measured in the same process, one after the other, and
given as a ratio to fp32. bf16 on a CPU without AVX-512 BF16 or AMX runs in software:
the table's header says which CPU it ran on. On CPU, Seq2Seq has a row per bf16 / fp16 precision with
its decoder trained as before ``UnrolledLSTM``, one ``nn.LSTM`` call per step (``common.stepped_decoder``;
float32 trains that way).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MODELS, VOCAB, machine, stepped_decoder, table  # noqa: E402

from simple_nmt.config import default_config  # noqa: E402
from simple_nmt.data import BOS, EOS  # noqa: E402
from simple_nmt.models import build_model  # noqa: E402
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine  # noqa: E402


def tokens_per_second(model_name: str, device: torch.device, precision: str, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    config = default_config(**MODELS[model_name], precision=precision)
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
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated --precision values; fp32 first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        p.error("--precisions must start with fp32, the reference of the ratios")
    rows, results, models = [], {}, args.models.split(",")
    for name in models:
        for precision in precisions:
            results[name, precision] = tokens_per_second(name, device, precision, args.batch_size, args.steps)
            ratio = results[name, precision] / results[name, "fp32"]
            rows.append([name, precision, f"{results[name, precision]:.0f}", f"{ratio:.2f}x"])
        if name == "seq2seq" and device.type == "cpu":  # the decoder as it trained before UnrolledLSTM
            for precision in precisions[1:]:
                with stepped_decoder():
                    other = tokens_per_second(name, device, precision, args.batch_size, args.steps)
                rows.append([name, f"{precision}, nn.LSTM per step in training", f"{other:.0f}",
                             f"{other / results[name, 'fp32']:.2f}x"])
    print(f"# MLE training on {args.device}: {machine(device)}; batch {args.batch_size}, 30 target tokens + EOS")
    print(table(["model", "precision", "target tokens/s", "against fp32"], rows))
    print("headline: " + ", ".join(f"{name} {precision} {results[name, precision] / results[name, 'fp32']:.2f}x "
                                   "fp32's tokens/s" for name in models for precision in precisions[1:])
          + f" ({args.device})")


if __name__ == "__main__":
    main()
