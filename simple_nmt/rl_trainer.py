"""Reinforcement-learning fine-tuning: the MLE engine with a sampled-reward loss."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

from simple_nmt.config import Config
from simple_nmt.data import LIBRARY_IDS, SpecialIds, TextField, pad_batch
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.precision import compute_dtype
from simple_nmt.rewards import (
    Reward,
    after_eos,
    as_reward,
    checked_scores,
    reward_inputs,
    reward_label,
    reward_name,
    strip_eos,
)
from simple_nmt.search import exp, logsumexp, output_ids, select_state, special_ids
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine, check_log_probs


def target_ids(batch: Mapping[str, torch.Tensor], specials: SpecialIds = LIBRARY_IDS) -> torch.Tensor:
    """The references of a batch as a reward reads them: ``batch["tgt"]`` (BOS y EOS) without BOS, EOS and
    what follows: |refs| = (batch_size, length + 1)."""
    return strip_eos(batch["tgt"][:, 1:], specials)


class _SelectedLogProbs(torch.autograd.Function):
    """log_softmax(logits).gather(ids) with one (n, t, V) tensor saved and one for the gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # |logits| = (n, t, vocab_size), |ids| = (n, t); half-precision logits are summed in float32
        log_z = logsumexp(logits.to(wide(logits.dtype)))  # |log_z| = (n, t)
        ctx.save_for_backward(logits, ids, log_z)
        return logits.gather(2, ids[:, :, None]).squeeze(2).to(log_z.dtype) - log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, ids, log_z = ctx.saved_tensors
        return _log_prob_grad(logits, log_z, ids, grad).to(logits.dtype), None


def _log_prob_grad(logits: torch.Tensor, log_z: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``grad * log_softmax(logits)[ids]`` over the logits (``log_z``: their logsumexp).

    |logits| = (..., vocab_size); |log_z|, |ids|, |grad| = (...). d log p(y) / d logits = onehot(y) - softmax(logits).
    """
    grad_logits = exp(logits - log_z[..., None], in_place=True).mul_(-grad[..., None])
    return grad_logits.scatter_add_(-1, ids[..., None], grad[..., None])


def selected_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logits.log_softmax(-1).gather(2, ids[..., None]).squeeze(2)``, lighter on memory.

    Autograd through log_softmax and gather holds three (n, t, V) tensors at the
    peak of the backward pass (the log-probs, gather's gradient, log_softmax's
    gradient); this holds two (the logits and their gradient).

    Args:
        logits: |logits| = (n, t, vocab_size).
        ids: |ids| = (n, t).

    Returns:
        |log_probs| = (n, t).
    """
    return _SelectedLogProbs.apply(logits, ids)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The type sums over the vocabulary run in: float32, or ``dtype`` where it is wider."""
    return torch.promote_types(dtype, torch.float32)


class _ProjectedLogProbs(torch.autograd.Function):
    """log_softmax(features @ weight.T + bias).gather(ids), the logits made ``chunk`` positions at a time.

    Only the features and one float per position are saved; backward makes each chunk's logits
    again, so no (n, t, V) tensor is ever held: one more output-layer product for (n, t, V) memory.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                ids: torch.Tensor, chunk: int) -> torch.Tensor:
        # |features| = (n, t, hidden_size), |weight| = (vocab_size, hidden_size), |ids| = (n, t)
        dtype = compute_dtype(features.device.type, features.dtype)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        flat, flat_ids = features.reshape(-1, features.size(-1)), ids.reshape(-1)
        log_z, chosen = [], []
        for start in range(0, flat.size(0), chunk):
            logits = _project(flat[start:start + chunk], w, b)  # |logits| = (chunk, vocab_size), float32
            log_z.append(logsumexp(logits))
            chosen.append(logits.gather(1, flat_ids[start:start + chunk, None]).squeeze(1))
        log_z_flat = torch.cat(log_z) if log_z else flat.new_zeros(0, dtype=wide(dtype))  # |log_z_flat| = (n * t,)
        ctx.save_for_backward(features, weight, bias, ids, log_z_flat)
        ctx.chunk, ctx.dtype = chunk, dtype
        chosen_flat = torch.cat(chosen) if chosen else log_z_flat
        return (chosen_flat - log_z_flat).view(ids.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        features, weight, bias, ids, log_z = ctx.saved_tensors
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        flat, flat_ids, flat_grad = features.reshape(-1, features.size(-1)), ids.reshape(-1), grad.reshape(-1)
        grad_features = torch.empty_like(flat)
        grad_weight = torch.zeros_like(weight, dtype=log_z.dtype)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=log_z.dtype)
        for start in range(0, flat.size(0), ctx.chunk):
            part = slice(start, start + ctx.chunk)
            f = flat[part].to(ctx.dtype)
            # |grad_logits| = (chunk, vocab_size)
            grad_logits = _log_prob_grad(_project(f, w, b), log_z[part], flat_ids[part], flat_grad[part])
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = grad_logits.to(ctx.dtype)
            grad_features[part] = grad_logits @ w
            grad_weight += grad_logits.t() @ f
        return (grad_features.view(features.shape), grad_weight.to(weight.dtype),
                None if bias is None else grad_bias.to(bias.dtype), None, None)


