"""Decoding speed: greedy, sampling and beam 5, with the Transformer's key/value cache and without.

    python benchmarks/bench_decoding.py [--device cuda] [--length 50] [--batch_size 64]

Tokens/s of output for both models at batch size 64 and output length 50
(untrained models, so every output runs to the length limit). The no-cache
Transformer is the same model whose step re-runs the decoder over the whole
prefix, as a decoder without a cache must (cross-attention keys/values of the
encoder output stay precomputed in both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import best_time, machine, table  # noqa: E402

from simple_nmt.models import Seq2Seq, Transformer  # noqa: E402

VOCAB = 8000


class NoCacheTransformer(Transformer):
    """The same Transformer, decoding without a self-attention key/value cache."""

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict:
        state = super().encode(src, src_lengths)
        return dict(state, prefix=src.new_zeros(src.size(0), 0))

    def decode_step(self, y_prev: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        prefix = torch.cat([state["prefix"], y_prev[:, None]], dim=1)  # |prefix| = (batch_size, t)
        h, _ = self._run_decoder(self._embed(self.tgt_emb, prefix), state, causal=True)  # state's cache stays empty
        return self.generator(h[:, -1]).float().log_softmax(dim=-1), dict(state, prefix=prefix)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "seq2seq":
        return Seq2Seq(VOCAB, VOCAB, word_vec_size=256, hidden_size=512, n_layers=2, dropout=0.1)
    cls = NoCacheTransformer if name == "transformer (no cache)" else Transformer
    return cls(VOCAB, VOCAB, hidden_size=256, n_splits=4, n_layers=3, dropout=0.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (args.batch_size, 20), generator=g).to(device)
    lengths = torch.full((args.batch_size,), 20, device=device)
    rows, speed = [], {}
    for name in ("transformer", "transformer (no cache)", "seq2seq"):
        model = build(name).to(device).eval()
        runs = {
            "greedy": lambda m=model: m.search(src, lengths, max_length=args.length),
            "sampling": lambda m=model: m.search(src, lengths, is_greedy=False, max_length=args.length),
            "beam 5": lambda m=model: m.batch_beam_search(src, lengths, beam_size=5, max_length=args.length),
        }
        for method, fn in runs.items():
            seconds = best_time(fn, args.repeat, device)
            speed[name, method] = args.batch_size * args.length / seconds
            rows.append([name, method, f"{seconds:.3f}", f"{speed[name, method]:.0f}"])
    for method in ("greedy", "sampling", "beam 5"):
        ratio = speed["transformer", method] / speed["transformer (no cache)", method]
        rows.append(["transformer cache / no cache", method, "", f"{ratio:.1f}x"])
    print(f"# decoding on {args.device}: {machine(device)}; batch {args.batch_size}, output length {args.length}, "
          f"vocabulary {VOCAB}")
    print(table(["model", "method", "seconds", "output tokens/s"], rows))
    ratio = speed["transformer", "greedy"] / speed["transformer (no cache)", "greedy"]
    print(f"headline: the key/value cache makes greedy Transformer decoding {ratio:.1f}x faster at length "
          f"{args.length} ({args.device})")


if __name__ == "__main__":
    main()
