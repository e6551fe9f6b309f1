"""Quickstart: MLE, then RL fine-tuning, then translation, on a generated toy corpus.

    python examples/quickstart.py [--workdir runs/quickstart] [--gpu_id -1] [--seed 1]

Generates a small translation task (see ``simple_nmt/toy.py``), trains a small
Transformer with train.py, fine-tunes it with RL through continue_train.py,
translates the test split with translate.py, and prints sacreBLEU before and
after RL, with two test sentences RL fixed. Each step is the command a user
would type.

The MLE phase is kept short (2 epochs on 2000 sentences, so that the whole run
takes well under a minute on two CPU cores): its model still repeats words,
loops on a few sentences and confuses some words (about 70 BLEU). RL, 2 epochs
of sentence-BLEU reward on 1000 other sentences of the task, removes many of
those mistakes (6 to 18 BLEU more over seeds 1-5). On a task this easy, MLE on
those 1000 sentences would fix them too: the point is to see the RL phase work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import sacrebleu

from simple_nmt.toy import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 2000, "valid": 200, "test": 200, "rl": 1000}
MODEL = ["--use_transformer", "--hidden_size", "64", "--n_layers", "2", "--n_splits", "4", "--dropout", "0.0"]
MLE = ["--n_epochs", "2", "--lr", "3e-3", "--warmup_steps", "100"]
RL = ["--rl_n_epochs", "2", "--rl_lr", "3e-4", "--rl_n_samples", "4", "--rl_baseline", "loo", "--rl_reward", "bleu"]


def run(script: str, *args: str) -> None:
    """Run one of the project's scripts in a new Python process, printing its command line first."""
    command = [sys.executable, str(ROOT / script), *args]
    print("\n$ " + " ".join(["python", script, *args]), flush=True)
    subprocess.run(command, check=True)


def read(path: Path) -> list[str]:
    """The lines of a UTF-8 text file."""
    return path.read_text(encoding="utf-8").splitlines()


def bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus sacreBLEU (13a tokenization) of ``hyps`` against one reference each."""
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def quickstart(workdir: str | Path, gpu_id: str = "-1", seed: int = 1,
               runner: Callable[..., object] = run) -> dict[str, float]:
    """Generate the data, train, fine-tune and translate; print and return the test BLEU of both models.

    Args:
        runner: ``runner(script, *args)`` runs one script (a subprocess by default).

    Returns:
        ``{"mle": BLEU, "rl": BLEU}`` on the test split, beam 5.
    """
    work = Path(workdir)
    data = write_corpus(work / "data", SIZES, seed=0)
    common = ["--lang", "ende", "--valid", str(data / "valid"), "--gpu_id", gpu_id, "--max_length", "40",
              "--batch_size", "32", "--optimizer", "adam"]

    runner("train.py", "--model_fn", str(work / "mle.pth"), "--train", str(data / "train"), *common, *MODEL, *MLE,
           "--seed", str(seed))
    runner("continue_train.py", "--load_fn", str(work / "mle.pth"), "--model_fn", str(work / "rl.pth"),
           "--train", str(data / "rl"), "--batch_size", "32", "--gpu_id", gpu_id, *RL)

    outputs = {}
    for name in ("mle", "rl"):
        out = work / f"test.{name}.de"
        runner("translate.py", "--model_fn", str(work / f"{name}.pth"), "--input", str(data / "test.en"),
               "--output", str(out), "--beam_size", "5", "--max_length", "40", "--gpu_id", gpu_id)
        outputs[name] = read(out)
    sources, refs = read(data / "test.en"), read(data / "test.de")
    scores = {name: bleu(hyps, refs) for name, hyps in outputs.items()}

    print(f"\nsacreBLEU on {data / 'test.de'} (beam 5):")
    print(f"  MLE       {scores['mle']:6.2f}")
    print(f"  MLE + RL  {scores['rl']:6.2f}  ({scores['rl'] - scores['mle']:+.2f})")
    exact = {name: [h == r for h, r in zip(hyps, refs)] for name, hyps in outputs.items()}
    fixed = [i for i, (m, r) in enumerate(zip(exact["mle"], exact["rl"])) if r and not m]
    broken = [i for i, (m, r) in enumerate(zip(exact["mle"], exact["rl"])) if m and not r]
    print(f"\nexact translations: MLE {sum(exact['mle'])} of {len(refs)}, MLE + RL {sum(exact['rl'])} "
          f"(RL fixed {len(fixed)}, broke {len(broken)})" + ("; the first two it fixed:" if fixed else ""))
    for i in fixed[:2]:
        print(f"\n  source     {sources[i]}\n  reference  {refs[i]}\n  MLE        {outputs['mle'][i]}\n"
              f"  MLE + RL   {outputs['rl'][i]}")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart", help="where data, checkpoints and outputs go")
    p.add_argument("--gpu_id", default="-1", help="GPU to use (-1: CPU)")
    p.add_argument("--seed", type=int, default=1, help="seed of initialisation, data order and RL sampling")
    args = p.parse_args(argv)
    start = time.time()
    quickstart(args.workdir, args.gpu_id, args.seed)
    print(f"\ntotal time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
