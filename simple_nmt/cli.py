"""Command-line options and the run functions behind the scripts: train.py, continue_train.py,
translate.py and average_checkpoints.py."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import random
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader

from simple_nmt.checkpoint import UNUSABLE, CheckpointError, average_checkpoints, load_checkpoint, save_checkpoint
from simple_nmt.config import (
    CONFIG_GROUPS,
    FIXED,
    INHERITED,
    LOCAL,
    Config,
    ConfigError,
    ModelOptions,
    TranslateOptions,
    check_value,
    config_from_checkpoint,
    source_of,
    value_type,
)
from simple_nmt.data import (
    LIBRARY_IDS,
    SPECIALS,
    BucketBatchSampler,
    DataError,
    ParallelDataset,
    SentencePieceTokenizer,
    SpecialIds,
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
from simple_nmt.hf import HuggingFaceError, HuggingFaceModel
from simple_nmt.models import build_model
from simple_nmt.precision import PrecisionError, resolve_precision
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.search import special_ids
from simple_nmt.trainer import (
    MaximumLikelihoodEstimationEngine,
    NonFiniteLossError,
    RandomState,
    TrainingInterrupted,
    attach_handlers,
    build_optimizer,
    build_scheduler,
    run_until_done_or_interrupted,
)

OptionError = ConfigError  # options that do not fit together; the message is one line naming them


def _parse_text(f: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
    """argparse's ``type`` for option ``f``: the text converted and checked like a value given in Python."""
    kind, _ = value_type(hint)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            return check_value(f, hint, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_option(group: argparse._ActionsContainer, f: dataclasses.Field, hint: Any, required: bool = False,
               show_default: bool = True) -> None:
    """The command-line flag of one option (and its aliases); nothing is set when it is not given,
    so that the parsed namespace holds exactly the options written on the command line."""
    kind, _ = value_type(hint)
    help_text = f.metadata["help"] + ("" if f.default is None or not show_default else f" (default: {f.default})")
    if kind is bool:
        group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_text)
    else:
        choices = f.metadata["choices"]
        group.add_argument(f"--{f.name}", type=_parse_text(f, hint), default=argparse.SUPPRESS,
                           required=required, help=help_text,
                           metavar="{" + ",".join(map(str, choices)) + "}" if choices else None)
    for alias, value in f.metadata["aliases"].items():
        group.add_argument(f"--{alias}", dest=f.name, action="store_const", const=value,
                           default=argparse.SUPPRESS, help=f"same as --{f.name} {value}")


def train_parser() -> argparse.ArgumentParser:
    """train.py's options, generated from ``simple_nmt.config``, a group per option class."""
    p = argparse.ArgumentParser(description="Train an NMT model by maximum likelihood (then RL, with --rl_n_epochs).")
    hints, seen = typing.get_type_hints(Config), set()
    for cls in CONFIG_GROUPS:
        group = p.add_argument_group(cls.__doc__)
        for f in dataclasses.fields(cls):
            if f.name not in seen:  # a group class also has its bases' fields (RunOptions: DeviceOptions')
                add_option(group, f, hints[f.name], required=f.name == "model_fn")
                seen.add(f.name)
    return p


def default_config(**overrides: Any) -> Config:
    """train.py's defaults with ``overrides``: the ``Config`` the engines and ``build_model`` read.

    Raises:
        ValueError: an unknown option, or a bad value, named.
    """
    return Config.from_dict(overrides)


CONTINUE_GROUPS = {
    FIXED: "fixed by the checkpoint (architecture, vocabularies, tokenizers): a different value is an error",
    INHERITED: "taken from the checkpoint unless given here (data, training, RL)",
    LOCAL: "from this command line and its defaults only, never from the checkpoint",
}


