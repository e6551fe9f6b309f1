"""This library against JoeyNMT 2.3.0, side by side: MLE training (target tokens/s) and beam-5 translation
(sentences/s, mean output length), the same Multi30k data, model sizes and tokenization, one thread each.

    python benchmarks/bench_joeynmt.py --data ../shared/data/multi30k [--venv /tmp/joeynmt-venv]
        [--work /tmp/bench-joeynmt] [--steps 150] [--batch_size 64] [--lines 500] [--precisions fp32,bf16]

JoeyNMT is never a requirement of the project: it runs from a virtual environment of its own (``--venv``,
made if missing, with ``--system-site-packages`` so that it uses the installed torch; pip installs
``joeynmt==2.3.0`` with ``--no-deps`` and, by hand, the few of its dependencies JoeyNMT imports that are
missing, never torch; the script checks that the venv's torch is the system's). The venv holds
sentencepiece 0.2.0, which JoeyNMT needs (``SetVocabulary``, gone from later releases); it reads the same
model files.

The models: a pre-LayerNorm Transformer, d=256, 3+3 layers, 4 heads, FFN 1,024, dropout 0.1, untied
embeddings and output layer, Adam at a constant 1e-3, gradients clipped to norm 5, no label smoothing.
Both tools use the same SentencePiece models (unigram, 8,000 pieces per language): the library's
``train.py --spm_vocab_size 8000`` trains them on the raw training text, and JoeyNMT is given the very
models the library's first checkpoint holds (``tokenizer_type: sentencepiece``) and their pieces as its
vocabularies (``voc_file``), so that both count the same target pieces.

Training: each run trains from scratch on the whole training set (pairs of at most 100 pieces), batches of
``--batch_size`` sentences in both tools (JoeyNMT ``batch_type: sentence``, sentences drawn at random; the
library's ``--batch_size``, length-bucketed, so with less padding), and stops after ``--steps`` updates
(JoeyNMT ``updates``; the library ends its epoch there through ignite's ``terminate_epoch``, so that its
epoch-end validation and checkpoints run as usual). Timing is the same for both, made by the worker
process around each tool's own training loop, which runs unchanged: the time of the end of each batch's
forward and backward pass is recorded (JoeyNMT's ``TrainManager._train_step``, the library's
``train_step``); the throughput is the target tokens (non-padding, EOS included, BOS not) of batches 2 to N
over the time from the end of batch 1 to the end of batch N. Each of those intervals is one whole
iteration (fetching and collating the batch, forward, backward, update and the tool's logging), and start-up,
corpus preparation, validation and checkpointing fall outside. JoeyNMT runs in float32 only (its ``fp16``
is refused on CPU and it has no bf16); the library in each of ``--precisions``.

Translation: beam 5, length penalty alpha 1 (GNMT, both), at most 100 output pieces, batches of 64
sentences, the first ``--lines`` lines of test_2016_flickr.en, with the checkpoint each run just trained.
The time is that of the tool's translation function called in the worker (JoeyNMT's
``joeynmt.prediction.translate`` reading the lines from stdin, the library's ``translate.py`` entry point),
model loading included, Python and torch start-up not. The mean output length is in target pieces of the
shared SentencePiece model. Each measurement runs in a process of its own, with OMP_NUM_THREADS=1 and
``torch.set_num_threads(1)``; the tools alternate (library fp32, JoeyNMT, library bf16, ...), so that a
machine shared with other jobs drifts into both. JoeyNMT's processes run with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: its ``torch.load`` predates torch 2.6's ``weights_only`` default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROJECT, machine, run_worker, table  # noqa: E402

JOEYNMT = "joeynmt==2.3.0"
# What JoeyNMT 2.3.0 imports on the way to training and translating and a plain environment may lack
# (its other requirements, e.g. plotly, pandas, datasets, pylint, are for modes not used here).
# sentencepiece 0.2.0: JoeyNMT calls SentencePieceProcessor.SetVocabulary, which later releases dropped.
JOEYNMT_IMPORTS = ["subword-nmt", "sentencepiece==0.2.0"]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Run by the venv's python: time JoeyNMT's training loop or translation (argv: mode, config[, input, output]).
JOEY_WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    mode, config = sys.argv[1], sys.argv[2]
    if mode == "train":
        import joeynmt.training
        from joeynmt.__main__ import main
        ends, tokens = [], []
        original = joeynmt.training.TrainManager._train_step
        def timed(self, batch):
            out = original(self, batch)
            ends.append(time.perf_counter())
            tokens.append(int(batch.ntokens))
            return out
        joeynmt.training.TrainManager._train_step = timed
        sys.argv = ["joeynmt", "train", config, "--skip-test"]
        main()
        print(json.dumps({"steps": len(ends), "tokens": sum(tokens[1:]), "seconds": ends[-1] - ends[0],
                          "tokens_per_batch": sum(tokens) / len(tokens)}))
    else:
        import contextlib
        from joeynmt.config import load_config
        from joeynmt.prediction import translate
        cfg = load_config(config)
        sys.stdin = open(sys.argv[3], encoding="utf-8")
        # translate(cfg, output_path) fails in 2.3.0 (args.n_best); without one it prints the lines
        with open(sys.argv[4], "w", encoding="utf-8") as out, contextlib.redirect_stdout(out):
            start = time.perf_counter()
            translate(cfg)
            seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds}))
""")


