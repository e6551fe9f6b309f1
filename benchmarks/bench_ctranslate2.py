"""Translating a file with translate.py against the same checkpoint exported to CTranslate2: speed, output lines, BLEU.

    python benchmarks/bench_ctranslate2.py --model_fn CHECKPOINT --input SRC --reference REF [--lines 1000]
                                           [--beam_size 5] [--batch_size 64] [--threads 1] [--repeat 1]
                                           [--tokenize none]

Rows: ``translate.py --model_fn`` in fp32 and bf16, then ``translate.py --ctranslate2`` on the checkpoint
exported by ``export_ctranslate2.py`` with ``--quantization float32``, ``int8`` and ``bfloat16`` (a type
CTranslate2 does not compute in on this device is a row that says so). Each measurement runs in a process
of its own, with ``--threads`` threads, and calls translate.py's entry point on the first ``--lines`` lines
(loading included; the export is not timed); the time is the fastest of ``--repeat`` calls. For each row:
sentences/s, the speed against translate.py's bf16 and fp32, how many output lines are translate.py fp32's,
and corpus BLEU against ``--reference`` (sacreBLEU; ``--tokenize none`` for tokenized text).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROJECT, machine, print_translation_time, run_worker, table  # noqa: E402

# (row name, translate.py's model flag, --precision or the export's --quantization)
ROWS = [("translate.py fp32", "--model_fn", "fp32"), ("translate.py bf16", "--model_fn", "bf16"),
        ("CTranslate2 float32", "--ctranslate2", "float32"), ("CTranslate2 int8", "--ctranslate2", "int8"),
        ("CTranslate2 bfloat16", "--ctranslate2", "bfloat16")]


def worker(args: argparse.Namespace) -> None:
    """Translate ``--input`` with ``--model``; print the seconds and the output lines as JSON."""
    sys.path.insert(0, str(PROJECT))
    torch.set_num_threads(args.threads)  # CTranslate2 takes as many (load_ctranslate2)
    command = [args.flag, args.model, "--input", args.input, "--beam_size", str(args.beam_size),
               "--batch_size", str(args.batch_size)]
    if args.flag == "--model_fn":
        command += ["--precision", args.precision]
    print_translation_time(command, args.repeat)


def measure(args: argparse.Namespace, flag: str, model: str, precision: str, source: Path) -> dict:
    command = [sys.executable, __file__, "--worker", f"--flag={flag}", "--model", model, "--precision", precision,
               "--input", str(source), "--beam_size", str(args.beam_size), "--batch_size", str(args.batch_size),
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
    return run_worker(command, f"{flag} {model}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_fn", help="a Transformer checkpoint of train.py or continue_train.py")
    p.add_argument("--input", help="the source file to translate, one sentence a line")
    p.add_argument("--reference", help="its reference translations, line for line")
    p.add_argument("--lines", type=int, default=1000, help="translate the first this many lines")
    p.add_argument("--beam_size", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tokenize", default="none", help="sacreBLEU's tokenizer (none: the text is tokenized)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flag", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if not (args.model_fn and args.input and args.reference):
        p.error("--model_fn, --input and --reference are required")
    sys.path.insert(0, str(PROJECT))
    import ctranslate2
    import sacrebleu

    from simple_nmt.cli import main_export

    sources = Path(args.input).read_text(encoding="utf-8").splitlines()[: args.lines]
    references = Path(args.reference).read_text(encoding="utf-8").splitlines()[: args.lines]
    computes = ctranslate2.get_supported_compute_types("cpu")
    results: dict[str, dict | None] = {}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "source.txt"
        source.write_text("".join(line + "\n" for line in sources), encoding="utf-8")
        for name, flag, kind in ROWS:
            model = args.model_fn
            if flag == "--ctranslate2" and kind not in computes:
                results[name] = None  # a type CTranslate2 does not compute in on this CPU
                continue
            if flag == "--ctranslate2":
                model = str(Path(folder) / kind)
                main_export(["--model_fn", args.model_fn, "--output_dir", model, "--quantization", kind])
            results[name] = measure(args, flag, model, kind, source)
            print(f"{name}: {results[name]['seconds']:.2f} s", flush=True)
    fp32, bf16 = results["translate.py fp32"], results["translate.py bf16"]
    rows = []
    for name, result in results.items():
        if result is None:
            rows.append([name, f"not on this CPU: CTranslate2 {ctranslate2.__version__} computes in "
                               f"{', '.join(sorted(computes))}", "-", "-", "-", "-", "-"])
            continue
        same = sum(a == b for a, b in zip(result["lines"], fp32["lines"]))
        bleu = sacrebleu.corpus_bleu(result["lines"], [references], tokenize=args.tokenize,
                                     force=args.tokenize == "none").score
        rows.append([name, f"{result['seconds']:.2f}", f"{len(sources) / result['seconds']:.1f}",
                     f"{bf16['seconds'] / result['seconds']:.2f}x", f"{fp32['seconds'] / result['seconds']:.2f}x",
                     f"{same} / {len(sources)}", f"{bleu:.2f}"])
    headers = ["translation", "seconds", "sentences/s", "against translate.py bf16", "against fp32",
               "lines identical to fp32", "BLEU"]
    torch.set_num_threads(args.threads)  # as in the workers, for the header
    print(f"\n# translation on cpu: {machine(torch.device('cpu'))}; ctranslate2 {ctranslate2.__version__}; "
          f"{args.model_fn}, {len(sources)} lines of {args.input}, beam {args.beam_size}, "
          f"batches of {args.batch_size}, BLEU with --tokenize {args.tokenize}")
    print(table(headers, rows))


if __name__ == "__main__":
    main()