def continue_parser() -> argparse.ArgumentParser:
    """continue_train.py's options: train.py's, grouped by where they come from, and ``--load_fn``."""
    p = argparse.ArgumentParser(
        description="Resume training from a checkpoint, or fine-tune it with RL when --rl_n_epochs is given.",
        epilog="From the checkpoint come the architecture, the vocabularies and tokenizers, the data, training "
               "and RL settings not given here, and (to resume exactly) the optimizer, schedule and epoch count. "
               "Where to run, what to log and where to write come from this command line and its defaults.",
    )
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--load_fn", help="the checkpoint to start from")
    p.add_argument("--reset_optimizer", action="store_true", default=argparse.SUPPRESS,
                   help="keep only the checkpoint's weights and vocabularies: a fresh optimizer, schedule and "
                        "epoch count, e.g. to train --n_epochs more MLE epochs at a new --lr")
    hints = typing.get_type_hints(Config)
    groups = {source: p.add_argument_group(title) for source, title in CONTINUE_GROUPS.items()}
    for f in dataclasses.fields(Config):
        source = f.metadata["source"]
        group = start if f.name == "hf_model" else groups[source]  # where to start from: one of the two
        add_option(group, f, hints[f.name], required=f.name == "model_fn", show_default=source == LOCAL)
    return p


def stored_config(checkpoint: Mapping[str, Any], path: str, options: type = Config) -> Config:
    """The ``Config`` a checkpoint was trained with (checkpoints of earlier versions included), without
    where it ran and logged: the LOCAL options are the defaults.

    Args:
        options: the option group to take (``ModelOptions``: what translation needs); the rest are defaults.
    """
    names = {f.name for f in dataclasses.fields(options)}
    try:
        return Config.from_dict({k: v for k, v in config_from_checkpoint(checkpoint["meta"]["config"]).items()
                                 if k in names})
    except ValueError as e:
        raise CheckpointError(f"{path}: {UNUSABLE}: its config: {e}") from None


def continued_config(checkpoint: Mapping[str, Any], given: Mapping[str, Any], load_fn: str) -> Config:
    """The config of continue_train.py: the checkpoint's config, then the options ``given``.

    Options of source LOCAL are never taken from the checkpoint; a FIXED option given with a
    value other than the checkpoint's is an error.
    """
    stored = stored_config(checkpoint, load_fn)
    for key, value in given.items():
        if source_of(key) == FIXED and value != getattr(stored, key):
            raise CheckpointError(f"{load_fn}: --{key} {value} does not match the checkpoint's "
                                  f"{getattr(stored, key)}; architecture options cannot change")
    return stored.replace(**given)  # the LOCAL options were not taken from it: here they are defaults


