"""Command-line options and the run functions behind the scripts: train.py, continue_train.py,
translate.py and average_checkpoints.py."""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from torch.utils.data import DataLoader

from simple_nmt.checkpoint import CheckpointError, average_checkpoints, load_checkpoint, save_checkpoint
from simple_nmt.data import (
    BucketBatchSampler,
    DataError,
    ParallelDataset,
    SentencePieceTokenizer,
    TextField,
    Tokenizer,
    Vocab,
    collate,
    read_lines,
    read_parallel,
    split_lang,
    tokenizer_from_bytes,
)
from simple_nmt.distributed import is_main_process, process_group, wrap_model
from simple_nmt.models import build_model
from simple_nmt.rewards import REWARDS
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import (
    MaximumLikelihoodEstimationEngine,
    NonFiniteLossError,
    RunInfo,
    TrainingInterrupted,
    attach_handlers,
    build_optimizer,
    build_scheduler,
    optimizer_name,
    run_until_done_or_interrupted,
)

# Options that fix the model's shape or its vocabularies: a checkpoint's values win,
# and a different value given to continue_train.py is an error.
ARCHITECTURE_OPTIONS = ("use_transformer", "word_vec_size", "hidden_size", "n_layers", "n_splits",
                        "tie_embeddings", "spm_vocab_size", "max_vocab", "min_freq", "lang")


class OptionError(ValueError):
    """Options that do not fit together; the message is one line naming them."""


def _typed(kind: type, minimum: float, strict: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


positive_int, non_negative_int = _typed(int, 1), _typed(int, 0)
positive_float, non_negative_float = _typed(float, 0.0, strict=True), _typed(float, 0.0)


def probability(text: str) -> float:
    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def lang_pair(text: str) -> str:
    try:
        split_lang(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--train", help="training files prefix: PREFIX.SRC and PREFIX.TGT")
    g.add_argument("--valid", help="validation files prefix")
    g.add_argument("--lang", type=lang_pair, default="ende", help="source and target language codes, e.g. ende")
    g.add_argument("--max_length", type=non_negative_int, default=100,
                   help="drop training pairs longer than this many tokens (0: keep all); also the decoding limit")
    g.add_argument("--batch_size", type=positive_int, default=32, help="sentences per batch")
    g.add_argument("--max_tokens", type=non_negative_int, default=0,
                   help="if > 0, batches hold up to this many padded tokens instead of --batch_size sentences")
    g.add_argument("--max_vocab", type=non_negative_int, default=0, help="largest vocabulary (0: no limit)")
    g.add_argument("--min_freq", type=positive_int, default=1, help="rarer tokens map to <unk>")
    g.add_argument("--spm_vocab_size", type=non_negative_int, default=0,
                   help="if > 0, train SentencePiece models of this size on raw training text")
    g.add_argument("--encoding_errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 bytes: stop with an error, or replace them and count the lines")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--use_transformer", action="store_true", help="a Transformer instead of the LSTM Seq2Seq")
    g.add_argument("--word_vec_size", type=positive_int, default=512, help="embedding size (Seq2Seq)")
    g.add_argument("--hidden_size", type=positive_int, default=768, help="hidden / model size")
    g.add_argument("--n_layers", type=positive_int, default=4, help="encoder and decoder layers")
    g.add_argument("--n_splits", type=positive_int, default=8, help="attention heads (Transformer)")
    g.add_argument("--dropout", type=probability, default=0.2, help="dropout probability")
    g.add_argument("--tie_embeddings", action="store_true",
                   help="share the target embeddings with the output projection (Press & Wolf, 2017); "
                        "Seq2Seq needs --word_vec_size equal to --hidden_size")


def add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--gpu_id", type=int, default=-1, help="GPU to use (-1: CPU)")
    g.add_argument("--off_autocast", action="store_true", help="no mixed precision on GPU")
    g.add_argument("--seed", type=int, default=1, help="seed of data order, initialisation, dropout and sampling")
    g.add_argument("--n_epochs", type=non_negative_int, default=20, help="MLE epochs")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "radam"], default="sgd", help="optimizer")
    g.add_argument("--use_adam", action="store_true", help="same as --optimizer adam")
    g.add_argument("--use_radam", action="store_true", help="same as --optimizer radam")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: 1 for SGD, 1e-3 else)")
    g.add_argument("--lr_step", type=non_negative_int, default=0,
                   help="multiply the lr by --lr_gamma every this many epochs (0: no decay)")
    g.add_argument("--lr_gamma", type=positive_float, default=0.5, help="step decay factor")
    g.add_argument("--lr_decay_start", type=positive_int, default=1, help="first epoch of step decay")
    g.add_argument("--warmup_steps", type=non_negative_int, default=0,
                   help="linear warmup over this many updates, then inverse square root decay (0: off)")
    g.add_argument("--label_smoothing", type=probability, default=0.0, help="label smoothing of the MLE loss")
    g.add_argument("--iteration_per_update", type=positive_int, default=1, help="gradient accumulation")
    g.add_argument("--max_grad_norm", type=non_negative_float, default=5.0, help="gradient clipping (0: off)")
    g.add_argument("--max_bad_steps", type=positive_int, default=10,
                   help="stop after this many updates in a row with a non-finite loss or gradient")
    g.add_argument("--early_stop", type=non_negative_int, default=0,
                   help="stop after this many epochs without a better validation score (0: off)")
    g.add_argument("--verbose", type=int, choices=[0, 1, 2], default=2,
                   help="0: quiet, 1: a line per epoch, 2: also a progress bar")
    g.add_argument("--tensorboard_dir", default=None, help="write TensorBoard logs to this folder")


