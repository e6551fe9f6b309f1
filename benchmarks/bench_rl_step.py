"""One RL step: the library's engine against the classic way and the original toolkit, on the same batch.

    python benchmarks/bench_rl_step.py [--device cuda] [--steps 3] [--precisions fp32,bf16]
                                       [--classic_dir DIR] [--headline_only] [--models transformer,seq2seq]
                                       [--mean_length N] [--mmap_threshold BYTES] [--threads 1]
    python benchmarks/bench_rl_step.py --memory_budget_mb 1024 --steps 1 [--device cuda]

The classic step (written here as the reference) samples the actor with the
autograd graph kept through the whole sampling loop and keeps its (B, T, V)
log-probs, then draws the K baseline samples in K separate no-grad passes, and
scores every sentence in a Python loop (nltk GLEU on id lists). The engine's
step samples all K+1 outputs in one batched no-grad search, scores them with the
vectorised GLEU and re-scores the actor by teacher forcing (one forward per
group of similar sample lengths). Both models are measured at B=64, K=4; unless
``--headline_only``, the Transformer also at K = 1, 8 and 16 (B=64) and B = 16 and 128 (K=4).

On CPU, Seq2Seq has a row per bf16 / fp16 precision with the engine's re-scoring as before
``UnrolledLSTM``: the decoder's ``nn.LSTM`` called once per step (``common.stepped_decoder``; float32
re-scores that way).

Each measurement runs in a fresh process, so that its peak memory is its own:
peak RSS growth over the set-up on CPU, torch.cuda.max_memory_allocated on GPU. On
CPU that growth includes memory freed but kept by glibc's allocator, whose mmap
threshold adapts to the sizes freed; ``--mmap_threshold 131072`` fixes it, so that
large blocks go back to the system when freed and the peak is nearer live memory.
Untrained models rarely emit EOS, so by default every sample runs to
--max_length tokens in both methods. ``--mean_length N`` raises the EOS logit
so that a sample ends with probability about 1/N at each step, as a trained
model's samples end at different lengths; the table gives the mean number of
tokens before EOS of the engine's samples.

``--classic_dir DIR`` adds the original classic simple-nmt toolkit (a checkout of
github.com/kh-kim/simple-nmt in DIR): its own ``Transformer`` / ``Seq2Seq`` classes at
the sizes of ``common.py`` and its own ``MinimumRiskTrainingEngine.train`` step, imported
from DIR in a process of their own, on a batch of the same shapes (its special ids:
PAD 1, BOS 2, EOS 3), GLEU reward as here, SGD. What the harness changes around it:
``torchtext``, which the toolkit's ``data_loader`` imports for its data pipeline (not
used by the step, and not installable beside current torch), is replaced by an empty
stand-in module; the step reads ``engine.model`` / ``optimizer`` / ``config`` /
``state.iteration`` and a mini-batch with ``src`` / ``tgt`` = (ids, lengths), which the
harness provides as plain objects. The ratios are then taken against it.

``--precisions`` measures the engine's step under each ``--precision`` (fp32 first). Each
is followed by its "products alone" row: every matrix product of the engine's step (the
linear layers and LSTM gates of sampling, and of the re-scoring's forward with their two
backward products each), recorded in one step and replayed alone at the same shapes. That
is the time a step that computes no less cannot go below, and its speed-up over the
original toolkit the most any such step could reach in that precision on that machine.

``--memory_budget_mb N`` instead finds, for each method, the largest batch (K=4)
whose steps fit in N MiB beyond the set-up (first steps' lazy allocations, such
as the gradients, included), to within 8 sources: it doubles the batch from 16
until a step runs out of memory, then bisects.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from nltk.translate.gleu_score import sentence_gleu

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    MODELS,
    VOCAB,
    machine,
    recorded_products,
    replay_products,
    stepped_decoder,
    table,
    time_steps,
)

# the project's modules are imported in the workers that use them: the original toolkit's
# worker imports a package of the same name, simple_nmt, from --classic_dir

SENTENCE_LENGTH = 20  # tokens of every source and reference (EOS aside)
BATCH_STEP = 8  # --memory_budget_mb finds the largest batch to within this many sources


def classic_step(model, optimizer, batch, n_samples: int, max_length: int) -> None:
    """The reference: graph through the sampling loop, K sequential passes, a Python reward loop."""
    from simple_nmt.data import BOS, EOS, PAD
    from simple_nmt.rl_trainer import strip_eos

    src, src_lengths, refs = batch["src"], batch["src_lengths"], batch["tgt"][:, 1:]
    state = model.encode(src, src_lengths)
    y = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
    all_log_probs, ids = [], []
    for _ in range(max_length):
        log_probs, state = model.decode_step(y, state)  # graph kept
        all_log_probs.append(log_probs)
        y = torch.multinomial(log_probs.exp(), 1).squeeze(1)
        ids.append(y)
    all_log_probs = torch.stack(all_log_probs, dim=1)  # |all_log_probs| = (batch_size, max_length, vocab_size)
    actor = torch.stack(ids, dim=1)
    actor_log_p = all_log_probs.gather(2, actor[:, :, None]).squeeze(2)
    actor_log_p = actor_log_p.masked_fill(strip_eos(actor) == PAD, 0.0).sum(dim=1)
    # (tokens after EOS still pass through the loop: the classic loop has no early exit per sentence)
    with torch.no_grad():
        baselines = [model.search(src, src_lengths, is_greedy=False, max_length=max_length)[0]
                     for _ in range(n_samples)]

    def gleu(hyps: torch.Tensor) -> torch.Tensor:
        hyp_lists = [[t for t in row if t != PAD] for row in strip_eos(hyps).tolist()]
        ref_lists = [[t for t in row if t not in (PAD, EOS)] for row in refs.tolist()]
        return torch.tensor([sentence_gleu([r], h) * 100 for h, r in zip(hyp_lists, ref_lists)])

    reward = gleu(actor)
    baseline = torch.stack([gleu(b) for b in baselines]).mean(dim=0)
    loss = -((reward - baseline).to(src.device) * actor_log_p).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()


def original_step(args: argparse.Namespace, device: torch.device):
    """The original toolkit's model and RL step from ``--classic_dir``, as a function of no arguments."""
    import types

    stand_in = types.ModuleType("torchtext")  # data_loader's import; nothing of it runs in the step
    stand_in.__version__ = "0.8.0"
    stand_in.data = types.SimpleNamespace(Dataset=object)
    sys.modules["torchtext"] = stand_in
    sys.path.insert(0, args.classic_dir)
    from simple_nmt.models.seq2seq import Seq2Seq
    from simple_nmt.models.transformer import Transformer
    from simple_nmt.rl_trainer import MinimumRiskTrainingEngine

    sizes = MODELS[args.model]
    if args.model == "transformer":
        model = Transformer(VOCAB, sizes["hidden_size"], VOCAB, sizes["n_splits"], sizes["n_layers"],
                            sizes["n_layers"], sizes["dropout"], max_length=args.max_length + 2)
    else:
        model = Seq2Seq(VOCAB, sizes["word_vec_size"], sizes["hidden_size"], VOCAB, sizes["n_layers"],
                        sizes["dropout"])
    model = model.to(device).train()
    pad, bos, eos = 1, 2, 3  # the toolkit's
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (args.b, SENTENCE_LENGTH), generator=g).to(device)
    tgt = torch.cat([torch.full((args.b, 1), bos), torch.randint(4, VOCAB, (args.b, SENTENCE_LENGTH), generator=g),
                     torch.full((args.b, 1), eos)], dim=1).to(device)
    assert pad not in src and pad not in tgt
    lengths = torch.full((args.b,), SENTENCE_LENGTH)
    config = types.SimpleNamespace(iteration_per_update=1, max_length=args.max_length, rl_n_samples=args.k,
                                   rl_n_gram=4, rl_reward="gleu", max_grad_norm=5.0)
    engine = types.SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4),
                                   config=config, state=types.SimpleNamespace(iteration=1))

    def step() -> None:
        batch = types.SimpleNamespace(src=(src, lengths), tgt=(tgt, lengths + 2))  # the step moves them
        MinimumRiskTrainingEngine.train(engine, batch)
        engine.optimizer.zero_grad()  # the toolkit zeroes at the start of the next update

    return step