def ensure_venv(venv: Path) -> Path:
    """The venv's python, with JoeyNMT importable and torch the system's; make or complete it if needed."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import joeynmt.training, joeynmt.prediction, torch, sentencepiece; "
             "assert hasattr(sentencepiece.SentencePieceProcessor, 'SetVocabulary'); print(torch.__file__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        pass
    else:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--no-deps", JOEYNMT, *JOEYNMT_IMPORTS], check=True)
        subprocess.run([*pip, "importlib_metadata"], check=True)  # its dependencies are small, torch not one
    torch_file = subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip()
    import torch

    if Path(torch_file).resolve() != Path(torch.__file__).resolve():
        sys.exit(f"{venv}: its torch is {torch_file}, not the system's {torch.__file__}")
    return python


def library_train_worker(args: argparse.Namespace) -> None:
    """Run train.py's entry point for ``--steps`` updates, timing its steps; print the JSON result."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(PROJECT))
    from simple_nmt.cli import main_train
    from simple_nmt.trainer import MaximumLikelihoodEstimationEngine

    ends, tokens = [], []
    original = MaximumLikelihoodEstimationEngine.train_step

    def timed(self, batch):
        out = original(self, batch)
        ends.append(time.perf_counter())
        tokens.append(int((batch["tgt"][:, 1:] != self.special_ids.pad).sum()))  # BOS not, EOS counted
        if len(ends) == args.steps:
            self.terminate_epoch()  # the epoch's end work (validation, checkpoints) runs as usual
        return out

    MaximumLikelihoodEstimationEngine.train_step = timed
    main_train(json.loads(args.argv))
    print(json.dumps({"steps": len(ends), "tokens": sum(tokens[1:]), "seconds": ends[-1] - ends[0],
                      "tokens_per_batch": sum(tokens) / len(tokens)}))