def add_rl_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reinforcement learning")
    g.add_argument("--rl_n_epochs", type=non_negative_int, default=0, help="RL fine-tuning epochs (0: none)")
    g.add_argument("--rl_lr", type=positive_float, default=None,
                   help="RL learning rate (default: 0.01 for SGD, 1e-5 else)")
    g.add_argument("--rl_n_samples", type=positive_int, default=4, help="K: samples for the baseline")
    g.add_argument("--rl_baseline", choices=["mean", "loo", "greedy", "none"], default="mean",
                   help="mean: one actor, baseline the mean reward of K samples; loo: all K+1 are actors "
                        "with leave-one-out baselines; greedy: the greedy output's reward; none")
    g.add_argument("--rl_objective", choices=["reinforce", "mrt"], default="reinforce",
                   help="REINFORCE, or minimum risk training over the sample set (Shen et al., 2016)")
    g.add_argument("--rl_mrt_alpha", type=positive_float, default=0.005, help="MRT sharpness alpha")
    g.add_argument("--rl_reward", choices=sorted(REWARDS), default="bleu", help="sentence reward")
    g.add_argument("--rl_n_gram", type=positive_int, default=4, help="largest n-gram of BLEU / GLEU rewards")
    g.add_argument("--rl_temperature", type=positive_float, default=1.0, help="sampling temperature")
    g.add_argument("--rl_top_k", type=non_negative_int, default=0, help="sample from the k best tokens (0: all)")
    g.add_argument("--rl_top_p", type=probability, default=1.0, help="nucleus sampling mass")
    g.add_argument("--rl_mle_weight", type=non_negative_float, default=0.0,
                   help="add this weight times the MLE loss on the reference")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an NMT model by maximum likelihood (then RL, with --rl_n_epochs).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_fn", required=True,
                   help="DIR/STEM.pth: the best checkpoint; each epoch also writes DIR/STEM.epochN.pth")
    add_data_options(p)
    add_model_options(p)
    add_training_options(p)
    add_rl_options(p)
    return p


def default_config(**overrides: Any) -> dict[str, Any]:
    """train.py's defaults as a dict, with ``overrides``: the config the engines and ``build_model`` read."""
    config = vars(train_parser().parse_args(["--model_fn", "model.pth"]))
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    config.update(overrides)
    return config