def check_output_path(path: str | None, option: str, is_dir: bool = False) -> None:
    """Refuse, before any work, a path that cannot be written: a file path that is a directory
    (or a folder path that is a file), or one under a file. Missing folders are made when written."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != is_dir:
        raise OptionError(f"{option} {path}: is a {'file' if is_dir else 'directory'}; "
                          f"give {'a folder' if is_dir else 'a file name'}")
    parent = next(q for q in p.resolve().parents if q.exists())
    if not parent.is_dir():
        raise OptionError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: cannot write in {parent}")


def check_training_outputs(config: Config) -> None:
    """The checkpoint and TensorBoard paths of a training run, checked before it starts."""
    check_output_path(config.model_fn, "--model_fn")
    check_output_path(config.tensorboard_dir, "--tensorboard_dir", is_dir=True)


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


def make_log(config: Config) -> Callable[[str], None]:
    """``print`` with ``--verbose`` >= 1 on rank 0, else nothing."""
    return print if config.verbose > 0 and is_main_process() else (lambda _: None)


# Data


def build_fields(config: Config, src_lines: list[str], tgt_lines: list[str]) -> tuple[TextField, TextField]:
    """Tokenizers (SentencePiece if ``--spm_vocab_size``) and vocabularies from the training text."""
    fields = []
    for lang, lines in zip(split_lang(config.lang), (src_lines, tgt_lines)):
        if config.spm_vocab_size > 0:
            try:
                tokenizer = SentencePieceTokenizer.train(lines, config.spm_vocab_size, seed=config.seed)
            except RuntimeError as e:  # fewer pieces than the text's characters and the special pieces
                needed = re.search(r"(\d+) vs (\d+)", str(e))
                hint = f"it needs at least {needed.group(2)}" if needed else "it needs more pieces"
                raise OptionError(f"--spm_vocab_size {config.spm_vocab_size}: too small for SentencePiece on "
                                  f"{config.train}.{lang}; {hint}") from None
        else:
            tokenizer = Tokenizer()
        vocab = Vocab.build([tokenizer.encode(line) for line in lines], config.max_vocab, config.min_freq)
        fields.append(TextField(tokenizer, vocab))
    return fields[0], fields[1]


def fields_from_checkpoint(meta: Mapping[str, Any], path: str) -> tuple[TextField, TextField]:
    """The tokenizers and vocabularies stored in the checkpoint read from ``path``."""
    fields = []
    for side in ("src", "tgt"):
        try:
            vocab = Vocab(meta[f"{side}_vocab"])
        except ValueError:
            raise CheckpointError(f"{path}: {UNUSABLE}: its {side}_vocab does not start "
                                  f"with the special tokens {SPECIALS}") from None
        try:
            tokenizer = tokenizer_from_bytes(meta[f"{side}_spm"])
        except RuntimeError:
            raise CheckpointError(f"{path}: {UNUSABLE}: its {side}_spm is not a "
                                  "SentencePiece model") from None
        fields.append(TextField(tokenizer, vocab))
    return fields[0], fields[1]


class Corpus:
    """Training and validation data of a run, ready for the loaders.

    Args:
        fields: the source and target fields (built from the training text when None).
        special_ids: the model's special ids, which collate pads and brackets targets with.
    """

    def __init__(self, config: Config, fields: tuple[TextField, TextField] | None, log: Callable[[str], None],
                 special_ids: SpecialIds = LIBRARY_IDS):
        self.collate = functools.partial(collate, ids=special_ids)
        if not config.train or not config.valid:
            raise DataError("--train and --valid are required")
        src, tgt, n_replaced = read_parallel(config.train, config.lang, config.encoding_errors)
        self.fields = fields or build_fields(config, src, tgt)
        src_field, tgt_field = self.fields
        self.train = ParallelDataset([src_field.to_ids(x) for x in src], [tgt_field.to_ids(y) for y in tgt],
                                     config.max_length)
        log(f"{config.train}: {len(src)} pairs, {len(self.train)} kept, {self.train.n_dropped} dropped "
            f"(longer than --max_length {config.max_length}); vocabularies {len(src_field)} / "
            f"{len(tgt_field)}" + (f"; {n_replaced} lines with replaced bytes" if n_replaced else ""))
        if len(self.train) == 0:
            raise DataError(f"{config.train}: every pair is longer than --max_length {config.max_length}")
        v_src, v_tgt, _ = read_parallel(config.valid, config.lang, config.encoding_errors)
        self.valid = ParallelDataset([src_field.to_ids(x) for x in v_src], [tgt_field.to_ids(y) for y in v_tgt])
        self.valid_references = [tgt_field.reference(y) for y in v_tgt]

    def loaders(self, config: Config) -> tuple[BucketBatchSampler, DataLoader, DataLoader]:
        """The training batch sampler (call ``set_epoch``), training and validation loaders.

        In a distributed run they give this rank's share of the batches: as many
        training batches on every rank, every validation batch on one rank.
        """
        shard = {"num_replicas": idist.get_world_size(), "rank": idist.get_rank()}
        sampler = BucketBatchSampler(self.train.lengths(), config.batch_size, config.max_tokens,
                                     shuffle=True, seed=config.seed, **shard)
        if len(sampler) == 0:
            raise DataError(f"{config.train}: fewer training batches than the {shard['num_replicas']} "
                            "processes; lower --batch_size or --max_tokens")
        valid_sampler = BucketBatchSampler(self.valid.lengths(), config.batch_size, config.max_tokens,
                                           shuffle=False, equal_shards=False, **shard)
        return (sampler, DataLoader(self.train, batch_sampler=sampler, collate_fn=self.collate),
                DataLoader(self.valid, batch_sampler=valid_sampler, collate_fn=self.collate))


# Training


def fit(
    engine_class: type[MaximumLikelihoodEstimationEngine],
    config: Config,
    model: torch.nn.Module,
    corpus: Corpus,
    device: torch.device,
    n_epochs: int,
    resume: dict[str, Any] | None = None,
    resume_lr: float | None = None,
    load_fn: str | None = None,
) -> MaximumLikelihoodEstimationEngine:
    """Train ``model`` with ``engine_class`` for ``n_epochs`` epochs, from ``resume`` (the checkpoint
    read from ``load_fn``) if given, at peak learning rate ``resume_lr`` instead of its own if given.

    Checkpoints go to ``config.model_fn`` (best) and ``STEM.epochN.pth`` (each epoch).
    In a distributed run the engine trains ``model`` wrapped in ``DistributedDataParallel``
    (rank 0's weights are broadcast when it is wrapped); checkpoints hold ``model`` itself.
    The data order is the same on every rank; dropout and sampling are seeded with
    ``(seed * 1000 + epoch) * world_size + rank``: ``seed * 1000 + epoch`` in a single process.
    """
    sampler, train_loader, valid_loader = corpus.loaders(config)
    optimizer = build_optimizer(model, config, config.learning_rate(engine_class.phase))
    updates_per_epoch = len(train_loader) // config.iteration_per_update
    scheduler = build_scheduler(optimizer, config, updates_per_epoch, phase=engine_class.phase)
    engine = engine_class(wrap_model(model, device), optimizer, config, scheduler, device, corpus.fields[1])

    # resumed in the middle of an epoch (after Ctrl-C): the epoch goes on with its next batch, and
    # in a single process with the random state it stopped with (saved by rank 0 alone under torchrun)
    done = resume["trainer"].get("iteration", 0) % resume["trainer"]["epoch_length"] if resume is not None else 0
    skip = [done] if done else []
    random_state = [resume["rng"]] if done and "rng" in resume and idist.get_world_size() == 1 else []

    def on_epoch_start(epoch: int) -> None:
        sampler.set_epoch(epoch, skip=skip.pop() if skip else 0)
        torch.manual_seed((config.seed * 1000 + epoch) * idist.get_world_size() + idist.get_rank())

    def on_first_iteration(_: Engine) -> None:  # after the data loader's iterator drew its seed
        if random_state:
            RandomState().load_state_dict(random_state.pop())

    engine.add_event_handler(Events.ITERATION_STARTED, on_first_iteration)

    log = make_log(config)
    to_save = attach_handlers(engine, config, on_epoch_start=on_epoch_start, valid_loader=valid_loader,
                              valid_references=corpus.valid_references, fields=corpus.fields,
                              model_fn=config.model_fn, best_state=(resume or {}).get("best_checkpointer"), log=log)
    if resume is not None:
        try:
            engine.resume(resume, lr=resume_lr)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{load_fn}: {UNUSABLE}: its optimizer, schedule or trainer state does not "
                                  f"resume ({type(e).__name__}: {e})") from None
        if engine.state.epoch >= n_epochs:
            log(f"the checkpoint already has {engine.state.epoch} epochs; nothing to train")
            return engine
        engine.state.max_epochs = n_epochs
    run_until_done_or_interrupted(engine, train_loader, n_epochs, to_save,
                                  sibling(config.model_fn, "interrupted"))
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
        raise CheckpointError(f"{path}: {UNUSABLE}: its weights do not load into the model ({detail})") from None


def check_weights_fit(config: Config, fields: tuple[TextField, TextField], weights: Mapping[str, torch.Tensor],
                      path: str) -> None:
    """Refuse the weights of the checkpoint read from ``path`` unless their names and shapes are the model's.

    The model is built on the ``meta`` device, which allocates nothing, so that a damaged
    config cannot ask for a huge model.
    """
    shapes = {k: tuple(v.shape) for k, v in meta_model(config, fields, path).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != shapes:
        key = sorted(k for k in shapes.keys() | found.keys() if shapes.get(k) != found.get(k))[0]
        raise CheckpointError(f"{path}: {UNUSABLE}: its weights do not fit its config and vocabularies "
                              f"({key}: {found.get(key, 'missing')}, expected {shapes.get(key, 'none')})")


def check_translatable(checkpoint: Mapping[str, Any], path: str) -> None:
    """Refuse a checkpoint that translate.py would refuse: its vocabularies, tokenizers and model options,
    and its weights against them."""
    if "hf" in checkpoint["meta"]:
        hf_model_for(TranslateOptions(), checkpoint, path)
        return
    check_weights_fit(stored_config(checkpoint, path, ModelOptions), fields_from_checkpoint(checkpoint["meta"], path),
                      checkpoint["model"], path)


def meta_model(config: Config, fields: tuple[TextField, TextField], path: str | None = None) -> torch.nn.Module:
    """The model of ``config`` on the ``meta`` device (shapes only); a config it cannot be built from is an
    ``OptionError``, or a ``CheckpointError`` when it comes from the checkpoint ``path``."""
    try:
        with torch.device("meta"):
            return build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    except (ValueError, RuntimeError) as e:  # --tie_embeddings with unequal sizes; sizes past what torch can hold
        detail = str(e).strip().splitlines()[0] if isinstance(e, ValueError) else f"no such model can be built ({e})"
        if path is None:
            raise OptionError(detail) from None
        raise CheckpointError(f"{path}: {UNUSABLE}: its config: {detail}") from None


def model_for(config: Config, fields: tuple[TextField, TextField], weights: Mapping[str, torch.Tensor] | None = None,
              path: str | None = None) -> torch.nn.Module:
    """``build_model`` for ``config`` and the fields' vocabularies, with the ``weights`` of the checkpoint
    read from ``path`` if given (checked first by ``check_weights_fit``)."""
    if weights is None:
        meta_model(config, fields)
    else:
        check_weights_fit(config, fields, weights, path)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    if weights is not None:
        load_model_weights(model, dict(weights), path)
    return model


def hf_model_for(config: Config | TranslateOptions, checkpoint: Mapping[str, Any] | None = None,
                 path: str | None = None) -> HuggingFaceModel | None:
    """The Hugging Face model of a run: the checkpoint's (read from ``path``) if it holds one, with its
    weights, else the one in the folder ``--hf_model``; None for the library's own models."""
    if checkpoint is not None and "hf" in checkpoint["meta"]:
        tgt_lang = checkpoint["meta"]["config"].get("hf_tgt_lang")
        try:
            model = HuggingFaceModel.from_checkpoint_meta(checkpoint["meta"]["hf"], tgt_lang=tgt_lang)
        except (OSError, ValueError, TypeError, KeyError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: {UNUSABLE}: its Hugging Face model files do not load ({detail})"
                                  ) from None
        load_model_weights(model, dict(checkpoint["model"]), path)
        return model
    if config.hf_model:
        return HuggingFaceModel.from_pretrained(config.hf_model, tgt_lang=config.hf_tgt_lang)
    return None


def check_hf_length(model: HuggingFaceModel, length: int) -> None:
    """Refuse a decoding limit (``--max_length``) longer than the Hugging Face model's positions."""
    if length > model.longest_output:
        raise OptionError(f"--max_length {length}: {type(model.hf).__name__} decodes at most "
                          f"{model.longest_output} tokens (its max_position_embeddings); give at most that")


def run_training(config: Config, checkpoint: dict[str, Any] | None, rl_only: bool,
                 reset_optimizer: bool = False, load_fn: str | None = None, resume_lr: float | None = None) -> None:
    """Build data and model, then train.

    An RL checkpoint resumes RL. Otherwise MLE runs (from ``checkpoint`` if given)
    unless ``rl_only``, then RL (if ``--rl_n_epochs`` > 0) from the best MLE weights,
    writing ``STEM.rl.pth`` when it follows MLE in the same run. With ``reset_optimizer``
    the checkpoint gives only the weights: its phase starts again from epoch 1 with a
    fresh optimizer and schedule. Under torchrun every rank runs this.

    Args:
        load_fn: the file ``checkpoint`` was read from (named in errors).
        resume_lr: the peak learning rate of the resumed phase, if the command line changes it.
    """
    log = make_log(config)
    seed_everything(config.seed)
    device = pick_device(config.gpu_id)
    resolve_precision(config.precision, device)  # a precision the device cannot run stops here, before the data
    hf = hf_model_for(config, checkpoint, load_fn)
    if hf is not None:
        check_hf_length(hf, config.decoding_length)
        corpus = Corpus(config, hf.fields(), log, hf.special_ids)
        model = hf.to(device)
    else:
        corpus = Corpus(config, fields_from_checkpoint(checkpoint["meta"], load_fn) if checkpoint else None, log)
        model = model_for(config, corpus.fields, checkpoint["model"] if checkpoint else None, load_fn).to(device)
    resume = None if reset_optimizer else checkpoint
    if checkpoint and checkpoint["meta"]["config"].get("phase") == "rl":
        fit(MinimumRiskTrainingEngine, config, model, corpus, device, config.rl_n_epochs, resume=resume,
            resume_lr=resume_lr, load_fn=load_fn)
        return
    rl_config = config
    if not rl_only:
        fit(MaximumLikelihoodEstimationEngine, config, model, corpus, device, config.n_epochs, resume=resume,
            resume_lr=resume_lr, load_fn=load_fn)
        rl_config = config.replace(model_fn=sibling(config.model_fn, "rl"))
        # rank 0 wrote the best weights and reads them back; the other ranks get them when RL wraps the model
        if config.rl_n_epochs > 0 and is_main_process() and Path(config.model_fn).is_file():
            best = load_checkpoint(config.model_fn, map_location=device)
            load_model_weights(model, best["model"], config.model_fn)
    if config.rl_n_epochs > 0:
        fit(MinimumRiskTrainingEngine, rl_config, model, corpus, device, config.rl_n_epochs)


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextmanager
def reported_errors() -> Iterator[None]:
    """User errors as one line on stderr and exit status 1; Ctrl-C or SIGTERM (checkpoint saved) as 128 + signal;
    warnings as one line on stderr."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            yield
    except (DataError, CheckpointError, ConfigError, NonFiniteLossError, PrecisionError, HuggingFaceError) as e:
        _fail(str(e))
    except TrainingInterrupted as e:
        _fail(str(e), code=128 + e.signum)  # 130 for Ctrl-C, 143 for SIGTERM


def main_train(argv: Sequence[str] | None = None) -> None:
    """Entry point of train.py."""
    given = vars(train_parser().parse_args(argv))
    with reported_errors():
        config = Config.from_dict(given)
        check_training_outputs(config)
        with process_group(use_gpu=config.gpu_id >= 0):
            run_training(config, None, rl_only=False)


def main_continue(argv: Sequence[str] | None = None) -> None:
    """Entry point of continue_train.py: resume the checkpoint's phase, or RL if --rl_n_epochs is given."""
    given = vars(continue_parser().parse_args(argv))  # bad values are reported before any work
    load_fn = given.pop("load_fn", None)
    reset_optimizer = given.pop("reset_optimizer", False)  # not kept in the new checkpoints' config
    with reported_errors():
        if load_fn is None:
            if reset_optimizer:
                raise OptionError("--reset_optimizer needs --load_fn: a Hugging Face model starts afresh anyway")
            fine_tune_hf(given)
            return
        checkpoint = load_checkpoint(load_fn)
        config = continued_config(checkpoint, given, load_fn)
        check_training_outputs(config)
        phase = checkpoint["meta"]["config"].get("phase", "mle")
        rl_only = "rl_n_epochs" in given and phase == "mle"
        resume_lr = None
        if not (reset_optimizer or rl_only):  # an exact resume of the checkpoint's phase
            if "optimizer" not in checkpoint:
                raise CheckpointError(f"{load_fn}: holds weights only (averaged), nothing to resume; "
                                      "give --reset_optimizer to train them further")
            stored = stored_config(checkpoint, load_fn)
            if config.optimizer != stored.optimizer:
                raise OptionError(f"--optimizer {config.optimizer}: the checkpoint resumes {stored.optimizer}'s "
                                  "state; give --reset_optimizer to start a fresh optimizer")
            if ("rl_lr" if phase == "rl" else "lr") in given:
                resume_lr = config.learning_rate(phase)
        with process_group(use_gpu=config.gpu_id >= 0):
            run_training(config, checkpoint, rl_only=rl_only, reset_optimizer=reset_optimizer, load_fn=load_fn,
                         resume_lr=resume_lr)


def fine_tune_hf(given: Mapping[str, Any]) -> None:
    """continue_train.py --hf_model DIR: MLE for --n_epochs, then (or only) RL for --rl_n_epochs, from the
    model saved in DIR; the library's checkpoints as usual, and the best weights also in ``STEM.hf/``."""
    if not {"n_epochs", "rl_n_epochs"} & given.keys():
        raise OptionError(f"--hf_model {given['hf_model']}: give --n_epochs N (MLE) and/or --rl_n_epochs N (RL)")
    config = Config.from_dict({"n_epochs": 0, **given})
    check_training_outputs(config)
    with process_group(use_gpu=config.gpu_id >= 0):
        run_training(config, None, rl_only=config.n_epochs == 0)


# Translation


def translate_parser() -> argparse.ArgumentParser:
    """translate.py's options, generated from ``simple_nmt.config.TranslateOptions``."""
    p = argparse.ArgumentParser(description="Translate stdin (or --input) to stdout (or --output), line by line.")
    hints = typing.get_type_hints(TranslateOptions)
    group = p.add_argument_group(TranslateOptions.__doc__)
    model = group.add_mutually_exclusive_group(required=True)  # a checkpoint, or a Hugging Face model folder
    for f in dataclasses.fields(TranslateOptions):
        add_option(model if f.name in ("model_fn", "hf_model") else group, f, hints[f.name])
    return p


def translate_lines(
    model: torch.nn.Module,
    src_field: TextField,
    tgt_field: TextField,
    lines: list[str],
    config: TranslateOptions,
    device: torch.device,
) -> list[str]:
    """Translate ``lines``: one output per line, empty for an empty line.

    Args:
        config: ``batch_size``, ``beam_size``, ``n_best``, ``length_penalty``, ``max_length``, ``max_length_ratio``.
    """
    outputs = [""] * len(lines)
    ids = [src_field.to_ids(line) for line in lines]
    n_truncated = sum(len(x) > config.max_length for x in ids)
    if n_truncated:
        print(f"warning: {n_truncated} input lines longer than --max_length {config.max_length} "
              "tokens were truncated", file=sys.stderr)
    todo = sorted((i for i, x in enumerate(ids) if x), key=lambda i: len(ids[i]))
    model.eval()
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start: start + config.batch_size]
        src = [ids[i][: config.max_length] for i in chunk]
        batch = collate([(0, s, []) for s in src], special_ids(model))
        src_t, lengths = batch["src"].to(device), batch["src_lengths"].to(device)
        hyps, _ = model.batch_beam_search(src_t, lengths, beam_size=config.beam_size,
                                          max_length=config.max_length,
                                          max_length_ratio=config.max_length_ratio,
                                          length_penalty=config.length_penalty, n_best=config.n_best)
        for i, per_line in zip(chunk, hyps):
            outputs[i] = "\t".join(tgt_field.to_text(h) for h in per_line)
    return outputs