def library_translate_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(PROJECT))
    from simple_nmt.cli import main_translate

    argv = json.loads(args.argv)
    start = time.perf_counter()
    main_translate(argv)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def joey_config(work: Path, data: Path, args: argparse.Namespace) -> Path:
    """JoeyNMT's YAML for the same model, data, tokenization, optimizer and decoding (see the docstring)."""
    side = lambda lang, which: {  # noqa: E731
        "lang": lang, "level": "bpe", "lowercase": False, "max_length": 100,
        "voc_file": str(work / f"{which}.vocab.txt"), "tokenizer_type": "sentencepiece",
        "tokenizer_cfg": {"model_file": str(work / f"{which}.model")}}
    stack = {"type": "transformer", "num_layers": 3, "num_heads": 4, "hidden_size": 256, "ff_size": 1024,
             "dropout": 0.1, "layer_norm": "pre", "embeddings": {"embedding_dim": 256, "scale": True, "dropout": 0.1}}
    cfg = {
        "name": "bench", "joeynmt_version": "2.3.0", "model_dir": str(work / "joey_model"), "use_cuda": False,
        "fp16": False, "random_seed": 1,
        "data": {"train": str(data / "train"), "dev": str(work / "val100"), "dataset_type": "plain",
                 "sample_dev_subset": -1, "src": side("en", "src"), "trg": side("de", "tgt")},
        "testing": {"beam_size": 5, "beam_alpha": 1.0, "batch_size": 64, "batch_type": "sentence",
                    "max_output_length": 100, "eval_metrics": ["bleu"], "n_best": 1,
                    "load_model": str(work / "joey_model" / "latest.ckpt")},
        "training": {"optimizer": "adam", "learning_rate": 0.001, "learning_rate_min": 1e-8,
                     "adam_betas": [0.9, 0.999], "loss": "crossentropy",
                     # JoeyNMT requires a scheduler: an exponential decay by 1.0 per epoch keeps 1e-3
                     "scheduling": "exponential", "decrease_factor": 1.0,
                     "label_smoothing": 0.0, "normalization": "tokens", "clip_grad_norm": 5.0, "weight_decay": 0.0,
                     "batch_size": args.batch_size, "batch_type": "sentence", "batch_multiplier": 1,
                     "updates": args.steps, "epochs": 1, "logging_freq": 10,
                     "validation_freq": 100 * args.steps, "keep_best_ckpts": 1, "shuffle": True,
                     "overwrite": True, "early_stopping_metric": "loss", "eval_metric": ["bleu"],
                     "print_valid_sents": []},
        "model": {"initializer": "xavier_uniform", "bias_initializer": "zeros", "init_gain": 1.0,
                  "embed_initializer": "xavier_uniform", "embed_init_gain": 1.0, "tied_embeddings": False,
                  "tied_softmax": False, "encoder": stack, "decoder": stack},
    }
    path = work / "joey.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def shared_spm(checkpoint: Path, work: Path) -> None:
    """Write the library checkpoint's SentencePiece models and their pieces (JoeyNMT's vocabularies)."""
    import sentencepiece as spm

    sys.path.insert(0, str(PROJECT))
    from simple_nmt.checkpoint import load_checkpoint

    meta = load_checkpoint(checkpoint)["meta"]
    for which in ("src", "tgt"):
        model = meta[f"{which}_spm"]
        (work / f"{which}.model").write_bytes(model)
        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                  if not (sp.is_control(i) or sp.is_unknown(i))]
        (work / f"{which}.vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")