def continue_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Resume training from a checkpoint, or fine-tune it with RL when --rl_n_epochs is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--load_fn", required=True, help="the checkpoint to start from")
    p.add_argument("--model_fn", required=True, help="DIR/STEM.pth for the new checkpoints")
    p.add_argument("--reset_optimizer", action="store_true",
                   help="keep only the checkpoint's weights and vocabularies: a fresh optimizer, schedule and "
                        "epoch count, e.g. to train --n_epochs more MLE epochs at a new --lr")
    add_data_options(p)
    add_model_options(p)
    add_training_options(p)
    add_rl_options(p)
    return p


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """The options written on the command line (not their defaults)."""
    bare = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse._StoreTrueAction):
                bare.add_argument(*action.option_strings, action="store_true", **kwargs)
            else:
                bare.add_argument(*action.option_strings, type=action.type, **kwargs)
    return vars(bare.parse_known_args(argv)[0])


def pick_device(gpu_id: int) -> torch.device:
    """``cuda:N`` for ``--gpu_id N >= 0``, else the CPU; under torchrun any N >= 0 means ``cuda:LOCAL_RANK``."""
    if gpu_id < 0:
        return torch.device("cpu")
    if idist.get_world_size() > 1:
        gpu_id = idist.get_local_rank()
    if not torch.cuda.is_available() or gpu_id >= torch.cuda.device_count():
        raise DataError(f"--gpu_id {gpu_id}: no such CUDA device (use --gpu_id -1 for the CPU)")
    return torch.device(f"cuda:{gpu_id}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_log(config: dict[str, Any]) -> Callable[[str], None]:
    """``print`` with ``--verbose`` >= 1 on rank 0, else nothing."""
    return print if config["verbose"] > 0 and is_main_process() else (lambda _: None)


# Data


def build_fields(config: dict[str, Any], src_lines: list[str], tgt_lines: list[str]) -> tuple[TextField, TextField]:
    """Tokenizers (SentencePiece if ``--spm_vocab_size``) and vocabularies from the training text."""
    fields = []
    for lines in (src_lines, tgt_lines):
        if config["spm_vocab_size"] > 0:
            tokenizer = SentencePieceTokenizer.train(lines, config["spm_vocab_size"], seed=config["seed"])
        else:
            tokenizer = Tokenizer()
        vocab = Vocab.build([tokenizer.encode(line) for line in lines], config["max_vocab"], config["min_freq"])
        fields.append(TextField(tokenizer, vocab))
    return fields[0], fields[1]


def fields_from_checkpoint(meta: dict[str, Any]) -> tuple[TextField, TextField]:
    """The tokenizers and vocabularies stored in a checkpoint."""
    return (TextField(tokenizer_from_bytes(meta["src_spm"]), Vocab(meta["src_vocab"])),
            TextField(tokenizer_from_bytes(meta["tgt_spm"]), Vocab(meta["tgt_vocab"])))


class Corpus:
    """Training and validation data of a run, ready for the loaders."""

    def __init__(self, config: dict[str, Any], fields: tuple[TextField, TextField] | None, log: Callable[[str], None]):
        if not config.get("train") or not config.get("valid"):
            raise DataError("--train and --valid are required")
        src, tgt, n_replaced = read_parallel(config["train"], config["lang"], config["encoding_errors"])
        self.fields = fields or build_fields(config, src, tgt)
        src_field, tgt_field = self.fields
        self.train = ParallelDataset([src_field.to_ids(x) for x in src], [tgt_field.to_ids(y) for y in tgt],
                                     config["max_length"])
        log(f"{config['train']}: {len(src)} pairs, {len(self.train)} kept, {self.train.n_dropped} dropped "
            f"(longer than --max_length {config['max_length']}); vocabularies {len(src_field.vocab)} / "
            f"{len(tgt_field.vocab)}" + (f"; {n_replaced} lines with replaced bytes" if n_replaced else ""))
        if len(self.train) == 0:
            raise DataError(f"{config['train']}: every pair is longer than --max_length {config['max_length']}")
        v_src, v_tgt, _ = read_parallel(config["valid"], config["lang"], config["encoding_errors"])
        self.valid = ParallelDataset([src_field.to_ids(x) for x in v_src], [tgt_field.to_ids(y) for y in v_tgt])
        self.valid_references = [tgt_field.tokenizer.decode(tgt_field.tokenizer.encode(y)) for y in v_tgt]

    def loaders(self, config: dict[str, Any]) -> tuple[BucketBatchSampler, DataLoader, DataLoader]:
        """The training batch sampler (call ``set_epoch``), training and validation loaders.

        In a distributed run they give this rank's share of the batches: as many
        training batches on every rank, every validation batch on one rank.
        """
        shard = {"num_replicas": idist.get_world_size(), "rank": idist.get_rank()}
        sampler = BucketBatchSampler(self.train.lengths(), config["batch_size"], config["max_tokens"],
                                     shuffle=True, seed=config["seed"], **shard)
        if len(sampler) == 0:
            raise DataError(f"{config['train']}: fewer training batches than the {shard['num_replicas']} "
                            "processes; lower --batch_size or --max_tokens")
        valid_sampler = BucketBatchSampler(self.valid.lengths(), config["batch_size"], config["max_tokens"],
                                           shuffle=False, equal_shards=False, **shard)
        return (sampler, DataLoader(self.train, batch_sampler=sampler, collate_fn=collate),
                DataLoader(self.valid, batch_sampler=valid_sampler, collate_fn=collate))


# Training


def fit(
    engine_class: type[MaximumLikelihoodEstimationEngine],
    config: dict[str, Any],
    model: torch.nn.Module,
    corpus: Corpus,
    device: torch.device,
    n_epochs: int,
    resume: dict[str, Any] | None = None,
) -> MaximumLikelihoodEstimationEngine:
    """Train ``model`` with ``engine_class`` for ``n_epochs`` epochs, from ``resume`` if given.

    Checkpoints go to ``config["model_fn"]`` (best) and ``STEM.epochN.pth`` (each epoch).
    In a distributed run the engine trains ``model`` wrapped in ``DistributedDataParallel``
    (rank 0's weights are broadcast when it is wrapped); checkpoints hold ``model`` itself.
    The data order is the same on every rank; dropout and sampling are seeded with
    ``(seed * 1000 + epoch) * world_size + rank``: ``seed * 1000 + epoch`` in a single process.
    """
    sampler, train_loader, valid_loader = corpus.loaders(config)
    rl = engine_class.phase == "rl"
    lr = config["rl_lr"] if rl else config["lr"]
    if rl and lr is None:
        lr = 0.01 if optimizer_name(config) == "sgd" else 1e-5
    optimizer = build_optimizer(model, config, lr)
    updates_per_epoch = len(train_loader) // config["iteration_per_update"]
    scheduler = build_scheduler(optimizer, config, updates_per_epoch)
    engine = engine_class(wrap_model(model, device), optimizer, config, scheduler, device, corpus.fields[1])
    to_save = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": engine.scaler,
               "trainer": engine, "meta": RunInfo(dict(config, phase=engine_class.phase), *corpus.fields)}

    def on_epoch_start(epoch: int) -> None:
        sampler.set_epoch(epoch)
        torch.manual_seed((config["seed"] * 1000 + epoch) * idist.get_world_size() + idist.get_rank())

    log = make_log(config)
    best = attach_handlers(engine, config, on_epoch_start=on_epoch_start, valid_loader=valid_loader,
                           valid_references=corpus.valid_references, to_save=to_save, model_fn=config["model_fn"],
                           best_state=(resume or {}).get("best_checkpointer"), log=log)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        engine.scaler.load_state_dict(resume["scaler"])
        engine.load_state_dict(resume["trainer"])
        if engine.state.epoch >= n_epochs:
            log(f"{config['load_fn']} already has {engine.state.epoch} epochs; nothing to train")
            return engine
        engine.state.max_epochs = n_epochs
    run_until_done_or_interrupted(engine, train_loader, n_epochs, {**to_save, "best_checkpointer": best},
                                  sibling(config["model_fn"], "interrupted"))
    return engine


