"""Maximum likelihood training: the ignite engine that owns the step, and its handlers."""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import sacrebleu
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EarlyStopping, ProgressBar
from ignite.metrics import RunningAverage
from torch.nn.parallel import DistributedDataParallel

from simple_nmt.checkpoint import AtomicSaver, save_checkpoint
from simple_nmt.config import Config, as_config
from simple_nmt.data import LIBRARY_IDS, SpecialIds, TextField
from simple_nmt.distributed import is_main_process
from simple_nmt.hf import HuggingFaceModel
from simple_nmt.precision import resolve_precision
from simple_nmt.search import output_ids, special_ids

# the trainer state's counters of non-finite updates: in a row, and in all
SKIP_COUNTERS = ("n_bad_steps", "n_skipped_steps")

# the optimizers of --optimizer, and hyperparameters every state dict of each holds (a resume checks them)
OPTIMIZER_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                     "radam": torch.optim.RAdam}
OPTIMIZER_KEYS = {"sgd": {"momentum", "nesterov"}, "adam": {"betas", "eps"}, "adamw": {"betas", "eps"},
                  "radam": {"betas", "eps"}}


def optimizer_state_mismatch(state: Mapping[str, Any], kind: str) -> str | None:
    """Why an optimizer state dict is not the state of a ``kind`` optimizer (one of ``OPTIMIZER_KEYS``), or
    None if it may be: its parameter groups lack the hyperparameters every such state holds."""
    groups = state.get("param_groups") or [{}]
    missing = sorted(OPTIMIZER_KEYS.get(kind, set()) - groups[0].keys())
    return f"its optimizer state is not {kind}'s (it has no {', '.join(missing)})" if missing else None


