"""The training runs behind train.py and continue_train.py: which phase runs, from what, and the fit loop."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from simple_nmt.checkpoint import UNUSABLE, CheckpointError, load_checkpoint
from simple_nmt.config import (
    FIXED,
    Config,
    ConfigError,
    source_of,
)
from simple_nmt.corpus import Corpus
from simple_nmt.data import (
    DataError,
)
from simple_nmt.distributed import is_main_process, process_group, wrap_model
from simple_nmt.hf import HuggingFaceModel
from simple_nmt.loading import check_hf_length, load_model_weights, model_for, restore, stored_config
from simple_nmt.precision import resolve_precision
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import (
    MaximumLikelihoodEstimationEngine,
    RandomState,
    attach_handlers,
    build_optimizer,
    build_scheduler,
    optimizer_state_mismatch,
    run_until_done_or_interrupted,
)


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
        raise ConfigError(f"{option} {path}: is a {'file' if is_dir else 'directory'}; "
                          f"give {'a folder' if is_dir else 'a file name'}")
    parent = next(q for q in p.resolve().parents if q.exists())
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {parent}")


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
    # the RL engine's rewards may read the raw lines of the examples they score
    lines = dict(zip(("src_lines", "tgt_lines"), corpus.train_lines)) if engine_class.phase == "rl" else {}
    try:
        engine = engine_class(wrap_model(model, device), optimizer, config, scheduler, device, corpus.fields[1],
                              **lines)
    except ValueError as e:  # options the engine refuses, e.g. a --rl_reward module:function that does not import
        raise ConfigError(str(e)) from None

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
    if checkpoint is not None or config.hf_model:
        model, fields = restore(checkpoint, load_fn, config)
        corpus = Corpus(config, fields, log)
    else:
        corpus = Corpus(config, None, log)
        model = model_for(config, corpus.fields)
    if isinstance(model, HuggingFaceModel):
        check_hf_length(model, config.decoding_length)
    model = model.to(device)
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


def continue_training(given: Mapping[str, Any], load_fn: str | None, reset_optimizer: bool = False) -> None:
    """continue_train.py: what runs from the checkpoint ``load_fn`` with the options ``given``.

    ==========  ====================  ===================  ================================================
    checkpoint  --rl_n_epochs given   --reset_optimizer    what runs
    ==========  ====================  ===================  ================================================
    MLE         no                    no                   MLE resumed exactly (then RL if its config says)
    MLE         no                    yes                  a new MLE phase from its weights
    MLE         yes                   either               RL from its weights
    RL          either                no                   RL resumed exactly
    RL          either                yes                  a new RL phase from its weights
    (none)      --hf_model DIR                             MLE (--n_epochs) and/or RL from the folder
    ==========  ====================  ===================  ================================================

    An exact resume needs the optimizer state (not in averaged checkpoints) of the optimizer it builds.
    """
    if load_fn is None:
        if reset_optimizer:
            raise ConfigError("--reset_optimizer needs --load_fn: a Hugging Face model starts afresh anyway")
        fine_tune_hf(given)
        return
    checkpoint = load_checkpoint(load_fn)
    config = continued_config(checkpoint, given, load_fn)
    check_training_outputs(config)
    phase = checkpoint["meta"]["config"].get("phase", "mle")
    rl_only = "rl_n_epochs" in given and phase == "mle"
    if phase == "rl" or rl_only or config.rl_n_epochs > 0:
        check_reward_stored(config, load_fn)
    resume_lr = None
    if not (reset_optimizer or rl_only):  # an exact resume of the checkpoint's phase
        check_resumable(checkpoint, config, load_fn)
        if ("rl_lr" if phase == "rl" else "lr") in given:
            resume_lr = config.learning_rate(phase)
    with process_group(use_gpu=config.gpu_id >= 0):
        run_training(config, checkpoint, rl_only=rl_only, reset_optimizer=reset_optimizer, load_fn=load_fn,
                     resume_lr=resume_lr)


def check_reward_stored(config: Config, load_fn: str) -> None:
    """Refuse to run RL from a checkpoint whose reward was given in Python without a name it can be
    built again from (``rl_reward`` None), unless ``--rl_reward`` names one."""
    if config.rl_reward is None:
        raise ConfigError(f"{load_fn}: trained with a reward given in Python that has no importable name; "
                          "give --rl_reward NAME or --rl_reward module:function")


def check_resumable(checkpoint: Mapping[str, Any], config: Config, load_fn: str) -> None:
    """Refuse, before any work, an exact resume that cannot work: a checkpoint without optimizer state,
    a changed ``--optimizer``, or optimizer state of another kind than the optimizer it would resume."""
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{load_fn}: holds weights only (averaged), nothing to resume; "
                              "give --reset_optimizer to train them further")
    stored = stored_config(checkpoint, load_fn)
    if config.optimizer != stored.optimizer:
        raise ConfigError(f"--optimizer {config.optimizer}: the checkpoint resumes {stored.optimizer}'s "
                          "state; give --reset_optimizer to start a fresh optimizer")
    mismatch = optimizer_state_mismatch(checkpoint["optimizer"], stored.optimizer)
    if mismatch:
        raise CheckpointError(f"{load_fn}: {mismatch}; give --reset_optimizer to start a fresh optimizer")


def fine_tune_hf(given: Mapping[str, Any]) -> None:
    """continue_train.py --hf_model DIR: MLE for --n_epochs, then (or only) RL for --rl_n_epochs, from the
    model saved in DIR; the library's checkpoints as usual, and the best weights also in ``STEM.hf/``."""
    if not {"n_epochs", "rl_n_epochs"} & given.keys():
        raise ConfigError(f"--hf_model {given['hf_model']}: give --n_epochs N (MLE) and/or --rl_n_epochs N (RL)")
    config = Config.from_dict({"n_epochs": 0, **given})
    check_training_outputs(config)
    with process_group(use_gpu=config.gpu_id >= 0):
        run_training(config, None, rl_only=config.n_epochs == 0)