def sibling(model_fn: str, tag: str) -> str:
    """``DIR/STEM.pth`` -> ``DIR/STEM.TAG.pth``."""
    return str(Path(model_fn).with_suffix("")) + f".{tag}.pth"


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str) -> None:
    """Load a state dict, turning a mismatch into one clear line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: the model does not match the checkpoint's weights ({detail})") from None


def run_training(config: dict[str, Any], checkpoint: dict[str, Any] | None, rl_only: bool,
                 reset_optimizer: bool = False) -> None:
    """Build data and model, then train.

    An RL checkpoint resumes RL. Otherwise MLE runs (from ``checkpoint`` if given)
    unless ``rl_only``, then RL (if ``--rl_n_epochs`` > 0) from the best MLE weights,
    writing ``STEM.rl.pth`` when it follows MLE in the same run. With ``reset_optimizer``
    the checkpoint gives only the weights: its phase starts again from epoch 1 with a
    fresh optimizer and schedule. Under torchrun every rank runs this.
    """
    log = make_log(config)
    seed_everything(config["seed"])
    device = pick_device(config["gpu_id"])
    corpus = Corpus(config, fields_from_checkpoint(checkpoint["meta"]) if checkpoint else None, log)
    try:
        model = build_model(config, len(corpus.fields[0].vocab), len(corpus.fields[1].vocab))
    except ValueError as e:  # e.g. --tie_embeddings with --word_vec_size != --hidden_size
        raise OptionError(str(e)) from None
    if checkpoint:
        load_model_weights(model, checkpoint["model"], config["load_fn"])
    model.to(device)
    resume = None if reset_optimizer else checkpoint
    if checkpoint and checkpoint["meta"]["config"].get("phase") == "rl":
        fit(MinimumRiskTrainingEngine, config, model, corpus, device, config["rl_n_epochs"], resume=resume)
        return
    rl_config = dict(config)
    if not rl_only:
        fit(MaximumLikelihoodEstimationEngine, config, model, corpus, device, config["n_epochs"], resume=resume)
        rl_config["model_fn"] = sibling(config["model_fn"], "rl")
        # rank 0 wrote the best weights and reads them back; the other ranks get them when RL wraps the model
        if config["rl_n_epochs"] > 0 and is_main_process() and Path(config["model_fn"]).is_file():
            best = load_checkpoint(config["model_fn"], map_location=device)
            load_model_weights(model, best["model"], config["model_fn"])
    if config["rl_n_epochs"] > 0:
        fit(MinimumRiskTrainingEngine, rl_config, model, corpus, device, config["rl_n_epochs"])


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """User errors as one line on stderr and exit status 1; Ctrl-C (checkpoint saved) as status 130."""
    try:
        yield
    except (DataError, CheckpointError, OptionError, NonFiniteLossError) as e:
        _fail(str(e))
    except TrainingInterrupted as e:
        _fail(str(e), code=130)


def main_train(argv: Sequence[str] | None = None) -> None:
    """Entry point of train.py."""
    config = vars(train_parser().parse_args(argv))
    with reported_errors():
        with process_group(use_gpu=config["gpu_id"] >= 0):
            run_training(config, None, rl_only=False)


def main_continue(argv: Sequence[str] | None = None) -> None:
    """Entry point of continue_train.py: resume the checkpoint's phase, or RL if --rl_n_epochs is given."""
    parser = continue_parser()
    parser.parse_args(argv)  # reports bad values before any work
    given = given_options(parser, argv)
    reset_optimizer = given.pop("reset_optimizer", False)  # not kept in the new checkpoints' config
    with reported_errors():
        checkpoint = load_checkpoint(given["load_fn"])
        config = dict(checkpoint["meta"]["config"])
        for key in ARCHITECTURE_OPTIONS:
            if key in given and given[key] != config.get(key):
                raise CheckpointError(f"{given['load_fn']}: --{key} {given[key]} does not match the "
                                      f"checkpoint's {config.get(key)}; architecture options cannot change")
        config.update(given)
        rl_only = "rl_n_epochs" in given and config.get("phase", "mle") == "mle"
        if "optimizer" not in checkpoint and not (reset_optimizer or rl_only):
            raise CheckpointError(f"{given['load_fn']}: holds weights only (averaged), nothing to resume; "
                                  "give --reset_optimizer to train them further")
        with process_group(use_gpu=config["gpu_id"] >= 0):
            run_training(config, checkpoint, rl_only=rl_only, reset_optimizer=reset_optimizer)