class NonFiniteLossError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped training after saving a resumable checkpoint (named in the message)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class MaximumLikelihoodEstimationEngine(Engine):
    """An ignite ``Engine`` whose step trains ``model`` by maximum likelihood.

    The step moves the batch to the device, runs the loss under autocast (``--precision``),
    accumulates gradients over ``iteration_per_update`` iterations, unscales them
    before clipping, steps the optimizer and the scheduler, and skips updates
    whose loss or gradient is not finite. Subclasses change the objective by
    overriding ``compute_loss`` (and the validation score by ``validation_score``).

    In a distributed run ``model`` is wrapped in ``DistributedDataParallel``: the
    training forward goes through the wrapper (``self.model``), so that backward
    averages the gradients over the ranks; decoding and validation use the
    module itself (``self.raw_model``).

    Args:
        model: an ``EncoderDecoder`` (or any module with the same interface), or one in
            ``DistributedDataParallel``. Its forward returns log-probs (checked on the first
            batch); a forward that returns logits must take ``normalize`` (see ``EncoderDecoder``).
        optimizer: a torch optimizer over the model's parameters.
        config: a ``Config``, or a mapping of option names to values (validated, the rest
            defaulted); read here: ``iteration_per_update``, ``max_grad_norm``,
            ``label_smoothing``, ``max_bad_steps``, ``precision``, ``max_length``.
        scheduler: stepped after each update (optional).
        device: where to train; the model must already be there.
        tgt_field: turns output ids into text for validation BLEU.
    """

    metric_names = ("loss", "ppl", "|param|", "|g_param|")
    phase = "mle"  # recorded in checkpoints; continue_train.py resumes the same phase

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config | Mapping[str, Any],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
        tgt_field: TextField | None = None,
    ):
        super().__init__(type(self).train_step)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = recorded_config(as_config(config), optimizer, scheduler, self.phase)
        self.device, self.tgt_field = torch.device(device), tgt_field
        self.precision = resolve_precision(self.config.precision, self.device)
        self.scaler = self.precision.grad_scaler()
        # the counters of non-finite updates are saved with the trainer state and resumed
        self.state_dict_user_keys.extend(SKIP_COUNTERS)
        self.state.n_bad_steps = 0  # non-finite updates in a row
        self.state.n_skipped_steps = 0  # non-finite updates in all
        self.state.last_output = {}
        self.state.grad_norm = 0.0
        self.state.param_norm = parameter_norm(self.raw_model)
        self._log_probs_checked = False

    def checkpoint_objects(self) -> dict[str, Any]:
        """What this engine's checkpoints hold, name -> object with ``state_dict``: the model (without a
        DDP wrapper), optimizer, scheduler, loss scaler and trainer state. A subclass adds its own state."""
        return {"model": self.raw_model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "trainer": self}

    @property
    def special_ids(self) -> SpecialIds:
        """The special ids of the model's vocabulary (``simple_nmt.search.special_ids``)."""
        return special_ids(self.model)

    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without its ``DistributedDataParallel`` wrapper (the model itself in a single process)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    # The objective: the one thing a subclass overrides.
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Label-smoothed cross-entropy per target token, and the numbers to log."""
        tgt = batch["tgt"]  # |tgt| = (batch_size, length + 2): BOS y EOS
        log_probs = self.model(batch["src"], batch["src_lengths"], tgt[:, :-1])
        # |log_probs| = (batch_size, length + 1, vocab_size)
        if not self._log_probs_checked:
            check_log_probs(log_probs)
            self._log_probs_checked = True
        loss, nll, n_tokens = token_losses(log_probs, tgt[:, 1:], self.config.label_smoothing, self.special_ids.pad)
        mean_nll = float(nll) / max(n_tokens, 1)
        return loss / max(n_tokens, 1), {"loss": mean_nll, "ppl": math.exp(min(mean_nll, 100.0))}

    def validation_score(self, metrics: Mapping[str, float]) -> float:
        """Higher is better: the best checkpoint and early stopping use it."""
        return -metrics["valid_loss"]

    def autocast(self) -> torch.autocast:
        """The autocast context of this engine's forward passes (a no-op under ``--precision fp32``)."""
        return self.precision.autocast()

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move every tensor of a batch to the engine's device."""
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One iteration: forward, backward, and every ``iteration_per_update`` iterations an update."""
        self.model.train()
        batch = self.to_device(batch)
        if self.state.iteration == 1:
            check_batch(batch, self.special_ids)
        iteration_per_update = self.config.iteration_per_update
        is_update = self.state.iteration % iteration_per_update == 0
        distributed = isinstance(self.model, DistributedDataParallel)
        with self._gradient_sync(is_update):
            with self.autocast():
                loss, output = self.compute_loss(batch)
            finite = bool(torch.isfinite(loss))
            if finite or distributed:
                # under DDP every rank back-propagates: a non-finite loss reaches the averaged
                # gradient, so that all ranks skip the update together
                self.scaler.scale(loss / iteration_per_update).backward()
        if is_update:
            finite = self._update() and finite
        self._count_bad_step(finite)
        if not finite:
            # a skipped update repeats the last output; before the first good one, zeros for every metric
            return self.state.last_output or {k: 0.0 for k in self.metric_names}
        output.update({"|param|": self.state.param_norm, "|g_param|": self.state.grad_norm})
        self.state.last_output = output
        return output

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the epoch, iteration and counters of skipped updates (0 in checkpoints that lack them)."""
        super().load_state_dict({**dict.fromkeys(SKIP_COUNTERS, 0), **state_dict})

    def resume(self, checkpoint: Mapping[str, Any], lr: float | None = None) -> None:
        """Restore the optimizer, scheduler, loss scaler and trainer state of a checkpoint.

        Args:
            lr: a new peak learning rate instead of the checkpoint's: the schedule goes on
                where it was, scaled to it.

        Raises:
            ValueError: optimizer state of another kind than the engine's optimizer (which would fail, or
                go wrong, at the first update), before anything is restored.
        """
        mismatch = optimizer_state_mismatch(checkpoint["optimizer"], self.config.optimizer)
        if mismatch:
            raise ValueError(f"the checkpoint cannot be resumed by this engine: {mismatch}; resume it with an "
                             "optimizer of the kind it was trained with, or train on without resuming")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] and self.scaler.is_enabled():  # fp16 only
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.load_state_dict(checkpoint["trainer"])
        if lr is not None:
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] *= lr / self.scheduler.base_lrs[i]
                group["initial_lr"] = self.scheduler.base_lrs[i] = lr
            # torch has no public setter: get_last_lr() would give the unscaled rates until the next step
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _gradient_sync(self, is_update: bool) -> AbstractContextManager:
        """Under DDP, ``no_sync`` between updates: gradients accumulate locally and are
        all-reduced once, in the backward pass of the update iteration."""
        if is_update or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()

    def _update(self) -> bool:
        """Clip and apply the accumulated gradients; returns False if they were not finite."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
            if self.scheduler is not None:
                self.scheduler.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.grad_norm = float(grad_norm) if finite else self.state.grad_norm
        self.state.param_norm = parameter_norm(self.model)
        return finite

    def _count_bad_step(self, finite: bool) -> None:
        if finite:
            self.state.n_bad_steps = 0
            return
        self.state.n_bad_steps += 1
        self.state.n_skipped_steps += 1
        limit = self.config.max_bad_steps
        if self.state.n_bad_steps >= limit:
            raise NonFiniteLossError(
                f"{self.state.n_bad_steps} updates in a row had a non-finite loss or gradient "
                f"(--max_bad_steps {limit}); lower --lr or check the data"
            )

    @torch.no_grad()
    def validate(self, loader: Iterable[Mapping[str, torch.Tensor]], references: list[str]) -> dict[str, float]:
        """Teacher-forced loss and perplexity, and corpus BLEU (sacrebleu) of greedy output.

        In a distributed run each rank validates its share of the batches and the
        results are gathered: every rank returns the same numbers, over all references.

        Args:
            loader: validation batches; each carries ``index``, the examples' positions.
            references: detokenized reference lines, in dataset order.
        """
        if self.tgt_field is None:
            raise ValueError(f"validate: {type(self).__name__} has no tgt_field to read output text with: "
                             "construct the engine with tgt_field=")
        model = self.raw_model  # no DDP: ranks may have different numbers of batches
        model.eval()
        total_nll, total_tokens = 0.0, 0
        hyps: dict[int, str] = {}
        for batch in loader:
            batch = self.to_device(batch)
            with self.autocast():
                log_probs = model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1])
                ids = output_ids(model.search(batch["src"], batch["src_lengths"],
                                              max_length=self.config.decoding_length))
            _, nll, n_tokens = token_losses(log_probs, batch["tgt"][:, 1:], 0.0, self.special_ids.pad)
            total_nll, total_tokens = total_nll + float(nll), total_tokens + n_tokens
            for i, row in zip(batch["index"].tolist(), ids.tolist()):
                hyps[i] = self.tgt_field.to_text(row)
        shares = idist.all_gather((total_nll, total_tokens, hyps))  # one per rank, in rank order
        total_nll, total_tokens = sum(s[0] for s in shares), sum(s[1] for s in shares)
        hyps = {i: text for s in shares for i, text in s[2].items()}
        loss = total_nll / max(total_tokens, 1)
        # force: pre-tokenized corpora are scored as they are, without sacrebleu's warning each epoch
        if hyps.keys() != set(range(len(references))):
            raise ValueError(f"validate: {len(references)} references for the {len(hyps)} examples whose index "
                             f"runs {min(hyps, default=0)}..{max(hyps, default=-1)}: give one reference per "
                             "validation example, in the order of their index")
        bleu = sacrebleu.corpus_bleu([hyps[i] for i in range(len(references))], [references], force=True).score
        return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 100.0)), "valid_bleu": bleu}


def recorded_config(config: Config, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, phase: str) -> Config:
    """``config`` as the engine of ``phase`` runs it, for its checkpoints: the optimizer's kind and peak
    learning rate (``lr``, or ``rl_lr`` in RL) are the optimizer's.

    Raises:
        ValueError: a config value the engine would not apply: a learning rate other than the optimizer's,
            or a warm-up or decay schedule without a scheduler.
    """
    kind = next((name for name, cls in OPTIMIZER_CLASSES.items() if type(optimizer) is cls), None)
    group = optimizer.param_groups[0]
    peak = float(group.get("initial_lr", group["lr"]))  # a scheduler's first rate is the peak it scales
    name = "rl_lr" if phase == "rl" else "lr"
    given = getattr(config, name)
    if given is not None and not math.isclose(given, peak, rel_tol=1e-6):
        raise ValueError(f"config {name}={given:g} but the optimizer's learning rate is {peak:g}: the "
                         f"optimizer's is the one used; leave {name} out or build the optimizer with it")
    schedule = {"rl_warmup_steps": config.rl_warmup_steps} if phase == "rl" else {
        "warmup_steps": config.warmup_steps, "lr_step": config.lr_step}
    unused = [f"{k}={v}" for k, v in schedule.items() if v and scheduler is None]
    if unused:
        raise ValueError(f"config {', '.join(unused)} needs a scheduler: pass scheduler=build_scheduler(optimizer, "
                         f"config, updates_per_epoch{', phase=' + repr(phase) if phase == 'rl' else ''})")
    return config.replace(**{name: peak}, **({"optimizer": kind} if kind else {}))


def token_losses(
    log_probs: torch.Tensor, target: torch.Tensor, label_smoothing: float, pad: int = LIBRARY_IDS.pad
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed label-smoothed loss, summed NLL and the number of target tokens (PAD ignored).

    Args:
        log_probs: |log_probs| = (batch_size, length, vocab_size).
        target: |target| = (batch_size, length).
        pad: the target vocabulary's PAD id.
    """
    flat_log_probs, flat_target = log_probs.flatten(0, 1).float(), target.flatten()
    # |flat_log_probs| = (batch_size * length, vocab_size)
    # torch's label smoothing written out over log-probs: F.cross_entropy would apply a second
    # log_softmax (and its backward) over the whole (tokens, vocab) tensor
    mask = flat_target != pad
    nll = -flat_log_probs.gather(1, flat_target.unsqueeze(1)).squeeze(1).masked_fill(~mask, 0.0)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing > 0:
        loss = loss - label_smoothing * flat_log_probs.mean(dim=1).masked_fill(~mask, 0.0)
    return loss.sum(), nll.detach().sum(), int(mask.sum())