def worker(args: argparse.Namespace) -> dict:
    """Time ``args.steps`` steps of one method in this process and measure its peak memory."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.method == "original":
        return measure_steps(args, device, original_step(args, device), lengths=None)
    from simple_nmt.config import default_config
    from simple_nmt.data import BOS, EOS
    from simple_nmt.models import build_model
    from simple_nmt.rl_trainer import MinimumRiskTrainingEngine

    config = default_config(**MODELS[args.model], max_length=args.max_length, rl_n_samples=args.k,
                            rl_reward="gleu", max_grad_norm=5.0, precision=args.precision)
    model = build_model(config, VOCAB, VOCAB).to(device).train()
    if args.mean_length > 0:  # EOS logit such that P(EOS) is about 1 / mean_length at every step
        with torch.no_grad():
            model.generator.bias[EOS] += math.log((VOCAB - 1) / (args.mean_length - 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, VOCAB, (args.b, SENTENCE_LENGTH), generator=g)
    tgt = torch.cat([torch.full((args.b, 1), BOS), torch.randint(4, VOCAB, (args.b, SENTENCE_LENGTH), generator=g),
                     torch.full((args.b, 1), EOS)], dim=1)
    batch = {"src": src.to(device), "src_lengths": torch.full((args.b,), SENTENCE_LENGTH, device=device),
             "tgt": tgt.to(device)}
    engine = MinimumRiskTrainingEngine(model, optimizer, config, device=device)

    if args.method == "engine_stepped":  # the decoder's nn.LSTM once per step in the re-scoring too
        stepped_decoder().start()  # for the rest of this worker process
    lengths = []
    if args.method == "products":  # the engine's step's matrix products alone
        with recorded_products(model) as products:
            engine.train_step(batch)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
        replay, _ = replay_products(products, device, dtype)
        return measure_steps(args, device, replay, lengths=None)

    def step() -> None:
        if args.method.startswith("engine"):
            # len_ratio: sampled tokens over reference tokens
            lengths.append(engine.train_step(batch)["len_ratio"] * SENTENCE_LENGTH)
        else:
            classic_step(model, optimizer, batch, args.k, args.max_length)

    return measure_steps(args, device, step, lengths)


def measure_steps(args: argparse.Namespace, device: torch.device, step, lengths: list[float] | None) -> dict:
    """The fastest of ``args.steps`` calls of ``step`` after a warm-up, the peak memory, the mean sample length."""
    result = time_steps(step, args.steps, device, args.memory_budget_mb)
    if "oom" not in result:
        result["mean_length"] = sum(lengths) / max(len(lengths), 1) if lengths is not None else float("nan")
    return result


def measure(args: argparse.Namespace, model: str, method: str, k: int, b: int, precision: str = "fp32") -> dict:
    command = [sys.executable, __file__, "--worker", "--model", model, "--method", method, "--k", str(k),
               "--b", str(b), "--device", args.device, "--steps", str(args.steps), "--max_length",
               str(args.max_length), "--mean_length", str(args.mean_length),
               "--memory_budget_mb", str(args.memory_budget_mb), "--precision", precision,
               "--classic_dir", args.classic_dir or "", "--threads", str(args.threads)]
    env = dict(os.environ)
    if args.mmap_threshold:  # glibc then returns every freed block of at least this size at once
        env["GLIBC_TUNABLES"] = f"glibc.malloc.mmap_threshold={args.mmap_threshold}"
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode == -signal.SIGKILL:  # the kernel's out-of-memory killer
        return {"oom": True}
    if proc.returncode != 0:
        return {"error": proc.stderr[-300:] or f"killed by signal {-proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(args, model: str, k: int, b: int) -> tuple[list[object], dict, dict]:
    engine, classic = measure(args, model, "engine", k, b), measure(args, model, "classic", k, b)

    def show(r: dict, key: str, fmt: str) -> str:
        return "OOM" if r.get("oom") else "error" if "error" in r else format(r[key], fmt)

    speed = memory = "-"
    if "seconds" in engine and "seconds" in classic:
        speed = f"{classic['seconds'] / engine['seconds']:.1f}x"
        memory = f"{engine['memory_mb'] / max(classic['memory_mb'], 1e-9):.2f}"
    return ([model, b, k, show(engine, "mean_length", ".1f"), show(engine, "seconds", ".3f"),
             show(classic, "seconds", ".3f"), speed, show(engine, "memory_mb", ".0f"),
             show(classic, "memory_mb", ".0f"), memory], engine, classic)


def versus_rows(args: argparse.Namespace, model: str) -> list[list[object]]:
    """B=64, K=4: the original toolkit (with --classic_dir), the classic step, the engine per precision;
    the ratios against the original (else the classic step)."""
    methods = [("original", "fp32")] if args.classic_dir else []
    methods += [("classic", "fp32")] + [(method, precision) for precision in args.precisions.split(",")
                                        for method in ("engine", "products")]
    if model == "seq2seq" and args.device == "cpu":  # the re-scoring as before UnrolledLSTM
        methods += [("engine_stepped", precision) for precision in args.precisions.split(",") if precision != "fp32"]
    results = {m: measure(args, model, m[0], 4, 64, m[1]) for m in methods}
    reference = results[methods[0]]
    rows = []
    for (method, precision), r in results.items():
        if "seconds" not in r:
            rows.append([model, method, precision, "OOM" if r.get("oom") else r["error"], "", "", ""])
            continue
        ratios = ["-", "-"]  # the reference failed: its error is its own row
        if "seconds" in reference:
            ratios = [f"{reference['seconds'] / r['seconds']:.2f}x",
                      f"{r['memory_mb'] / max(reference['memory_mb'], 1e-9):.2f}"]
        memory = f"{r['memory_mb']:.0f}"
        if method == "products":  # a replay's memory says nothing of the step's
            method, memory, ratios[1] = "engine's products alone", "-", "-"
        if method == "engine_stepped":
            method = "engine, nn.LSTM per step in training"
        rows.append([model, method, precision, f"{r['seconds']:.3f}", memory, *ratios])
    return rows


def largest_batch(args: argparse.Namespace, model: str, method: str) -> tuple[list[object], int, bool]:
    """The largest batch size (K=4) whose steps fit ``--memory_budget_mb``, found by doubling from 16
    until a step runs out of memory, then bisecting to within BATCH_STEP sources.

    Returns the table cells (that batch, its peak memory, the smallest batch that ran out), the batch
    (0 if none fits) and whether a larger one ran out of memory (not when ``--max_batch`` came first).
    """
    fits, peak, fails = 0, None, None

    def fit(b: int) -> bool:
        nonlocal fits, peak, fails
        result = measure(args, model, method, 4, b)
        if "error" in result:
            sys.exit(f"{model}, {method}, B={b}: {result['error']}")
        if result.get("oom"):
            fails = b
            return False
        fits, peak = b, result["memory_mb"]
        return True

    b = 16
    while b <= args.max_batch and fit(b):
        b *= 2
    while fails is not None and fails - fits > BATCH_STEP:
        fit((fits + fails) // 2)
    cells = [model, method, fits or f"< {fails}", "-" if peak is None else f"{peak:.0f}",
             "-" if fails is None else fails]
    return cells, fits, fails is not None


def budget_main(args: argparse.Namespace) -> None:
    headers = ["model", "method", f"largest B within {args.memory_budget_mb:g} MiB", "its peak MiB",
               "smallest B out of memory"]
    rows, found = [], {}
    for model in MODELS:
        for method in ("engine", "classic"):
            cells, fits, bounded = largest_batch(args, model, method)
            rows.append(cells)
            found[model, method] = (cells[2], fits, bounded)
            print(table(headers, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n# RL step under a memory budget on {args.device}: {machine(torch.device(args.device))}; K=4, "
          f"outputs of at most {args.max_length} tokens, vocabulary {VOCAB}")
    print(table(headers, rows))
    (engine_cell, engine, bounded), (classic_cell, classic, _) = (found["transformer", "engine"],
                                                                  found["transformer", "classic"])
    at_least = "" if bounded else "at least "  # --max_batch came before the engine ran out of memory
    ratio = f" ({at_least}{engine / classic:.1f}x)" if classic else ""
    print(f"headline: Transformer, K=4, within {args.memory_budget_mb:g} MiB on {args.device}: the engine's step "
          f"fits batches of {at_least}{engine_cell}, the classic step {classic_cell}{ratio}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--max_length", type=int, default=40, help="longest sampled output")
    p.add_argument("--mean_length", type=float, default=0,
                   help="raise the EOS logit so that samples end after about this many tokens (0: untrained model)")
    p.add_argument("--memory_budget_mb", type=float, default=0,
                   help="find the largest batch whose step fits in this many MiB beyond the set-up, per method "
                        "(--steps then only repeats the step)")
    p.add_argument("--max_batch", type=int, default=4096, help="the largest batch --memory_budget_mb tries")
    p.add_argument("--headline_only", action="store_true", help="only B=64, K=4 for both models, no scaling rows")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    p.add_argument("--classic_dir", default=None, help="a checkout of the original classic simple-nmt toolkit")
    p.add_argument("--precisions", default="fp32", help="comma-separated --precision values of the engine's step")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measurement")
    p.add_argument("--mmap_threshold", type=int, default=0,
                   help="run each measurement with glibc's mmap threshold fixed at this many bytes (e.g. 131072), "
                        "so that peak RSS counts live memory rather than freed memory the C library keeps "
                        "(0: the default, dynamic threshold)")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="transformer", help=argparse.SUPPRESS)
    p.add_argument("--method", default="engine", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, default=64, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mean_length and args.mean_length <= 1:
        p.error("--mean_length must be above 1 (or 0)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.memory_budget_mb < 0:
        p.error("--memory_budget_mb must be positive (or 0)")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.memory_budget_mb:
        budget_main(args)
        return
    torch.set_num_threads(args.threads)  # as in the workers, for the header
    reference = "original" if args.classic_dir else "classic"
    versus = ["model", "method", "precision", "s/step", "peak MiB", f"speed-up over {reference}",
              f"memory / {reference}'s"]
    models = args.models.split(",")
    versus_table = []
    for model in models:
        model_rows = versus_rows(args, model)
        versus_table += model_rows
        print("\n".join(table(versus, model_rows).splitlines()[2:]), flush=True)
    headers = ["model", "B", "K", "mean sample tokens", "engine s/step", "classic s/step", "speed-up",
               "engine MiB", "classic MiB", "memory ratio"]
    rows, headline = [], {}
    for model in models:
        cells, engine, classic = row(args, model, 4, 64)
        rows.append(cells)
        headline[model] = cells
        print(table(headers, rows[-1:]).splitlines()[-1], flush=True)
    scaling = [] if args.headline_only or "transformer" not in models else [(1, 64), (8, 64), (16, 64), (4, 16),
                                                                             (4, 128)]
    for k, b in scaling:
        rows.append(row(args, "transformer", k, b)[0])
        print(table(headers, rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n# RL step on {args.device}: {machine(torch.device(args.device))}; "
          f"outputs of at most {args.max_length} tokens, vocabulary {VOCAB}, "
          f"sources and references of {SENTENCE_LENGTH} tokens")
    print(table(versus, versus_table))
    print()
    print(table(headers, rows))
    for name, t in headline.items():
        print(f"headline: {name}, B=64, K=4 on {args.device}: engine {t[6]} faster than the classic step, "
              f"peak memory ratio {t[9]} (engine / classic)" + (f", outputs of about {args.mean_length:g} tokens"
                                                                if args.mean_length else ""))


if __name__ == "__main__":
    main()
