"""Sentence rewards: vectorised BLEU / GLEU on id tensors against sacrebleu and nltk loops.

    python benchmarks/bench_rewards.py [--device cuda] [--repeat 5]

The loops are what a classic RL step does: turn each pair of id lists into
what the library takes (space-joined strings for sacrebleu, lists for nltk)
and score it. Parity with both libraries is checked in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import sacrebleu
import torch
from nltk.translate.gleu_score import sentence_gleu as nltk_gleu

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import best_time, machine, table  # noqa: E402

from simple_nmt.data import PAD  # noqa: E402
from simple_nmt.rewards import sentence_bleu, sentence_gleu  # noqa: E402


def random_pairs(n: int, length: int, vocab: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hypotheses and references of lengths length/2..length, PAD-padded, sharing many tokens."""
    g = torch.Generator().manual_seed(seed)
    refs = torch.randint(4, vocab, (n, length), generator=g)
    other = torch.randint(4, vocab, (n, length), generator=g)
    hyps = torch.where(torch.rand(n, length, generator=g) < 0.6, refs, other)
    for ids in (hyps, refs):
        lengths = torch.randint(length // 2, length + 1, (n, 1), generator=g)
        ids.masked_fill_(torch.arange(length)[None, :] >= lengths, PAD)
    return hyps, refs


def as_lists(ids: torch.Tensor) -> list[list[int]]:
    return [[t for t in row if t != PAD] for row in ids.tolist()]


def measure(n: int, length: int, device: torch.device, repeat: int) -> tuple[list[str], float]:
    """One table row for ``n`` pairs of up to ``length`` tokens, and the BLEU speed-up."""
    hyps, refs = random_pairs(n, length)
    h, r = hyps.to(device), refs.to(device)
    bleu = sacrebleu.metrics.BLEU(tokenize="none", effective_order=True)

    def sacrebleu_loop() -> list[float]:
        return [bleu.sentence_score(" ".join(map(str, a)), [" ".join(map(str, b))]).score
                for a, b in zip(as_lists(hyps), as_lists(refs))]

    def nltk_loop() -> list[float]:
        return [100 * nltk_gleu([b], a) for a, b in zip(as_lists(hyps), as_lists(refs))]

    t_bleu = best_time(lambda: sentence_bleu(h, r, PAD), repeat, device)
    t_gleu = best_time(lambda: sentence_gleu(h, r, PAD), repeat, device)
    t_sacre = best_time(sacrebleu_loop, max(1, repeat // 2))
    t_nltk = best_time(nltk_loop, max(1, repeat // 2))
    err_bleu = (sentence_bleu(h, r, PAD).cpu().double() - torch.tensor(sacrebleu_loop())).abs().max()
    err_gleu = (sentence_gleu(h, r, PAD).cpu().double() - torch.tensor(nltk_loop())).abs().max()
    return [str(n), str(length), f"{t_bleu * 1e3:.2f}", f"{t_sacre * 1e3:.1f}", f"{t_sacre / t_bleu:.1f}x",
            f"{t_gleu * 1e3:.2f}", f"{t_nltk * 1e3:.1f}", f"{t_nltk / t_gleu:.1f}x",
            f"{float(err_bleu):.1e}", f"{float(err_gleu):.1e}"], t_sacre / t_bleu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    rows, speed_ups = [], {}
    for n in (320, 2560):
        for length in (20, 50):
            row, speed_ups[n, length] = measure(n, length, device, args.repeat)
            rows.append(row)
    print(f"# rewards on {args.device}: {machine(device)}")
    print(table(["pairs", "length", "sentence_bleu ms", "sacrebleu loop ms", "speed-up", "sentence_gleu ms",
                 "nltk GLEU loop ms", "speed-up", "max |BLEU - sacrebleu|", "max |GLEU - nltk|"], rows))
    print(f"headline: sentence_bleu is {speed_ups[320, 20]:.1f}x the sacrebleu loop at 320 pairs of length 20 "
          f"({args.device})")


if __name__ == "__main__":
    main()
