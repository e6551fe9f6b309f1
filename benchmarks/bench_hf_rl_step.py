"""One RL step on a Hugging Face Marian model: the library's engine through the adapter, against the same
step written by hand with ``generate``.

    python benchmarks/bench_hf_rl_step.py [--device cuda] [--steps 3] [--b 64] [--k 4] [--threads 1]

The model is a ``MarianMTModel`` built from its config (no download) at the sizes of ``common.py``'s
Transformer: d_model 256, 3 encoder and 3 decoder layers, 4 heads, feed-forward 1,024, vocabulary
8,000. Both steps do the same work on the same batch (B sources of 20 tokens, K + 1 samples each of at
most --max_length tokens, GLEU reward against 20-token references, every sample an actor with the
leave-one-out baseline, SGD):

- by hand: ``model.generate(do_sample=True, top_k=0, num_return_sequences=K+1)`` in eval mode without
  a graph, one teacher-forced forward over all (K+1)·B samples with the sources repeated, log_softmax
  and gather, -(r - baseline) · log P, backward, clipping, the update: what a user writes without this
  library;
- engine: ``MinimumRiskTrainingEngine.train_step`` on ``HuggingFaceModel(model)`` with
  ``--rl_baseline loo``: one batched ``search`` on the model's own key/value cache, the encoder run
  once per source for the re-scoring, log-probs gathered without a (B, T, V) log-softmax tensor.

Untrained models rarely emit EOS, so every sample runs to --max_length tokens in both. Each method
runs in fresh processes (--rounds of them, alternating with the other method), so that its peak
memory (RSS growth over the set-up on CPU, ``max_memory_allocated`` on GPU) is its own; times are the
fastest of --steps steps after a warm-up over all rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import MODELS, VOCAB, machine, table, time_steps  # noqa: E402

SENTENCE_LENGTH = 20  # tokens of every source and reference (EOS aside)


def marian(device: torch.device) -> torch.nn.Module:
    """A Marian model at the sizes of common.py's Transformer, with Marian's ids: EOS 0, UNK 1, PAD last."""
    from transformers import MarianConfig, MarianMTModel

    sizes = MODELS["transformer"]
    h, layers, heads = sizes["hidden_size"], sizes["n_layers"], sizes["n_splits"]
    config = MarianConfig(vocab_size=VOCAB, d_model=h, encoder_layers=layers, decoder_layers=layers,
                          encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * h,
                          decoder_ffn_dim=4 * h, max_position_embeddings=256, dropout=sizes["dropout"],
                          pad_token_id=VOCAB - 1, eos_token_id=0, decoder_start_token_id=VOCAB - 1)
    return MarianMTModel(config).to(device)


def by_hand_step(model, optimizer, src, mask, refs, k: int, max_length: int, reward) -> None:
    """generate for the samples, then a teacher-forced pass over all of them with the sources repeated."""
    pad, eos, n = model.config.pad_token_id, model.config.eos_token_id, k + 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=src, attention_mask=mask, do_sample=True, top_k=0, num_return_sequences=n,
                             max_new_tokens=max_length, forced_eos_token_id=None)
    model.train()
    samples = out[:, 1:]  # |samples| = (batch_size * n, length): after the decoder start token
    logits = model(input_ids=src.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                   decoder_input_ids=out[:, :-1]).logits  # |logits| = (batch_size * n, length, vocab_size)
    token_log_probs = logits.log_softmax(-1).gather(2, samples[:, :, None]).squeeze(2)
    log_p = (token_log_probs * (samples != pad)).sum(1).view(-1, n)  # generate pads after EOS
    hyps = samples.masked_fill(samples == eos, pad)
    rewards = reward(hyps, refs.repeat_interleave(n, 0)).view(-1, n)
    baselines = (rewards.sum(1, keepdim=True) - rewards) / (n - 1)
    loss = -((rewards - baselines) * log_p).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> dict:
    """Time one method's steps in this process."""
    from simple_nmt.config import default_config
    from simple_nmt.data import collate
    from simple_nmt.hf import HuggingFaceModel
    from simple_nmt.rewards import as_reward
    from simple_nmt.rl_trainer import MinimumRiskTrainingEngine

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = marian(device)
    adapter = HuggingFaceModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, VOCAB - 1, (args.b, SENTENCE_LENGTH), generator=g).tolist()
    refs = torch.randint(2, VOCAB - 1, (args.b, SENTENCE_LENGTH), generator=g).tolist()
    batch = {name: t.to(device) for name, t in collate([(i, s + [0], r) for i, (s, r) in enumerate(zip(src, refs))],
                                                        adapter.special_ids).items()}
    if args.method == "engine":
        config = default_config(max_length=args.max_length, rl_n_samples=args.k, rl_baseline="loo",
                                rl_reward="gleu", max_grad_norm=5.0, precision="fp32")
        engine = MinimumRiskTrainingEngine(adapter, optimizer, config, device=device)

        def step() -> None:
            engine.train_step(batch)
    else:
        reward = as_reward("gleu", pad_id=adapter.special_ids.pad)
        mask = (batch["src"] != adapter.special_ids.pad).long()
        refs_t = batch["tgt"][:, 1:-1]

        def step() -> None:
            by_hand_step(model, optimizer, batch["src"], mask, refs_t, args.k, args.max_length, reward)

    return time_steps(step, args.steps, device)


def measure(args: argparse.Namespace, method: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--method", method, "--b", str(args.b), "--k", str(args.k),
               "--device", args.device, "--steps", str(args.steps), "--max_length", str(args.max_length),
               "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method}: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up)")
    p.add_argument("--b", type=int, default=64, help="sources per batch")
    p.add_argument("--k", type=int, default=4, help="K: samples per source beside the first")
    p.add_argument("--max_length", type=int, default=40, help="longest sampled output")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measurement")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per method, alternating; the fastest counts")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="engine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    torch.set_num_threads(args.threads)  # as in the workers, for the machine line
    results = {"by_hand": [], "engine": []}
    for _ in range(args.rounds):  # alternating, so that a change in the machine's load falls on both
        for method in results:
            results[method].append(measure(args, method))
    by_hand, engine = ({"seconds": min(r["seconds"] for r in rs), "memory_mb": min(r["memory_mb"] for r in rs)}
                       for rs in results.values())
    rows = [["generate + teacher-forced pass, by hand", f"{by_hand['seconds']:.2f}", f"{by_hand['memory_mb']:.0f}",
             "1.00x", "1.00"],
            ["MinimumRiskTrainingEngine on HuggingFaceModel", f"{engine['seconds']:.2f}",
             f"{engine['memory_mb']:.0f}", f"{by_hand['seconds'] / engine['seconds']:.2f}x",
             f"{engine['memory_mb'] / max(by_hand['memory_mb'], 1e-9):.2f}"]]
    print(f"# One RL step on a Hugging Face Marian model ({args.device}): {machine(torch.device(args.device))}; "
          f"B={args.b}, K={args.k}, samples of {args.max_length} tokens, vocabulary {VOCAB}, --rl_baseline loo")
    print(table(["method", "seconds", "peak MiB", "speed", "memory"], rows))


if __name__ == "__main__":
    main()
