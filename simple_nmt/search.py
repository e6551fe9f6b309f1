"""Decoding, written once over the models' step interface.

A model offers ``encode(src, src_lengths) -> state`` and
``decode_step(y_prev, state) -> (log_probs, state)``, where ``state`` is a
(nested) dict / list of tensors whose first dimension is the batch. That is
all the functions here need: they repeat and reorder the state along the
batch for K samples and for beams. Greedy decoding and sampling take the
model's ``decode_scores`` where it has one (an ``EncoderDecoder``'s logits):
they need the log-probs of the tokens they pick only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from simple_nmt.data import LIBRARY_IDS, SpecialIds

State = Any


def map_state(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """Apply ``fn`` to every tensor in a nested dict / list / tuple; keep the rest."""
    if torch.is_tensor(state):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(v, fn) for v in state)
    return state


def repeat_state(state: State, n: int) -> State:
    """Repeat every batch row ``n`` times in place: rows i*n .. i*n+n-1 copy row i."""
    return map_state(state, lambda x: x.repeat_interleave(n, dim=0))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)``; a contiguous tensor of 3 or more dimensions is taken as (rows, row
    size), which CPUs copy about twice as fast."""
    if x.dim() > 2 and x.is_contiguous():
        return x.flatten(1).index_select(0, index).view(len(index), *x.shape[1:])
    return x.index_select(0, index)


def select_state(state: State, index: torch.Tensor, same: tuple[str, ...] = ()) -> State:
    """Keep the batch rows ``index`` (in that order).

    Args:
        same: keys of a dict state whose rows ``index`` leaves as they are (kept, not copied): beam
            search reorders hypotheses only among those of one source, whose source-only entries
            (e.g. the encoder output) are equal.
    """
    if same and isinstance(state, dict):
        return {k: v if k in same else select_state(v, index) for k, v in state.items()}
    return map_state(state, lambda x: take_rows(x, index))


def repeat(model: torch.nn.Module, state: State, n: int) -> State:
    """Each row of a decoder state ``n`` times: the model's ``repeat_state`` where it has one (every
    ``EncoderDecoder``), else ``repeat_state``."""
    repeat_model_state = getattr(model, "repeat_state", None)
    return repeat_state(state, n) if repeat_model_state is None else repeat_model_state(state, n)


def reorder(model: torch.nn.Module, state: State, index: torch.Tensor, within_sources: bool = False) -> State:
    """Keep the batch rows ``index`` of a decoder state: the model's ``reorder_state`` where it has one
    (every ``EncoderDecoder``), else ``select_state``.

    Args:
        within_sources: ``index`` only reorders the rows of each source among themselves (beam search).
    """
    reorder_state = getattr(model, "reorder_state", None)
    return select_state(state, index) if reorder_state is None else reorder_state(state, index, within_sources)