def build_optimizer(
    model: torch.nn.Module, config: Config | Mapping[str, Any], lr: float | None = None
) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW / RAdam from torch, chosen by ``config.optimizer``, over the trainable parameters.

    Args:
        lr: the learning rate; by default the MLE phase's (``config.learning_rate("mle")``).
    """
    config = as_config(config)
    lr = config.learning_rate("mle") if lr is None else lr
    kwargs = {} if config.optimizer == "sgd" else {"betas": (0.9, 0.98)}
    return OPTIMIZER_CLASSES[config.optimizer]([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: Config | Mapping[str, Any], updates_per_epoch: int, phase: str = "mle"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor per update, for the ``mle`` or the ``rl`` phase.

    MLE: linear warm-up then inverse square root (``--warmup_steps``), times step decay by
    ``--lr_gamma`` every ``--lr_step`` epochs from epoch ``--lr_decay_start`` on.
    RL: its own schedule, none of the MLE options: linear warm-up over ``--rl_warmup_steps``
    updates, then constant (``--rl_lr`` from the first update when 0).
    """
    config = as_config(config)
    if phase == "rl":
        warmup = config.rl_warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: min(1.0, (n + 1) / warmup) if warmup else 1.0)
    warmup, step, gamma, start = config.warmup_steps, config.lr_step, config.lr_gamma, config.lr_decay_start

    def factor(n_updates: int) -> float:
        value = 1.0
        if warmup > 0:
            n = n_updates + 1
            value = min(n / warmup, math.sqrt(warmup / n))
        epoch = n_updates // max(updates_per_epoch, 1) + 1
        if step > 0 and epoch >= start:
            value *= gamma ** ((epoch - start) // step + 1)
        return value

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all the trainable parameters of ``model``, as one vector."""
    norms = [p.detach().float().norm() for p in model.parameters() if p.requires_grad]
    return float(torch.stack(norms).norm()) if norms else 0.0


def check_batch(batch: Mapping[str, torch.Tensor], ids: SpecialIds) -> None:
    """Raise ``ValueError`` unless the batch's targets start with the model's BOS (``collate`` with the
    model's special ids): a batch collated with another vocabulary's ids would train on the wrong tokens."""
    first = batch["tgt"][:, 0]  # |first| = (batch_size,)
    if first.numel() and not bool((first == ids.bos).all()):
        raise ValueError(f"the batch's targets start with id {int(first[0])}, not the model's BOS {ids.bos}: "
                         "collate with the model's special ids, collate(examples, special_ids(model))")


def check_log_probs(log_probs: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row of |log_probs| = (..., vocab_size) log-sum-exps to 0.

    Catches a research model whose forward returns logits without taking ``normalize``,
    which would otherwise be trained as if its logits were log-probabilities.
    """
    log_z = log_probs.detach().float().logsumexp(dim=-1)
    worst = float(log_z.abs().max()) if log_z.numel() else 0.0
    tolerance = 1e-3 if torch.finfo(log_probs.dtype).bits >= 32 else 0.1  # bfloat16 rounds to about 2e-2
    if not worst <= tolerance:
        raise ValueError(
            f"the model's forward did not return log-probabilities (a row's logsumexp is {worst:.3g}, not 0): "
            "return log_softmax(logits), or take normalize=False and return the logits only then"
        )


class RandomState:
    """torch's random number generators (CPU and CUDA) as checkpoint state, so that a run resumed
    in the middle of an epoch draws the same dropout masks and samples as one never stopped."""

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RunInfo:
    """The plain data a checkpoint carries beside the state dicts: config, phase, vocabularies, tokenizers,
    and what the model adds (``model.checkpoint_meta()``: a Hugging Face model's config and tokenizer files)."""

    def __init__(self, engine: MaximumLikelihoodEstimationEngine, src_field: TextField, tgt_field: TextField,
                 extra: Mapping[str, Any] | None = None):
        self.engine, self.src_field, self.tgt_field = engine, src_field, tgt_field
        self.extra = dict(extra or {})

    def state_dict(self) -> dict[str, Any]:
        """The engine's config as it runs (``engine.config``, with the phase), the fields, and the names of the
        parameters that do not train (frozen, or outside the optimizer): restored frozen, so that an
        optimizer over the others resumes."""
        (src_vocab, src_spm), (tgt_vocab, tgt_spm) = self.src_field.stored(), self.tgt_field.stored()
        trained = {id(p) for group in self.engine.optimizer.param_groups for p in group["params"]}
        frozen = [name for name, p in self.engine.raw_model.named_parameters()
                  if not p.requires_grad or id(p) not in trained]
        return {"config": {**self.engine.config.to_dict(), "phase": self.engine.phase}, "src_vocab": src_vocab,
                "tgt_vocab": tgt_vocab, "src_spm": src_spm, "tgt_spm": tgt_spm, "frozen": frozen, **self.extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the fields are rebuilt from the checkpoint by the CLI."""


def attach_handlers(
    engine: MaximumLikelihoodEstimationEngine,
    config: Config | Mapping[str, Any],
    *,
    on_epoch_start: Callable[[int], None],
    valid_loader: Iterable,
    valid_references: list[str],
    fields: tuple[TextField, TextField],
    model_fn: str,
    best_state: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Attach what every training run needs, for the MLE and the RL engine alike.

    Running averages of the step outputs, a progress bar (``--verbose 2``),
    validation at each epoch's end, a checkpoint per epoch (``STEM.epochN.pth``),
    the best by ``engine.validation_score`` (``STEM.pth``), early stopping
    (``--early_stop N``) and TensorBoard (``--tensorboard_dir``). In a distributed
    run every rank validates and decides alike; only rank 0 prints, writes
    checkpoints and TensorBoard.

    The checkpoints are complete, made from the engine itself: its model (without a
    DDP wrapper), optimizer, scheduler (a constant one is made for an engine without),
    loss scaler, trainer state and random state, and the config,
    phase, vocabularies and tokenizers (``RunInfo``). ``translate.py`` translates them
    and ``continue_train.py`` resumes them.

    Args:
        config: the run's options (``verbose``, ``early_stop``, ``tensorboard_dir``; all of
            them are stored in the checkpoints).
        on_epoch_start: called with the epoch number before it starts (data order, seeds).
        fields: the source and target ``TextField`` (tokenizer and vocabulary).
        model_fn: ``DIR/STEM.pth``; checkpoints go to DIR.
        best_state: the best-checkpoint handler's state from a resumed checkpoint.

    Returns:
        What the checkpoints hold, name -> object with ``state_dict`` (for
        ``run_until_done_or_interrupted``), the best-checkpoint handler as ``best_checkpointer``.
    """
    config = as_config(config)
    if engine.tgt_field is None:
        raise ValueError(f"attach_handlers: {type(engine).__name__} has no tgt_field, which validation BLEU "
                         "reads output text with: construct the engine with tgt_field=")
    n_valid = len(valid_loader.dataset) if isinstance(getattr(valid_loader, "dataset", None), Sized) else None
    if n_valid is not None and n_valid != len(valid_references):
        raise ValueError(f"attach_handlers: valid_references has {len(valid_references)} lines for "
                         f"{n_valid} validation examples; give one reference line per example, in order")
    if engine.scheduler is None:  # a constant rate, so that the checkpoints resume like the CLI's
        engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda _: 1.0)
    hf = isinstance(engine.raw_model, HuggingFaceModel)
    to_save = {**engine.checkpoint_objects(), "rng": RandomState(),
               "meta": RunInfo(engine, *fields, extra=engine.raw_model.checkpoint_meta() if hf else None)}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: on_epoch_start(e.state.epoch))
    for name in engine.metric_names:
        RunningAverage(output_transform=lambda out, name=name: out[name], alpha=0.98).attach(engine, name)
    verbose = config.verbose if is_main_process() else 0
    if verbose >= 2 and sys.stderr.isatty():
        ProgressBar(bar_format=None, file=sys.stderr).attach(engine, metric_names=list(engine.metric_names))
    elif verbose >= 2:  # a log file (nohup, a pipe): a plain line at a steady interval, not tqdm's updates
        _attach_progress_lines(engine, log)

    @engine.on(Events.EPOCH_COMPLETED)
    def run_validation(engine: MaximumLikelihoodEstimationEngine) -> None:
        results = engine.validate(valid_loader, valid_references)
        engine.state.metrics.update(results)
        if verbose >= 1:
            shown = {k: engine.state.metrics[k] for k in (*engine.metric_names, *results)}
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            skipped = f" skipped_steps={engine.state.n_skipped_steps}" if engine.state.n_skipped_steps else ""
            log(f"epoch {engine.state.epoch}: {text}{skipped}")

    path = Path(model_fn)
    stem = path.name[: -len(".pth")] if path.name.endswith(".pth") else path.name
    saver = AtomicSaver(path.parent)

    def score(e: MaximumLikelihoodEstimationEngine) -> float:
        return e.validation_score(e.state.metrics)

    best = Checkpoint(dict(to_save), saver, filename_prefix=stem, score_function=score, n_saved=1,
                      filename_pattern="{filename_prefix}.pth")
    if best_state and best_state.get("_saved"):
        # keep the resumed run's best score, under this run's file name
        best.load_state_dict({"_saved": [(best_state["_saved"][-1][0], f"{stem}.pth")]})
    to_save["best_checkpointer"] = best
    every_epoch = Checkpoint(dict(to_save), saver, filename_prefix=stem, n_saved=None,
                             filename_pattern="{filename_prefix}.epoch{global_step}.pth",
                             global_step_transform=lambda e, _: e.state.epoch)
    engine.add_event_handler(Events.EPOCH_COMPLETED, best)
    if hf and is_main_process():
        _attach_save_pretrained(engine, best, path.with_name(f"{stem}.hf"), log)
    engine.add_event_handler(Events.EPOCH_COMPLETED, every_epoch)
    if config.early_stop > 0:
        engine.add_event_handler(Events.EPOCH_COMPLETED, EarlyStopping(config.early_stop, score, engine))
    if config.tensorboard_dir and is_main_process():
        _attach_tensorboard(engine, config.tensorboard_dir)
    return to_save


def run_until_done_or_interrupted(
    engine: MaximumLikelihoodEstimationEngine,
    data: Iterable,
    max_epochs: int,
    to_save: Mapping[str, Any],
    path: str | Path,
) -> None:
    """``engine.run``; on Ctrl-C (SIGINT) or SIGTERM stop at the next point where the saved state is
    whole, save ``to_save`` to ``path`` (atomically, on rank 0) and raise ``TrainingInterrupted``.

    Those points: after an iteration that is not an epoch's last, and after an epoch's end
    work (validation, the best and the epoch checkpoints). A signal during an epoch's last
    iteration or its validation therefore lets that epoch finish first, so that every
    epoch's end work runs exactly once, interrupted or not. Under torchrun the ranks stop
    together, at the first such point after any of them got the signal.
    """
    interrupted: list[int] = []
    distributed = idist.get_world_size() > 1

    def on_signal(signum: int, frame: Any) -> None:
        interrupted.append(signum)

    def stop_if_interrupted(engine: Engine) -> None:
        stop = bool(interrupted)
        if distributed:  # the ranks must stop after the same iteration
            stop = idist.all_reduce(int(stop), op="MAX") > 0
        if stop:
            if not interrupted:  # another rank got the signal
                interrupted.append(signal.SIGINT)
            engine.interrupt()

    def after_iteration(engine: Engine) -> None:
        if engine.state.iteration % engine.state.epoch_length:  # an epoch's last one waits for its end work
            stop_if_interrupted(engine)

    handlers = [(Events.ITERATION_COMPLETED, after_iteration), (Events.EPOCH_COMPLETED, stop_if_interrupted)]
    for event, handler in handlers:  # added last: they run after the epoch's checkpoints
        engine.add_event_handler(event, handler)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.run(data, max_epochs=max_epochs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for event, handler in handlers:
            engine.remove_event_handler(handler, event)
    if interrupted:
        if is_main_process():
            save_checkpoint({name: obj.state_dict() for name, obj in to_save.items()}, path)
        raise TrainingInterrupted(
            f"interrupted ({signal.Signals(interrupted[0]).name}) at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration}; resumable checkpoint saved to {path} "
            f"(resume with continue_train.py --load_fn {path})", signum=interrupted[0])


def _attach_save_pretrained(engine: Engine, best: Checkpoint, folder: Path, log: Callable[[str], None]) -> None:
    """After each epoch whose weights became the best checkpoint, also write them with the model's
    ``save_pretrained`` (a Hugging Face model's: ``transformers`` loads the folder back)."""
    def best_score() -> float | None:
        saved = best.state_dict()["_saved"]  # [(score, file name)], the best last
        return saved[-1][0] if saved else None

    written = [best_score()]

    def write(engine: Engine) -> None:
        score = best_score()
        if score is not None and score != written[0]:
            engine.raw_model.save_pretrained(folder)
            written[0] = score
            log(f"{folder}: the best weights, with save_pretrained")

    engine.add_event_handler(Events.EPOCH_COMPLETED, write)


PROGRESS_INTERVAL_S = 60.0  # seconds between two progress lines when stderr is not a terminal


def _attach_progress_lines(engine: MaximumLikelihoodEstimationEngine, log: Callable[[str], None]) -> None:
    """Every ``PROGRESS_INTERVAL_S`` seconds, a line with the epoch, the iteration and the running averages."""
    last = [time.monotonic()]

    def write(engine: MaximumLikelihoodEstimationEngine) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL_S:
            last[0] = now
            done = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            shown = " ".join(f"{k}={engine.state.metrics[k]:.4g}" for k in engine.metric_names
                             if k in engine.state.metrics)
            log(f"epoch {engine.state.epoch} [{done}/{engine.state.epoch_length}]: {shown}")

    engine.add_event_handler(Events.ITERATION_COMPLETED, write)


def _attach_tensorboard(engine: MaximumLikelihoodEstimationEngine, log_dir: str) -> None:
    from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger

    logger = TensorboardLogger(log_dir=log_dir)
    logger.attach(engine, OutputHandler(tag="train", metric_names=list(engine.metric_names)),
                  event_name=Events.ITERATION_COMPLETED(every=10))
    logger.attach(engine, OutputHandler(tag="valid", metric_names=["valid_loss", "valid_ppl", "valid_bleu"]),
                  event_name=Events.EPOCH_COMPLETED)
    engine.add_event_handler(Events.COMPLETED, lambda _: logger.close())