def mean_pieces(path: Path, work: Path) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(work / "tgt.model"))
    lines = path.read_text(encoding="utf-8").splitlines()
    return sum(len(sp.encode(line)) for line in lines) / len(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "multi30k"))
    p.add_argument("--venv", default="/tmp/joeynmt-venv", help="JoeyNMT's virtual environment (made if missing)")
    p.add_argument("--work", default="/tmp/bench-joeynmt", help="folder for models, configs and outputs")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lines", type=int, default=500, help="test lines to translate")
    p.add_argument("--precisions", default="fp32,bf16", help="the library's; fp32 first")
    p.add_argument("--worker", choices=["train", "translate"], help=argparse.SUPPRESS)
    p.add_argument("--argv", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "train":
        return library_train_worker(args)
    if args.worker == "translate":
        return library_translate_worker(args)
    import torch

    torch.set_num_threads(1)
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        p.error("--precisions must start with fp32")
    python = ensure_venv(Path(args.venv))
    for lang in ("en", "de"):
        lines = (data / f"val.{lang}").read_text(encoding="utf-8").splitlines()[:100]
        (work / f"val100.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    test_input = work / "test.en"
    test_input.write_text("\n".join((data / "test_2016_flickr.en").read_text(encoding="utf-8")
                                    .splitlines()[:args.lines]) + "\n", encoding="utf-8")
    me = [sys.executable, str(Path(__file__).resolve())]
    joey_env = {**THREAD_ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}

    def train_library(precision: str) -> dict:
        model_fn = work / f"lib_{precision}" / "model.pth"
        model_fn.parent.mkdir(exist_ok=True)
        for old in model_fn.parent.glob("*.pth"):
            old.unlink()
        argv = ["--model_fn", str(model_fn), "--train", str(data / "train"), "--valid", str(work / "val100"),
                "--lang", "ende", "--use_transformer", "--hidden_size", "256", "--n_layers", "3", "--n_splits", "4",
                "--dropout", "0.1", "--spm_vocab_size", "8000", "--max_length", "100", "--batch_size",
                str(args.batch_size), "--optimizer", "adam", "--lr", "1e-3", "--max_grad_norm", "5", "--n_epochs", "1",
                "--precision", precision, "--verbose", "1"]
        result = run_worker([*me, "--worker", "train", "--steps", str(args.steps), "--argv", json.dumps(argv)],
                            f"library {precision} training", THREAD_ENV)
        return {**result, "model_fn": model_fn}

    def train_joey() -> dict:
        return run_worker([str(python), "-c", JOEY_WORKER, "train", str(joey_config(work, data, args))],
                          "JoeyNMT training", joey_env)

    def translate_library(precision: str, model_fn: Path) -> dict:
        output = work / f"lib_{precision}.out"
        argv = ["--model_fn", str(model_fn), "--input", str(test_input), "--output", str(output), "--beam_size", "5",
                "--length_penalty", "1.0", "--batch_size", "64", "--max_length", "100", "--precision", precision]
        result = run_worker([*me, "--worker", "translate", "--argv", json.dumps(argv)],
                            f"library {precision} translation", THREAD_ENV)
        return {**result, "length": mean_pieces(output, work)}

    def translate_joey() -> dict:
        output = work / "joey.out"
        result = run_worker([str(python), "-c", JOEY_WORKER, "translate", str(work / "joey.yaml"), str(test_input),
                             str(output)], "JoeyNMT translation", joey_env)
        return {**result, "length": mean_pieces(output, work)}

    # Training, alternating: library fp32 (whose SentencePiece models JoeyNMT then takes), JoeyNMT, the rest.
    train, translated = {}, {}
    train["fp32"] = train_library("fp32")
    print(f"library fp32: {train['fp32']}", file=sys.stderr)
    shared_spm(train["fp32"]["model_fn"], work)
    train["joey"] = train_joey()
    print(f"JoeyNMT: {train['joey']}", file=sys.stderr)
    for precision in precisions[1:]:
        train[precision] = train_library(precision)
        print(f"library {precision}: {train[precision]}", file=sys.stderr)
    # Translation, alternating the other way round: JoeyNMT first.
    translated["joey"] = translate_joey()
    print(f"JoeyNMT translation: {translated['joey']}", file=sys.stderr)
    for precision in precisions:
        translated[precision] = translate_library(precision, train[precision]["model_fn"])
        print(f"library {precision} translation: {translated[precision]}", file=sys.stderr)

    joey_tps = train["joey"]["tokens"] / train["joey"]["seconds"]
    joey_sps = args.lines / translated["joey"]["seconds"]
    headers = ["", "JoeyNMT 2.3.0 (fp32)"] + [f"this library {pr}" for pr in precisions]
    tps = [train[pr]["tokens"] / train[pr]["seconds"] for pr in precisions]
    sps = [args.lines / translated[pr]["seconds"] for pr in precisions]
    rows = [
        [f"MLE training, target tokens/s ({args.steps} steps)", f"{joey_tps:,.0f}"]
        + [f"{v:,.0f} ({v / joey_tps:.2f}x)" for v in tps],
        ["target tokens per batch (mean)", f"{train['joey']['tokens_per_batch']:.0f}"]
        + [f"{train[pr]['tokens_per_batch']:.0f}" for pr in precisions],
        [f"beam-5 translation of {args.lines} test lines, sentences/s", f"{joey_sps:.1f}"]
        + [f"{v:.1f} ({v / joey_sps:.1f}x)" for v in sps],
        ["mean output length, target pieces", f"{translated['joey']['length']:.1f}"]
        + [f"{translated[pr]['length']:.1f}" for pr in precisions],
    ]
    print(f"# JoeyNMT 2.3.0 against this library, one thread each: {machine(torch.device('cpu'))}; "
          f"Multi30k en-de, Transformer d=256 3+3, batch {args.batch_size} sentences")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