def main_translate(argv: Sequence[str] | None = None) -> None:
    """Entry point of translate.py."""
    config = TranslateOptions.from_dict(vars(translate_parser().parse_args(argv)))
    with reported_errors():
        check_output_path(config.output, "--output")
        device = pick_device(config.gpu_id)
        precision = resolve_precision(config.precision, device)
        checkpoint = None if config.hf_model else load_checkpoint(config.model_fn, map_location=device)
        hf = hf_model_for(config, checkpoint, config.model_fn)
        if hf is not None:
            check_hf_length(hf, config.max_length)
            model, (src_field, tgt_field) = hf.to(device), hf.fields()
        else:
            src_field, tgt_field = fields = fields_from_checkpoint(checkpoint["meta"], config.model_fn)
            model = model_for(stored_config(checkpoint, config.model_fn, ModelOptions), fields, checkpoint["model"],
                              config.model_fn).to(device)
        if config.input:
            lines, _ = read_lines(config.input, "replace")
        else:
            lines = [line.rstrip("\r\n") for line in sys.stdin.buffer.read().decode("utf-8", "replace").split("\n")]
            if lines and lines[-1] == "":
                lines.pop()
        with precision.autocast():
            outputs = translate_lines(model, src_field, tgt_field, lines, config, device)
    text = "".join(line + "\n" for line in outputs)
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(text, encoding="utf-8")
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader has gone (e.g. `| head -1`): end quietly, without a second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# Checkpoint averaging


def average_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Average the weights of checkpoints of one run, e.g. its last epochs.")
    p.add_argument("inputs", nargs="+", help="checkpoints to average, e.g. runs/model.epoch{21..30}.pth")
    p.add_argument("--output", required=True, help="the averaged checkpoint to write")
    return p


def main_average(argv: Sequence[str] | None = None) -> None:
    """Entry point of average_checkpoints.py."""
    config = vars(average_parser().parse_args(argv))
    with reported_errors():
        check_output_path(config["output"], "--output")
        if any(Path(p).resolve() == Path(config["output"]).resolve() for p in config["inputs"]):
            raise OptionError(f"--output {config['output']} is one of the inputs; write the average elsewhere")
        save_checkpoint(average_checkpoints(config["inputs"], check=check_translatable), config["output"])
    print(f"{config['output']}: the average of {len(config['inputs'])} checkpoints")