def _project(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in ``weight``'s type (autocast off); the logits in float32 or wider."""
    with torch.autocast(features.device.type, enabled=False):
        logits = torch.nn.functional.linear(features.to(weight.dtype), weight, bias)
        return logits.to(wide(weight.dtype))


def projected_log_probs(features: torch.Tensor, layer: torch.nn.Linear, ids: torch.Tensor,
                        chunk_elements: int = 2**20) -> torch.Tensor:
    """``selected_log_probs(layer(features), ids)`` without ever holding the (n, t, V) logits.

    The output layer runs on chunks of positions (``chunk_elements`` logits each, 4 MiB in
    float32), and backward runs it again on each chunk instead of keeping the logits and their
    gradient: one more output-layer product for (n, t, vocab_size) memory. Under autocast the
    products run in the autocast type, the log-softmax in float32, as ``layer(features).float()``.

    Args:
        features: |features| = (n, t, hidden_size), the input of ``layer``.
        layer: the output layer, (hidden_size -> vocab_size).
        ids: |ids| = (n, t).

    Returns:
        |log_probs| = (n, t).
    """
    chunk = max(1, chunk_elements // layer.out_features)
    return _ProjectedLogProbs.apply(features, layer.weight, layer.bias, ids, chunk)


def projects_features(model: torch.nn.Module) -> bool:
    """Whether ``model.decode`` is ``generator(decode_features(...))``, the base class's: its logits
    can then be made by ``projected_log_probs`` from the features."""
    return (type(model).decode is EncoderDecoder.decode and "decode" not in vars(model)
            and type(model).decode_features is not EncoderDecoder.decode_features
            and isinstance(getattr(model, "generator", None), torch.nn.Linear))


def returns_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes ``normalize`` (``normalize=False``: logits, not log-probs).

    Looks through DistributedDataParallel and ``torch.compile`` wrappers.
    """
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return "normalize" in inspect.signature(model.forward).parameters


def encodes_once(model: torch.nn.Module) -> bool:
    """Whether calling ``model`` is ``decode`` on ``encode``'s state, so that a source can be encoded once.

    True for an ``EncoderDecoder`` whose forward is the base class's (both built-in
    models). False for a model with a forward of its own or forward hooks, and for
    one compiled or in DistributedDataParallel: their call must run (the hooks, the
    compiled code, the averaging of the gradients over the ranks).
    """
    return (type(model).forward is EncoderDecoder.forward and "forward" not in vars(model)
            and not model._forward_hooks and not model._forward_pre_hooks
            and getattr(model, "_compiled_call_impl", None) is None)


def sequence_log_probs(
    model: torch.nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, ids: torch.Tensor,
    bucket_ratio: float = 1.5, check_normalized: bool = False,
) -> torch.Tensor:
    """log P(ids | src) by teacher forcing, summed up to and including EOS.

    ``ids`` may hold n outputs per source, in the layout of ``search(..., n_samples=n)``.
    A model whose forward is ``EncoderDecoder``'s (``encodes_once``) runs its encoder
    once per source and decodes the outputs from that state; any other model is
    called with each output's source repeated. Rows are grouped by length, each
    group within a factor ``bucket_ratio``, and each group stops at its longest row:
    a few samples that never end then cost their own length, not the whole
    batch's. ``bucket_ratio=math.inf`` makes it one pass over the padded batch.
    The result equals one forward over the repeated sources; in train mode each
    group draws its own dropout masks (and with ``encodes_once`` the outputs of a
    source share the encoder's). The chosen tokens' log-probs come from
    ``selected_log_probs`` on logits where the model gives them (``decode``, or a
    forward that takes ``normalize``); any other model's log-probs are gathered.

    Args:
        src: |src| = (batch_size, src_length).
        src_lengths: |src_lengths| = (batch_size,).
        ids: |ids| = (batch_size * n, length), the outputs of source i in rows i*n .. i*n + n - 1;
            whatever follows the first EOS is ignored.
        bucket_ratio: > 1.
        check_normalized: check that a forward without ``normalize`` returns log-probs
            (``check_log_probs``).

    Returns:
        |log_p| = (batch_size * n,), with a gradient.
    """
    if not bucket_ratio > 1:
        raise ValueError(f"bucket_ratio must be > 1, got {bucket_ratio}")
    if ids.size(0) % src.size(0):
        raise ValueError(f"{ids.size(0)} outputs for {src.size(0)} sources: expected the same number for each")
    source = torch.arange(ids.size(0), device=ids.device) // (ids.size(0) // src.size(0))  # |source| = (len(ids),)
    specials = special_ids(model)
    state = model.encode(src, src_lengths) if encodes_once(model) else None
    logits = state is None and returns_logits(model)  # the fallback's forward gives logits
    projects = state is not None and projects_features(model)
    # |scored| = (len(ids), length): the tokens up to and including EOS
    scored = ~after_eos(ids, specials.eos) & (ids != specials.pad)
    lengths = scored.sum(dim=1).clamp(min=1)  # |lengths| = (len(ids),)
    buckets = (lengths.float().log() / math.log(bucket_ratio)).floor().long()
    tgt_in = torch.cat([torch.full_like(ids[:, :1], specials.bos), ids[:, :-1]], dim=1)
    rows, log_p = [], []
    for bucket in buckets.unique().tolist():
        index = (buckets == bucket).nonzero().squeeze(1)
        t, of = int(lengths[index].max()), source[index]
        chosen = ids[index, :t]
        if projects:
            features = model.decode_features(tgt_in[index, :t], select_state(state, of))  # (len(index), t, hidden)
            token_log_probs = projected_log_probs(features, model.generator, chosen)
        elif state is not None:
            token_log_probs = selected_log_probs(model.decode(tgt_in[index, :t], select_state(state, of)), chosen)
        else:
            s = int(src_lengths[of].max())
            args = (src[of, :s], src_lengths[of], tgt_in[index, :t])
            if logits:
                token_log_probs = selected_log_probs(model(*args, normalize=False), chosen)  # (len(index), t)
            else:
                full = model(*args)  # |full| = (len(index), t, vocab_size), log-probs
                if check_normalized:
                    check_log_probs(full)
                token_log_probs = full.gather(2, chosen[:, :, None]).squeeze(2)
        log_p.append(token_log_probs.masked_fill(~scored[index, :t], 0.0).sum(dim=1))
        rows.append(index)
    return torch.cat(log_p)[torch.cat(rows).argsort()]


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no graph for the enclosed code, the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def per_source_concat(a: torch.Tensor, n_a: int, b: torch.Tensor, n_b: int, pad: int = LIBRARY_IDS.pad
                      ) -> torch.Tensor:
    """Rows of ``a`` (n_a per source) and of ``b`` (n_b per source) as n_a + n_b rows per source, padded with ``pad``.

    |a| = (batch_size * n_a, length_a), |b| = (batch_size * n_b, length_b)
    -> (batch_size * (n_a + n_b), max(length_a, length_b)).
    """
    length = max(a.size(1), b.size(1))
    a, b = (torch.nn.functional.pad(x, (0, length - x.size(1)), value=pad) for x in (a, b))
    return torch.cat([a.view(-1, n_a, length), b.view(-1, n_b, length)], dim=1).view(-1, length)


def per_source_normalized(values: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """|values| = (batch_size, m) divided by the standard deviation of each source's |rewards| =
    (batch_size, n); 0 for a source whose rewards are all equal (its candidates tell nothing apart)."""
    std = rewards.std(dim=1, keepdim=True, correction=0)  # |std| = (batch_size, 1)
    return torch.where(std > 0, values / std.clamp(min=torch.finfo(std.dtype).tiny), torch.zeros_like(values))


def baseline_and_actors(rewards: torch.Tensor, kind: str, greedy_rewards: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples get a gradient, and the baseline each is compared with.

    Args:
        rewards: |rewards| = (batch_size, K + 1); column 0 is the actor of ``mean``.
        kind: ``mean`` (actor 0, baseline the mean of the K others), ``loo`` (every
            sample an actor, baseline the mean of the K others), ``greedy`` (every
            sample an actor, baseline the greedy output's reward), ``none``.
        greedy_rewards: |greedy_rewards| = (batch_size,), for ``greedy``.

    Returns:
        A boolean actor mask (K + 1,) and the baselines (batch_size, K + 1).
    """
    n = rewards.size(1)
    all_actors = torch.ones(n, dtype=torch.bool, device=rewards.device)
    if kind == "mean":
        actors = torch.zeros_like(all_actors)
        actors[0] = True
        return actors, rewards[:, 1:].mean(dim=1, keepdim=True).expand(-1, n)
    if kind == "loo":
        return all_actors, (rewards.sum(dim=1, keepdim=True) - rewards) / (n - 1)
    if kind == "greedy":
        return all_actors, greedy_rewards[:, None].expand(-1, n)
    if kind == "none":
        return all_actors, torch.zeros_like(rewards)
    raise ValueError(f"unknown baseline {kind!r}; known: mean, loo, greedy, none")


@dataclass
class Rollout:
    """A batch's candidates and their scores, made without a graph by ``MinimumRiskTrainingEngine.rollout``:
    what its ``loss`` needs. Source i's n candidates are rows i*n .. i*n + n - 1 of ``candidates`` and
    row i of the (batch_size, n) tensors."""

    candidates: torch.Tensor  # |candidates| = (batch_size * n, length): EOS-ended unless cut, then PAD
    rewards: torch.Tensor  # |rewards| = (batch_size, n): the reward of each candidate
    scores: torch.Tensor  # |scores| = (batch_size, n): the rewards, shaped by the length term and KL penalty if on
    actors: torch.Tensor  # |actors| = (n,): bool, the candidates that get a gradient
    baselines: torch.Tensor  # |baselines| = (batch_size, n): what each candidate's score is compared with
    log_ratio: torch.Tensor | None = None  # |log_ratio| = (batch_size, n): log P - log P_start (KL penalty)
    greedy_scores: torch.Tensor | None = None  # |greedy_scores| = (batch_size,): the greedy baseline's scores


class MinimumRiskTrainingEngine(MaximumLikelihoodEstimationEngine):
    """Fine-tunes a trained model with REINFORCE or minimum risk training.

    A step is two extension points, each overridable alone: ``rollout`` (run without a
    graph: K + 1 samples of every source from ONE batched ``model.search``, the rewards
    of all of them at once, KL shaping, baselines) and ``loss`` (log P of the samples
    that get a gradient by teacher forcing, one pass per group of similar lengths, with
    the encoder run once per source where the model allows it, ``sequence_log_probs``;
    the REINFORCE or MRT objective and the MLE mix). Only the loss and the validation
    score differ from the MLE engine: accumulation, clipping, AMP, the non-finite guard,
    handlers and checkpoints are the same.

    In a distributed run every rank samples and scores its own sources (the
    baseline needs no communication); ``search`` runs on the module itself and
    the re-scoring forward through the ``DistributedDataParallel`` wrapper, so
    that the gradients are averaged over the ranks.

    Args:
        model: any module with ``forward(src, src_lengths, tgt_in[, normalize])`` (see
            ``sequence_log_probs``) and
            ``search(src, src_lengths, is_greedy, max_length, temperature, top_k, top_p[, n_samples])``,
            or one in ``DistributedDataParallel``.
        optimizer, config, scheduler, device, tgt_field: as for the MLE engine; ``config``
            also gives the ``rl_*`` options.
        reward: a callable ``(hyps, refs) -> (rows,)`` on PAD-padded id tensors (hypotheses without
            EOS), which may also take the keyword inputs of ``simple_nmt.rewards.REWARD_INPUTS``; or a
            name, of ``simple_nmt.rewards.REWARDS`` or ``"module:function"`` (default ``config.rl_reward``).
            See the ``reward`` property.
        src_lines, tgt_lines: the raw lines of the training files, indexed by ``batch["index"]``: the
            ``src_text`` and ``ref_text`` of a reward that takes them (the library's text rewards do).
    """

    metric_names = ("loss", "reward", "baseline", "advantage", "adv_std", "len_ratio", "no_eos", "|param|",
                    "|g_param|")
    phase = "rl"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Config | Mapping[str, Any],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
        tgt_field: TextField | None = None,
        reward: str | Reward | None = None,
        src_lines: Sequence[str] | None = None,
        tgt_lines: Sequence[str] | None = None,
    ):
        super().__init__(model, optimizer, config, scheduler, device, tgt_field)
        if src_lines is not None and tgt_lines is not None and len(src_lines) != len(tgt_lines):
            raise ValueError(f"{len(src_lines)} src_lines but {len(tgt_lines)} tgt_lines: they are the lines of "
                             "parallel files")
        self.src_lines, self.tgt_lines = src_lines, tgt_lines
        if reward is None and self.config.rl_reward is None:
            raise ValueError("no reward: config.rl_reward is None (the run's reward was given in Python, without "
                             "an importable name); pass reward=")
        self.reward = reward if reward is not None else self.config.rl_reward
        self._search_repeats_state = "n_samples" in inspect.signature(self.raw_model.search).parameters
        # DistributedDataParallel syncs buffers at every forward: the ranks must then run the
        # same number of forwards, so a model with buffers is re-scored in one forward
        has_buffers = any(True for _ in self.raw_model.buffers())
        self._bucket_ratio = math.inf if isinstance(self.model, DistributedDataParallel) and has_buffers else 1.5
        # the frozen start model of the KL penalty (saved in checkpoints, so that a resumed run keeps it)
        self.reference = None
        if self.config.rl_kl_weight > 0:
            self.reference = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
            self.metric_names = (*type(self).metric_names, "kl")
        if self.config.rl_n_best and not hasattr(self.raw_model, "batch_beam_search"):
            raise ValueError("--rl_n_best needs a model with batch_beam_search (EncoderDecoder's)")

    @property
    def reward(self) -> Reward:
        """The reward, a callable ``(hyps, refs[, inputs]) -> (rows,)``.

        Set it to a callable or a name (``get_reward``). Which keyword inputs of ``REWARD_INPUTS``
        it gets is decided then, from its signature (``reward_inputs``); one that needs ``src_text``
        without ``src_lines``, ``ref_text`` without ``tgt_lines`` or ``hyp_text`` without
        ``tgt_field`` is refused. ``config.rl_reward`` becomes its name (``reward_name``, None for a
        callable without an importable one), which checkpoints store, so that a resumed run rebuilds it.
        Its output is checked at every call (shape, real values) and on its first batch for
        non-finite scores (``checked_scores``).
        """
        return self._reward

    @reward.setter
    def reward(self, reward: str | Reward) -> None:
        fn = as_reward(reward, n_gram=self.config.rl_n_gram, pad_id=self.special_ids.pad)
        label = reward_label(reward)
        needs = {"src_text": ("src_lines", self.src_lines, "the raw source lines of the training file"),
                 "ref_text": ("tgt_lines", self.tgt_lines, "the raw target lines of the training file"),
                 "hyp_text": ("tgt_field", self.tgt_field, "the target TextField, which turns ids into text")}
        unavailable = {name: f"pass {arg}= to the engine ({what})" for name, (arg, value, what) in needs.items()
                       if value is None}
        self._reward_inputs = reward_inputs(fn, unavailable, label)
        self._reward, self._reward_label, self._reward_checked = fn, label, False
        self.config = self.config.replace(rl_reward=reward_name(reward))

    def resume(self, checkpoint: Mapping[str, Any], lr: float | None = None) -> None:
        """As the MLE engine's, and the KL penalty's start model where the checkpoint holds one (else the
        start model is the checkpoint's model)."""
        super().resume(checkpoint, lr)
        if self.reference is not None and "reference" in checkpoint:
            self.reference.load_state_dict(checkpoint["reference"])

    def checkpoint_objects(self) -> dict[str, Any]:
        """As the MLE engine's, and with the KL penalty its frozen start model as ``reference``, so that a
        resumed run keeps it."""
        objects = super().checkpoint_objects()
        if self.reference is not None:
            objects["reference"] = self.reference
        return objects

    def sample(self, src: torch.Tensor, src_lengths: torch.Tensor, n: int, is_greedy: bool = False,
               with_log_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` outputs per source from one batched search, without a graph.

        The search runs in eval mode (no dropout): the samples come from the model
        that translates at test time; the re-scoring forward runs in train mode.

        Returns:
            |ids| = (batch_size * n, length), the n outputs of source i in rows i*n .. i*n + n - 1;
            with ``with_log_probs`` also the search's log-probs of their tokens, of the same shape.
        """
        c = self.config
        kwargs = {"is_greedy": is_greedy, "max_length": c.decoding_length, "temperature": c.rl_temperature,
                  "top_k": c.rl_top_k, "top_p": c.rl_top_p}
        if c.rl_epsilon > 0:  # a research model's search need not take epsilon unless it is used
            kwargs["epsilon"] = c.rl_epsilon
        model = self.raw_model
        with evaluating(model):
            if self._search_repeats_state:
                out = model.search(src, src_lengths, n_samples=n, **kwargs)
            else:  # a research model without n_samples: repeat the sources instead
                out = model.search(src.repeat_interleave(n, 0), src_lengths.repeat_interleave(n, 0), **kwargs)
        if not with_log_probs:
            return output_ids(out)
        if not isinstance(out, tuple):
            raise ValueError("--rl_kl_weight needs the log-probs of the samples: the model's search returns ids "
                             "only; return (ids, log_probs) as EncoderDecoder.search does")
        return out[0], out[1]

    def _sampled(self, src: torch.Tensor, src_lengths: torch.Tensor, n: int, is_greedy: bool,
                 with_log_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sample``'s ids and, with ``with_log_probs``, their log P (|log_p| = (batch_size * n,)), else None."""
        if not with_log_probs:
            return self.sample(src, src_lengths, n, is_greedy=is_greedy), None
        ids, token_log_probs = self.sample(src, src_lengths, n, is_greedy=is_greedy, with_log_probs=True)
        return ids, token_log_probs.float().sum(dim=1)

    def n_best(self, src: torch.Tensor, src_lengths: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` hypotheses of a beam search of size ``n`` per source (eval mode, no graph), best first
        by log-probability, laid out as ``sample``'s: |ids| = (batch_size * n, length), EOS ended unless
        cut, then PAD; and their log-probabilities, |log_p| = (batch_size * n,)."""
        with evaluating(self.raw_model):
            hyps, log_p = self.raw_model.batch_beam_search(src, src_lengths, beam_size=n,
                                                           max_length=self.config.decoding_length,
                                                           length_penalty=0.0, n_best=n)
        ids = pad_batch([h for per_source in hyps for h in per_source], self.special_ids.pad)
        return ids.to(src.device), log_p.reshape(-1).float()

    def candidates(self, src: torch.Tensor, src_lengths: torch.Tensor, n: int, with_log_probs: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each source's candidates: ``n`` samples, then (``rl_n_best``) its n-best list, or the n-best
        list alone (``rl_n_best_only``).

        Returns |ids| = (batch_size * m, length), the m candidates of source i in rows i*m .. i*m + m - 1,
        and with ``with_log_probs`` their log P from the searches, |log_p| = (batch_size * m,), else None.
        """
        c = self.config
        if not c.rl_n_best:
            return self._sampled(src, src_lengths, n, False, with_log_probs)
        beams, beam_log_p = self.n_best(src, src_lengths, c.rl_n_best)
        if c.rl_n_best_only:
            return beams, beam_log_p if with_log_probs else None
        ids, log_p = self._sampled(src, src_lengths, n, False, with_log_probs)
        ids = per_source_concat(ids, n, beams, c.rl_n_best, self.special_ids.pad)
        if with_log_probs:
            log_p = torch.cat([log_p.view(src.size(0), n), beam_log_p.view(src.size(0), -1)], dim=1).view(-1)
        return ids, log_p

    def log_ratio(self, src: torch.Tensor, src_lengths: torch.Tensor, ids: torch.Tensor,
                  log_p: torch.Tensor) -> torch.Tensor:
        """log P(ids) - log P_start(ids), without a graph: the first given (from the search, |log_p| =
        (len(ids),)), the second from one teacher-forced pass of the start model."""
        with torch.no_grad():
            start_log_p = sequence_log_probs(self.reference, src, src_lengths, ids)
        return log_p - start_log_p  # |log_ratio| = (len(ids),)

    def reward_kwargs(self, batch: Mapping[str, torch.Tensor], hyps: torch.Tensor) -> dict[str, Any]:
        """The keyword inputs the reward takes, one entry per row of |hyps| = (batch_size * n, length),
        the n rows of source i at i*n .. i*n + n - 1: ``src`` (|src| = (batch_size * n, src_length)),
        ``index`` (|index| = (batch_size * n,), the line numbers of ``batch["index"]``), ``src_text`` and
        ``ref_text`` (the raw lines at those numbers), ``hyp_text`` (``hyps`` turned into text)."""
        wanted, n = self._reward_inputs, hyps.size(0) // batch["src"].size(0)
        inputs: dict[str, Any] = {}
        if "src" in wanted:
            inputs["src"] = batch["src"].repeat_interleave(n, dim=0)
        if wanted & {"index", "src_text", "ref_text"}:
            if "index" not in batch:
                raise ValueError(f"reward {self._reward_label} takes the examples' line numbers (index, src_text "
                                 "or ref_text) but the batch has no 'index' (simple_nmt.data.collate makes it)")
            index = batch["index"].repeat_interleave(n, dim=0)  # |index| = (batch_size * n,)
            lines = index.tolist()
            if "index" in wanted:
                inputs["index"] = index
            for name, texts in (("src_text", self.src_lines), ("ref_text", self.tgt_lines)):
                if name in wanted:
                    inputs[name] = [texts[i] for i in lines]
        if "hyp_text" in wanted:
            inputs["hyp_text"] = [self.tgt_field.to_text(h) for h in hyps.tolist()]
        return inputs

    def lengths(self, batch: Mapping[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token counts of outputs and of their sources' references, EOS and PAD not counted.

        Args:
            ids: |ids| = (batch_size * n, length), the n outputs of source i in rows i*n .. i*n + n - 1.

        Returns:
            |hyp_lengths| = |ref_lengths| = (batch_size * n,).
        """
        pad, n = self.special_ids.pad, ids.size(0) // batch["src"].size(0)
        hyp_lengths = (strip_eos(ids, self.special_ids) != pad).sum(dim=1)
        ref_lengths = (target_ids(batch, self.special_ids) != pad).sum(dim=1).repeat_interleave(n)
        return hyp_lengths, ref_lengths

    def score(self, batch: Mapping[str, torch.Tensor], ids: torch.Tensor, log_p: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rewards of outputs against their sources' references, shaped by the length term and the KL
        penalty.

        Args:
            ids: |ids| = (batch_size * n, length), the n outputs of source i in rows i*n .. i*n + n - 1,
                EOS-ended (or cut), then PAD.
            log_p: |log_p| = (batch_size * n,), their log P from the search, for the KL penalty (None: off).

        Returns:
            The rewards and the scores, |rewards| = |scores| = (batch_size, n): the scores are the rewards
            minus ``rl_length_weight`` times 100 |log(hypothesis length / reference length)| and minus
            ``rl_kl_weight`` times the log-ratio to the start model (the same tensor with neither); and
            that log-ratio, (batch_size, n), or None.
        """
        batch_size = batch["src"].size(0)
        hyps = strip_eos(ids, self.special_ids)  # |hyps| = (batch_size * n, length)
        refs = target_ids(batch, self.special_ids).repeat_interleave(hyps.size(0) // batch_size, dim=0)
        out = self.reward(hyps, refs, **self.reward_kwargs(batch, hyps))
        rewards = checked_scores(out, hyps.size(0), self._reward_label, check_finite=not self._reward_checked)
        self._reward_checked = True
        rewards = rewards.view(batch_size, -1)
        scores = rewards
        if self.config.rl_length_weight > 0:
            hyp_lengths, ref_lengths = self.lengths(batch, ids)
            # an empty side counts as one token, so that the term stays finite
            ratio = hyp_lengths.clamp(min=1) / ref_lengths.clamp(min=1)  # |ratio| = (batch_size * n,)
            length_term = 100.0 * ratio.log().abs().view(batch_size, -1).to(rewards.dtype)
            scores = scores - self.config.rl_length_weight * length_term
        if log_p is None:
            return rewards, scores, None
        log_ratio = self.log_ratio(batch["src"], batch["src_lengths"], ids, log_p).view(batch_size, -1)
        return rewards, scores - self.config.rl_kl_weight * log_ratio, log_ratio

    def rollout(self, batch: Mapping[str, torch.Tensor]) -> Rollout:
        """The candidates of every source and what the loss needs of them, without a graph (``compute_loss``
        runs it under ``torch.no_grad()``): an extension point, overridable alone.

        The candidates are K + 1 samples per source (``rl_n_samples``) and/or the n-best list of a beam
        search (``rl_n_best``, ``rl_n_best_only``); their rewards, shaped by the length term
        (``rl_length_weight``) and the log-ratio to the frozen start model (``rl_kl_weight``); the greedy
        output's score (``rl_baseline greedy``, shaped the same way); which candidates get a gradient, and
        their baselines (MRT: all, baseline 0).
        """
        c = self.config
        src, src_lengths = batch["src"], batch["src_lengths"]
        kl = self.reference is not None
        ids, log_p = self.candidates(src, src_lengths, c.rl_n_samples + 1, with_log_probs=kl)
        rewards, scores, log_ratio = self.score(batch, ids, log_p)
        n = scores.size(1)
        if c.rl_objective == "mrt":
            return Rollout(ids, rewards, scores, torch.ones(n, dtype=torch.bool, device=scores.device),
                           torch.zeros_like(scores), log_ratio)
        greedy_scores = None
        if c.rl_baseline == "greedy":
            greedy, greedy_log_p = self._sampled(src, src_lengths, 1, True, kl)
            greedy_scores = self.score(batch, greedy, greedy_log_p)[1].squeeze(1)
        actors, baselines = baseline_and_actors(scores, c.rl_baseline, greedy_scores)
        return Rollout(ids, rewards, scores, actors, baselines, log_ratio, greedy_scores)

    def loss(self, batch: Mapping[str, torch.Tensor], rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The differentiable part of a step: an extension point, overridable alone.

        log P of the actors by teacher forcing (``sequence_log_probs``), then -(score - baseline) * log P
        averaged over the actors (REINFORCE) or the risk -E_Q[score] over each source's candidates (MRT,
        Q the ``rl_mrt_alpha``-sharpened model distribution renormalised over them); with
        ``rl_adv_norm`` each source's advantages (MRT: scores) are divided by the standard deviation of
        its candidates' scores; plus ``rl_mle_weight`` times the MLE loss.

        Returns:
            The loss and the metrics of ``metric_names``.
        """
        c, specials = self.config, self.special_ids
        batch_size = rollout.scores.size(0)
        actors = rollout.actors
        rows = actors.repeat(batch_size)  # |rows| = (batch_size * n,)
        log_p = sequence_log_probs(self.model, batch["src"], batch["src_lengths"], rollout.candidates[rows],
                                   bucket_ratio=self._bucket_ratio, check_normalized=not self._log_probs_checked)
        self._log_probs_checked = True
        log_p = log_p.view(batch_size, -1)  # |log_p| = (batch_size, n_actors)
        advantage = (rollout.scores - rollout.baselines)[:, actors]  # |advantage| = (batch_size, n_actors)
        if c.rl_adv_norm:
            advantage = per_source_normalized(advantage, rollout.scores)
        if c.rl_objective == "mrt":
            # risk = E_Q[-reward], Q the alpha-sharpened model distribution renormalised over the candidates;
            # every candidate is an actor with baseline 0, so its advantage is its (shaped, normalised) reward
            q = (c.rl_mrt_alpha * log_p).softmax(dim=1)
            loss = -(q * advantage).sum(dim=1).mean()
        else:
            loss = -(advantage.detach() * log_p).mean()
        if c.rl_mle_weight > 0:
            loss = loss + c.rl_mle_weight * super().compute_loss(batch)[0]

        output_lengths, ref_lengths = self.lengths(batch, rollout.candidates)
        metrics = {
            "loss": float(loss.detach()),
            "reward": float(rollout.rewards[:, actors].mean()),
            "baseline": float(rollout.baselines[:, actors].mean()),
            "advantage": float(advantage.mean()),
            "adv_std": float(advantage.std(correction=0)),
            "len_ratio": float(output_lengths.sum() / ref_lengths.sum().clamp(min=1)),
            "no_eos": float((~(rollout.candidates == specials.eos).any(dim=1)).float().mean()),
        }
        if rollout.log_ratio is not None:
            metrics["kl"] = float(rollout.log_ratio.mean())
        return loss, metrics

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The RL objective of a batch: ``rollout`` without a graph, then ``loss``."""
        with torch.no_grad():
            rollout = self.rollout(batch)
        return self.loss(batch, rollout)

    def validation_score(self, metrics: Mapping[str, float]) -> float:
        """Validation corpus BLEU (sacrebleu, greedy output): what RL is meant to raise."""
        return metrics["valid_bleu"]