def decode_scores(model: torch.nn.Module, y_prev: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """One step's scores over the vocabulary, logits or log-probs: the model's ``decode_scores`` where it has one
    (every ``EncoderDecoder``), else its ``decode_step``."""
    step = getattr(model, "decode_scores", None)
    return (model.decode_step if step is None else step)(y_prev, state)


def special_ids(model: torch.nn.Module) -> SpecialIds:
    """The special ids of ``model``'s target vocabulary: its ``special_ids`` where it declares them (a Hugging
    Face model's adapter), else the library's 0..3; through ``DistributedDataParallel`` and ``torch.compile``."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return getattr(model, "special_ids", LIBRARY_IDS)


def output_ids(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The ids of a ``search`` output: ``search`` returns (ids, log_probs), a research model's may return ids only."""
    return output[0] if isinstance(output, tuple) else output


def hypothesis(ids: Sequence[int], specials: SpecialIds = LIBRARY_IDS) -> list[int]:
    """An output row as an id list, as ``search``'s rows read without their PAD: the tokens up to and
    including the first EOS (none where the output was cut at the length limit), PAD left out."""
    out = []
    for i in ids:
        if i == specials.eos:
            return [*out, i]
        if i != specials.pad:
            out.append(i)
    return out


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, epsilon: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, outside the top-p nucleus and below epsilon.

    Args:
        logits: |logits| = (batch_size, vocab_size).
        top_k: keep the k largest (0: all).
        top_p: keep the smallest set of tokens whose probability adds up to top_p (1: all).
        epsilon: keep the tokens whose probability under ``logits`` is at least epsilon, and the most
            probable token always (epsilon sampling, Hewitt et al., 2022; 0: all).
    """
    if epsilon > 0.0:
        probs = logits.softmax(dim=-1)  # |probs| = (batch_size, vocab_size)
        below = probs < epsilon
        below.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        logits = logits.masked_fill(below, float("-inf"))
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # |kth| = (batch_size, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens before it already cover top_p.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


LOG2E = math.log2(math.e)


def exp(x: torch.Tensor, scale: float = 1.0, in_place: bool = False) -> torch.Tensor:
    """exp(scale * x), written into ``x`` if ``in_place``, computed as 2 ** (x * scale * log2(e)): on CPU
    torch's exp2 takes about half of exp's time (its vectorised exp is the more exact one), for a relative
    error below 1e-6 in float32."""
    scaled = x.mul_(scale * LOG2E) if in_place else x * (scale * LOG2E)
    return scaled.exp2_()


def logsumexp(x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``x.logsumexp(dim=-1)`` through ``exp``: about twice as fast on CPU (a row of -inf gives -inf).
    ``in_place``: computed in ``x``'s memory, which it overwrites."""
    top = x.amax(dim=-1, keepdim=True)
    top = top.masked_fill(top.isinf(), 0.0)
    return exp(x.sub_(top) if in_place else x - top, in_place=True).sum(dim=-1).log_().add_(top.squeeze(-1))


def float_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.float().log_softmax(dim=-1)`` of a decoding step's |logits| = (rows, vocab_size): from
    low-precision logits (autocast) on CPU written into their float32 copy, which takes no second
    (rows, vocabulary) buffer: sampling 1.09-1.13x faster in bf16 (``benchmarks/bench_decoding.py``).
    Float32 logits get a new tensor (written in place, float32 sampling and beam search measured 2-4%
    slower), and so does a graph. CPU's kernel reads each row before it writes it (tested)."""
    copied = logits.dtype != torch.float32 and logits.device.type == "cpu"  # the float32 copy is this function's
    if not copied or (logits.requires_grad and torch.is_grad_enabled()):
        return logits.float().log_softmax(dim=-1)
    logits = logits.float()
    return torch.log_softmax(logits, dim=-1, out=logits)


def as_blocks(x: torch.Tensor, block: int, fill: float) -> torch.Tensor:
    """|x| = (n, size) as (n, ceil(size / block), block), the last block padded with ``fill``."""
    if x.size(1) % block:
        x = torch.nn.functional.pad(x, (0, block - x.size(1) % block), value=fill)
    return x.view(x.size(0), -1, block)


def block_argmax(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of |x| = (n, size), the first of equal maxima, several times faster on CPU:
    the block of ``block`` columns with the largest maximum first (``amax`` is vectorised, ``argmax``
    over a long row is not), then the column within it."""
    blocks = as_blocks(x, block, float("-inf"))  # |blocks| = (n, n_blocks, block)
    b = blocks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # |b| = (n, 1)
    j = blocks.gather(1, b[:, :, None].expand(-1, -1, block)).squeeze(1).argmax(dim=-1, keepdim=True)
    return (b * block + j).squeeze(1)


def block_topk(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)`` of |x| = (n, size): values and columns, largest first, several times faster on
    CPU. The k largest values of a row lie in the k blocks of ``block`` columns with the largest maxima,
    so only those blocks are searched (kept in column order; of equal values, other columns than
    ``topk``'s may be chosen). A row with fewer than k values above -inf is searched by ``topk``: the
    padding of the last block, -inf too, must not be chosen."""
    blocks = as_blocks(x, block, float("-inf"))  # |blocks| = (n, n_blocks, block)
    best = blocks.amax(dim=-1).topk(min(k, blocks.size(1)), dim=-1).indices.sort(dim=-1).values  # (n, k)
    candidates = blocks.gather(1, best[:, :, None].expand(-1, -1, block)).flatten(1)  # (n, k * block)
    values, j = candidates.topk(k, dim=-1)  # |values| = |j| = (n, k)
    if bool((values[:, -1] == float("-inf")).any()):
        return x.topk(k, dim=-1)
    return values, best.gather(1, j // block) * block + j % block


def draw(weights: torch.Tensor, block: int = 64) -> torch.Tensor:
    """One sample per row, with probability proportional to ``weights``, by inverting the cumulative sum.

    Exact like ``torch.multinomial(weights, 1)`` and much faster on CPU for large vocabularies:
    the cumulative sum runs over the sums of blocks of ``block`` tokens, and then within the one
    block the sample falls in, not over the whole vocabulary (a cumulative sum is sequential
    along a row; block sums are vectorised).

    Args:
        weights: |weights| = (batch_size, vocab_size), non-negative, each row with a positive sum
            (probabilities, or unnormalised ones such as exp(log-probs) with tokens set to 0).

    Returns:
        |ids| = (batch_size,), never a token of weight 0.
    """
    blocks = as_blocks(weights, block, 0.0)  # |blocks| = (batch_size, n_blocks, block); zeros are never drawn
    return draw_from_blocks(blocks, blocks.sum(dim=-1))


def draw_from_blocks(blocks: torch.Tensor, block_sums: torch.Tensor) -> torch.Tensor:
    """``draw`` of weights given as |blocks| = (batch_size, n_blocks, block) and their |block_sums| =
    (batch_size, n_blocks): ids (batch_size,)."""
    n, block = blocks.size(0), blocks.size(2)
    cdf = block_sums.cumsum(dim=-1)  # |cdf| = (batch_size, n_blocks)
    u = torch.rand(n, 1, device=blocks.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first block whose cumulative weight exceeds u (u kept below the total, also after rounding)
    b = torch.searchsorted(cdf, below(u, cdf[:, -1:]), right=True)  # |b| = (batch_size, 1)
    rest = u - cdf.gather(1, (b - 1).clamp(min=0)).masked_fill(b == 0, 0.0)  # u within that block, >= 0
    inner = blocks.gather(1, b[:, :, None].expand(-1, -1, block)).squeeze(1).cumsum(dim=-1)  # (batch_size, block)
    j = torch.searchsorted(inner, below(rest, inner[:, -1:]), right=True)
    return (b * block + j).squeeze(1)


def below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``x`` kept strictly below ``limit`` (> 0): a token with a cumulative weight above it always exists."""
    return torch.minimum(x, torch.nextafter(limit, torch.zeros_like(limit)))


def never_emitted(ids: SpecialIds) -> list[int]:
    """The ids a decoder never emits: PAD and BOS (one id where they are one, as in Marian and T5)."""
    return list(dict.fromkeys([ids.pad, ids.bos]))


def _forbid_specials(log_probs: torch.Tensor, ids: SpecialIds) -> torch.Tensor:
    """A float32 copy of |log_probs| = (n, vocab_size) where PAD and BOS have log-prob -inf."""
    log_probs = log_probs.float().clone()
    log_probs[:, never_emitted(ids)] = float("-inf")
    return log_probs


def float_copy(scores: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|scores| = (n, vocab_size) copied as float32 into ``out`` (the same shape) or a new tensor."""
    return (torch.empty(scores.shape, dtype=torch.float32, device=scores.device) if out is None else out).copy_(scores)


def picked(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The scores of the tokens |y| = (n,) in |scores| = (n, vocab_size), as float32."""
    return scores.gather(1, y[:, None]).squeeze(1).float()


def _greedy(scores: torch.Tensor, ids: SpecialIds) -> tuple[torch.Tensor, torch.Tensor]:
    """The best token of each row other than PAD and BOS, and its log-prob: |scores| = (n, vocab_size) logits
    (or log-probs) -> (n,), (n,)."""
    log_probs = float_log_softmax(scores)
    y = block_argmax(log_probs)
    special = (y == ids.pad) | (y == ids.bos)
    if special.any():  # rare in a trained model: only these rows are searched again without them
        y[special] = block_argmax(_forbid_specials(log_probs[special], ids))
    return y, picked(log_probs, y)


def _sample(scores: torch.Tensor, ids: SpecialIds, temperature: float, top_k: int, top_p: float,
            work: torch.Tensor | None = None, epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, PAD and BOS never, and its log-prob (at temperature 1): |scores| = (n, vocab_size)
    logits (or log-probs) -> (n,), (n,). ``work``: a float32 tensor of the scores' shape to use (overwritten).
    ``epsilon`` applies to the distribution sampled from: temperature applied, PAD and BOS left out."""
    y = log_z = None
    if top_k == 0 and top_p == 1.0 and epsilon == 0.0:
        # exp((logits - max) / temperature) is what draw needs, in one pass, and at temperature 1 its sum
        # is the log-normaliser's. The best token other than PAD and BOS cannot underflow to 0 when those
        # hold at most half of it: its weight is then at least 1 / (2 * vocab_size) of the best's, 1
        logits, specials = float_copy(scores, work), never_emitted(ids)
        top = logits.amax(dim=-1, keepdim=True)  # |top| = (n, 1)
        weights = exp(logits.sub_(top), 1.0 / temperature, in_place=True)  # the logits' tensor
        special_mass = weights[:, specials].sum(dim=1)  # |special_mass| = (n,)
        weights[:, specials] = 0.0
        blocks = as_blocks(weights, 64, 0.0)  # |blocks| = (n, n_blocks, 64)
        block_sums = blocks.sum(dim=-1)  # |block_sums| = (n, n_blocks)
        mass = block_sums.sum(dim=-1)
        if bool((special_mass <= mass).all()):
            y = draw_from_blocks(blocks, block_sums)
            if temperature == 1.0:
                log_z = (mass + special_mass).log_().add_(top.squeeze(1))
    if y is None:
        allowed = _forbid_specials(scores, ids)
        if temperature != 1.0:
            allowed /= temperature  # a copy of its own
        y = draw(filter_logits(allowed, top_k, top_p, epsilon).softmax(dim=-1))
    if log_z is None:
        log_z = logsumexp(float_copy(scores, work), in_place=True)
    return y, picked(scores, y) - log_z


@torch.no_grad()
def sample_search(
    model: torch.nn.Module,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    is_greedy: bool = True,
    max_length: int = 255,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    n_samples: int = 1,
    epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding or ancestral sampling, for the whole batch at once.

    Args:
        model: offers ``encode`` and ``decode_step`` (and ``special_ids`` if its vocabulary's are not 0..3).
        src: |src| = (batch_size, src_length) token ids.
        src_lengths: |src_lengths| = (batch_size,).
        is_greedy: argmax at each step, else sample.
        max_length: the most output tokens (EOS included).
        temperature, top_k, top_p: how to sample (ignored when greedy).
        n_samples: outputs per source; the encoder runs once and its state is repeated.
        epsilon: epsilon sampling: never a token whose probability (at ``temperature``, PAD and BOS
            left out) is below epsilon, unless it is the most probable (0: off; ignored when greedy).

    Returns:
        ids and the model's log-probability of each, both
        |ids| = |log_probs| = (batch_size * n_samples, length), the n_samples
        outputs of source i in rows i*n_samples .. i*n_samples + n_samples - 1.
        Each output ends with EOS unless it reached ``max_length``; PAD (and
        log-prob 0) after it.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    specials = special_ids(model)
    state = model.encode(src, src_lengths)
    if n_samples > 1:
        state = repeat(model, state, n_samples)
    n = src.size(0) * n_samples
    ids = torch.full((n, max_length), specials.pad, dtype=torch.long, device=src.device)
    log_probs = torch.zeros(n, max_length, device=src.device)
    rows = torch.arange(n, device=src.device)  # the output rows that the state still decodes
    y = torch.full((n,), specials.bos, dtype=torch.long, device=src.device)
    done = torch.zeros(n, dtype=torch.bool, device=src.device)
    # sampling's float32 weights, written in one tensor at every step: a new one at each step is memory the
    # system may map (page by page, zeroed) again, as it did for Seq2Seq's (rows, vocabulary) tensors
    work = None
    for t in range(max_length):
        scores, state = decode_scores(model, y, state)  # logits or log-probs: |scores| = (len(rows), vocab_size)
        if work is None and not is_greedy:
            work = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        if is_greedy:
            y, y_log_probs = _greedy(scores, specials)
        else:
            y, y_log_probs = _sample(scores, specials, temperature, top_k, top_p, work[: len(rows)], epsilon)
        y = y.masked_fill(done, specials.pad)  # |y| = (len(rows),)
        ids[rows, t] = y
        log_probs[rows, t] = y_log_probs.masked_fill(done, 0.0)
        done = done | (y == specials.eos)
        n_done = int(done.sum())
        if n_done == len(rows):
            break
        if 2 * n_done >= len(rows):  # at least half have ended: stop decoding them
            keep = (~done).nonzero().squeeze(1)
            state, rows, y, done = reorder(model, state, keep), rows[keep], y[keep], done[keep]
    return ids[:, : t + 1], log_probs[:, : t + 1]


def length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's length penalty ((5 + |y|) / 6) ** alpha (Wu et al., 2016)."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    src: torch.Tensor,
    src_lengths: torch.Tensor,
    beam_size: int = 5,
    max_length: int = 255,
    max_length_ratio: float = 0.0,
    length_penalty_alpha: float = 1.0,
    n_best: int = 1,
) -> tuple[list[list[list[int]]], torch.Tensor]:
    """Beam search vectorised over batch x beam.

    A finished hypothesis stays in its beam, extended by PAD at no cost, so
    that beam size 1 is exactly greedy decoding. Once at least half of the
    sources still decoded have all their hypotheses finished, those sources are
    no longer decoded. Hypotheses are ranked at the end by log-probability
    divided by the GNMT length penalty.

    Args:
        model: offers ``encode`` and ``decode_step``.
        src: |src| = (batch_size, src_length).
        src_lengths: |src_lengths| = (batch_size,).
        beam_size: hypotheses kept per source.
        max_length: the most output tokens (EOS included).
        max_length_ratio: if > 0, also at most ceil(ratio * source length) + 1 tokens.
        length_penalty_alpha: 0 ranks by log-probability alone.
        n_best: hypotheses returned per source (at most ``beam_size``).

    Returns:
        For each source, its ``n_best`` hypotheses as id lists, best first, each
        ending with EOS unless it was cut at the length limit (as ``sample_search``'s
        rows, without their PAD), and their scores, |scores| = (batch_size, n_best).
    """
    batch_size, k, device = src.size(0), beam_size, src.device
    specials = special_ids(model)
    limits = torch.full((batch_size,), max_length, dtype=torch.long, device=device)
    if max_length_ratio > 0:
        by_ratio = torch.ceil(src_lengths.to(device).float() * max_length_ratio).long() + 1
        limits = torch.minimum(limits, by_ratio)
    state = repeat(model, model.encode(src, src_lengths), k)
    scores = torch.full((batch_size, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # only the first beam is alive at the start
    seqs = torch.empty(batch_size * k, 0, dtype=torch.long, device=device)
    lengths = torch.zeros(batch_size * k, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size * k, dtype=torch.bool, device=device)
    y = torch.full((batch_size * k,), specials.bos, dtype=torch.long, device=device)
    active = torch.arange(batch_size, device=device)  # the sources the state still decodes, in its order
    beams = torch.arange(k, device=device)
    never = torch.tensor(never_emitted(specials), device=device)  # the tokens no hypothesis is extended by
    for t in range(int(limits.max())):
        step_log_probs, state = model.decode_step(y, state)  # |step_log_probs| = (len(active) * k, vocab_size)
        n, vocab_size = len(active), step_log_probs.size(-1)
        rows = (active[:, None] * k + beams).view(-1)  # the decoded hypotheses' rows of seqs: (n * k,)
        ended, decoded_scores = finished[rows], scores[active].view(-1)  # |decoded_scores| = (n * k,)
        # a source's k best continuations are among the k best tokens of each of its hypotheses: those, and
        # as many more as there are tokens never emitted (set aside here), are the candidates, so that no
        # pass over the (rows, vocabulary) log-probs adds the scores: |tokens| = (n * k, width)
        width = min(k + len(never), vocab_size)
        token_log_probs, tokens = block_topk(step_log_probs.float(), width)  # a tensor of its own: changed in place
        token_log_probs[torch.isin(tokens, never)] = float("-inf")
        # a finished hypothesis is extended by PAD at no cost, and by nothing else
        token_log_probs[ended] = float("-inf")
        token_log_probs[ended, 0], tokens[ended, 0] = 0.0, specials.pad
        candidates = (decoded_scores[:, None] + token_log_probs).view(n, k * width)
        top, best = candidates.topk(k, dim=-1)  # |top| = |best| = (n, k)
        kept = (torch.arange(n, device=device)[:, None] * k + best // width).view(-1)  # rows of the state
        y = tokens.view(n, k * width).gather(1, best).view(-1)
        state = reorder(model, state, kept, within_sources=True)
        scores[active] = top
        # the sources no longer decoded keep their hypotheses, each extended by PAD at no cost
        order = torch.arange(batch_size * k, device=device)
        order[rows] = rows[kept]
        tokens = torch.full_like(order, specials.pad)
        tokens[rows] = y
        seqs = torch.cat([seqs.index_select(0, order), tokens[:, None]], dim=1)
        lengths = lengths.index_select(0, order) + (~finished.index_select(0, order)).long()
        finished = finished.index_select(0, order) | (tokens == specials.eos)
        finished[rows] |= (t + 1 >= limits[active]).repeat_interleave(k)
        if finished.all():
            break
        done = finished[rows].view(n, k).all(dim=1)  # |done| = (n,)
        if 2 * int(done.sum()) >= n:  # at least half of the decoded sources have ended: stop decoding them
            keep = (~done).nonzero().squeeze(1)
            keep_rows = (keep[:, None] * k + beams).view(-1)
            state, y, active = reorder(model, state, keep_rows), y[keep_rows], active[keep]
    normalized = scores / length_penalty(lengths, length_penalty_alpha).view(batch_size, k)
    n_best = min(n_best, k)
    top_scores, top = normalized.topk(n_best, dim=-1)  # |top| = (batch_size, n_best)
    chosen = seqs.view(batch_size, k, -1).gather(
        1, top[:, :, None].expand(-1, -1, seqs.size(1))
    ).tolist()
    hyps = [[hypothesis(h, specials) for h in per_source] for per_source in chosen]
    return hyps, top_scores

