"""Quickstart: MLE, then RL fine-tuning, then translation, on a generated toy corpus.

    python examples/quickstart.py [--workdir runs/quickstart] [--gpu_id -1]

Generates a small translation task (see ``simple_nmt/toy.py``), trains a small
Transformer with train.py, fine-tunes it with RL through continue_train.py,
translates the test split with translate.py, and prints sacreBLEU before and
after RL. Each step is the command a user would type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import sacrebleu

from simple_nmt.toy import write_corpus

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--use_transformer", "--hidden_size", "64", "--n_layers", "2", "--n_splits", "4", "--dropout", "0.0"]


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print("\n$ " + " ".join(["python", script, *args]), flush=True)
    subprocess.run(command, check=True)


def bleu(hyp_file: Path, ref_file: Path) -> float:
    hyps = hyp_file.read_text(encoding="utf-8").splitlines()
    refs = ref_file.read_text(encoding="utf-8").splitlines()
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quickstart", help="where data, checkpoints and outputs go")
    p.add_argument("--gpu_id", default="-1", help="GPU to use (-1: CPU)")
    args = p.parse_args()
    work = Path(args.workdir)
    start = time.time()
    data = write_corpus(work / "data", {"train": 4000, "valid": 200, "test": 200, "rl": 1000}, seed=0)
    common = ["--lang", "ende", "--valid", str(data / "valid"), "--gpu_id", args.gpu_id, "--max_length", "40",
              "--batch_size", "32", "--optimizer", "adam"]

    run("train.py", "--model_fn", str(work / "mle.pth"), "--train", str(data / "train"), *common, *MODEL,
        "--n_epochs", "5", "--lr", "5e-3", "--warmup_steps", "100")
    run("continue_train.py", "--load_fn", str(work / "mle.pth"), "--model_fn", str(work / "rl.pth"),
        "--train", str(data / "rl"), "--batch_size", "32", "--gpu_id", args.gpu_id,
        "--rl_n_epochs", "2", "--rl_lr", "1e-4", "--rl_n_samples", "4", "--rl_reward", "bleu")

    scores = {}
    for name in ("mle", "rl"):
        out = work / f"test.{name}.de"
        run("translate.py", "--model_fn", str(work / f"{name}.pth"), "--input", str(data / "test.en"),
            "--output", str(out), "--beam_size", "5", "--gpu_id", args.gpu_id)
        scores[name] = bleu(out, data / "test.de")

    print(f"\nsacreBLEU on {data / 'test.de'} (beam 5):")
    print(f"  MLE       {scores['mle']:6.2f}")
    print(f"  MLE + RL  {scores['rl']:6.2f}  ({scores['rl'] - scores['mle']:+.2f})")
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