# Translation


def translate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Translate stdin (or --input) to stdout (or --output), line by line.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_fn", required=True, help="checkpoint to translate with")
    p.add_argument("--input", default=None, help="input file (default: stdin)")
    p.add_argument("--output", default=None, help="output file (default: stdout)")
    p.add_argument("--gpu_id", type=int, default=-1, help="GPU to use (-1: CPU)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="sentences per batch")
    p.add_argument("--beam_size", type=positive_int, default=5, help="beam size (1: greedy)")
    p.add_argument("--n_best", type=positive_int, default=1, help="hypotheses per line, tab-separated")
    p.add_argument("--length_penalty", type=non_negative_float, default=1.0,
                   help="GNMT length penalty alpha (0: none)")
    p.add_argument("--max_length", type=positive_int, default=255,
                   help="longest output, and longest input (longer input is truncated, with a warning)")
    p.add_argument("--max_length_ratio", type=non_negative_float, default=0.0,
                   help="if > 0, outputs are at most this many times the input length (+1)")
    return p


def translate_lines(
    model: torch.nn.Module,
    src_field: TextField,
    tgt_field: TextField,
    lines: list[str],
    config: dict[str, Any],
    device: torch.device,
) -> list[str]:
    """Translate ``lines``: one output per line, empty for an empty line.

    Args:
        config: ``batch_size``, ``beam_size``, ``n_best``, ``length_penalty``, ``max_length``, ``max_length_ratio``.
    """
    outputs = [""] * len(lines)
    ids = [src_field.to_ids(line) for line in lines]
    n_truncated = sum(len(x) > config["max_length"] for x in ids)
    if n_truncated:
        print(f"warning: {n_truncated} input lines longer than --max_length {config['max_length']} "
              "tokens were truncated", file=sys.stderr)
    todo = sorted((i for i, x in enumerate(ids) if x), key=lambda i: len(ids[i]))
    model.eval()
    for start in range(0, len(todo), config["batch_size"]):
        chunk = todo[start: start + config["batch_size"]]
        src = [ids[i][: config["max_length"]] for i in chunk]
        batch = collate([(0, s, []) for s in src])
        src_t, lengths = batch["src"].to(device), batch["src_lengths"].to(device)
        hyps, _ = model.batch_beam_search(src_t, lengths, beam_size=config["beam_size"],
                                          max_length=config["max_length"],
                                          max_length_ratio=config["max_length_ratio"],
                                          length_penalty=config["length_penalty"], n_best=config["n_best"])
        for i, per_line in zip(chunk, hyps):
            outputs[i] = "\t".join(tgt_field.to_text(h) for h in per_line)
    return outputs


def main_translate(argv: Sequence[str] | None = None) -> None:
    """Entry point of translate.py."""
    config = vars(translate_parser().parse_args(argv))
    with reported_errors():
        device = pick_device(config["gpu_id"])
        checkpoint = load_checkpoint(config["model_fn"], map_location=device)
        src_field, tgt_field = fields_from_checkpoint(checkpoint["meta"])
        model = build_model(checkpoint["meta"]["config"], len(src_field.vocab), len(tgt_field.vocab))
        load_model_weights(model, checkpoint["model"], config["model_fn"])
        model.to(device)
        if config["input"]:
            lines, _ = read_lines(config["input"], "replace")
        else:
            lines = [line.rstrip("\r\n") for line in sys.stdin.buffer.read().decode("utf-8", "replace").split("\n")]
            if lines and lines[-1] == "":
                lines.pop()
        outputs = translate_lines(model, src_field, tgt_field, lines, config, device)
    text = "".join(line + "\n" for line in outputs)
    if config["output"]:
        Path(config["output"]).write_text(text, encoding="utf-8")
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader has gone (e.g. `| head -1`): end quietly, without a second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# Checkpoint averaging


def average_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Average the weights of checkpoints of one run, e.g. its last epochs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="checkpoints to average, e.g. runs/model.epoch{21..30}.pth")
    p.add_argument("--output", required=True, help="the averaged checkpoint to write")
    return p


def main_average(argv: Sequence[str] | None = None) -> None:
    """Entry point of average_checkpoints.py."""
    config = vars(average_parser().parse_args(argv))
    with reported_errors():
        if any(Path(p).resolve() == Path(config["output"]).resolve() for p in config["inputs"]):
            raise OptionError(f"--output {config['output']} is one of the inputs; write the average elsewhere")
        save_checkpoint(average_checkpoints(config["inputs"]), config["output"])
    print(f"{config['output']}: the average of {len(config['inputs'])} checkpoints")
