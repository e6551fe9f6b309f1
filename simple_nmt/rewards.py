"""Sentence-level rewards for RL fine-tuning, computed on token-id tensors.

The tensor rewards (``sentence_bleu``, ``sentence_gleu``) work on a whole batch
at once on the input device, with no Python loop over sentences or tokens: the
n-grams of a hypothesis are compared with those of the hypothesis itself and
of its reference through boolean equality matrices, which are exact for any
vocabulary size (no hashing). They reproduce sacrebleu's sentence BLEU with
``tokenize="none"`` and ``effective_order=True`` and nltk's sentence GLEU on
the sequences of ids joined by spaces.

Every position equal to ``pad_id`` is ignored wherever it stands; other
special ids (BOS, EOS) count as ordinary tokens, so replace them by ``pad_id``
first if they should not be scored, e.g.
``hyps.masked_fill(hyps == EOS, PAD)``.

``SacreBLEUReward`` scores detokenized strings with sacrebleu itself (BLEU or
chrF), sentence by sentence, for users who want the exact text metric.

A reward is any callable ``(hyps, refs) -> (batch_size,) tensor``;
``get_reward`` builds one by name and ``as_reward`` also lets user callables
through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SMOOTH_DEFAULTS: dict[str, float | None] = {
    "none": None,
    "floor": 0.1,
    "add-k": 1.0,
    "exp": None,
}

REWARDS = ("bleu", "gleu", "chrf", "sacrebleu")


def _compact(x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the non-pad ids of each row to its front, keeping their order.

    Args:
        x: ids, ``(batch_size, length)``.
        pad_id: the id to drop.

    Returns:
        The compacted ids, trimmed to the longest sentence, and the lengths.
    """
    # |x| = (batch_size, length)
    is_pad = x == pad_id
    lengths = (~is_pad).sum(dim=1)
    # |lengths| = (batch_size,)
    # trimming costs one host sync but saves the quadratic work on padding
    max_len = int(lengths.max()) if lengths.numel() else 0
    if bool((is_pad[:, :-1] & ~is_pad[:, 1:]).any()):  # a pad before a token: move the tokens forward
        order = torch.sort(is_pad.to(torch.int32), dim=1, stable=True).indices
        x = x.gather(1, order)
    x = x[:, :max_len]
    # |x| = (batch_size, max_len)
    return x, lengths


def _check_pair(hyps: torch.Tensor, refs: torch.Tensor) -> None:
    if hyps.dim() != 2 or refs.dim() != 2:
        raise ValueError(
            f"hyps and refs must be 2-D (batch_size, length), got shapes {tuple(hyps.shape)} and {tuple(refs.shape)}"
        )
    if hyps.size(0) != refs.size(0):
        raise ValueError(f"batch sizes differ: {hyps.size(0)} hypotheses, {refs.size(0)} references")
    if hyps.is_floating_point() or refs.is_floating_point():
        raise ValueError("hyps and refs must be integer id tensors")
    if hyps.device != refs.device:
        raise ValueError(f"hyps are on {hyps.device} but refs on {refs.device}")


def _ngram_matches(
    hyps: torch.Tensor, refs: torch.Tensor, pad_id: int, max_order: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped n-gram matches of each hypothesis against its reference.

    Args:
        hyps: hypothesis ids, ``(batch_size, length)``.
        refs: reference ids, ``(batch_size, length')``.
        pad_id: ignored id (all other ids must be >= 0).
        max_order: the largest n-gram order.

    Returns:
        ``matches`` ``(batch_size, max_order)`` where column ``n - 1`` is
        ``sum over distinct hyp n-grams g of min(count_hyp(g), count_ref(g))``
        (exact integers), and the hypothesis and reference lengths ``(batch_size,)``.
    """
    _check_pair(hyps, refs)
    h, h_len = _compact(hyps, pad_id)
    r, r_len = _compact(refs, pad_id)
    # |h| = (batch_size, hyp_len), |r| = (batch_size, ref_len)
    # Past each sentence's end, put negative ids that differ from each other and from
    # every token (ids are >= 0): then nothing involving padding is ever equal.
    hyp_len, ref_len = h.size(1), r.size(1)
    h_pos = torch.arange(hyp_len, device=h.device)
    r_pos = torch.arange(ref_len, device=r.device)
    h = torch.where(h_pos < h_len[:, None], h, -1 - h_pos)
    r = torch.where(r_pos < r_len[:, None], r, -1 - hyp_len - r_pos)

    # Unigram equality. Within the hypothesis only earlier positions are
    # compared: eq_hh1[b, i, k] needs k < i.
    earlier = torch.ones(hyp_len, hyp_len, dtype=torch.bool, device=h.device).tril(-1)
    eq_hh1 = (h[:, :, None] == h[:, None, :]) & earlier
    # |eq_hh1| = (batch_size, hyp_len, hyp_len)
    eq_hr1 = h[:, :, None] == r[:, None, :]
    # |eq_hr1| = (batch_size, hyp_len, ref_len)

    eq_hh, eq_hr = eq_hh1, eq_hr1
    matches = []
    for n in range(1, max_order + 1):
        if n > 1:
            # The n-grams at (i, k) are equal iff the (n-1)-grams at (i, k)
            # are equal and so are the tokens at (i + n - 1, k + n - 1); the
            # shift is along the diagonal, so k < i still holds in eq_hh.
            eq_hh = eq_hh[:, :-1, :-1] & eq_hh1[:, n - 1 :, n - 1 :]
            eq_hr = eq_hr[:, :-1, :-1] & eq_hr1[:, n - 1 :, n - 1 :]
        # |eq_hh| = (batch_size, hyp_len - n + 1, hyp_len - n + 1)
        # |eq_hr| = (batch_size, hyp_len - n + 1, ref_len - n + 1)
        # rank: earlier occurrences of the same n-gram in the hypothesis;
        # count_r: occurrences in the reference (0 past the sentence end).
        rank = _count(eq_hh)
        count_r = _count(eq_hr)
        # |rank| = |count_r| = (batch_size, hyp_len - n + 1)
        # An n-gram seen c_h times in the hypothesis has ranks 0..c_h - 1, of
        # which min(c_h, c_r) are below c_r: the clipped count, exactly.
        matches.append((rank < count_r).sum(dim=-1, dtype=torch.int32))
    return torch.stack(matches, dim=1), h_len, r_len


def _count(eq: torch.Tensor) -> torch.Tensor:
    """True entries along the last dimension of a bool tensor.

    Summing its bytes into bytes is several times faster than summing bools, and exact
    while the dimension has at most 255 entries; longer rows are summed into int32.
    """
    dtype = torch.uint8 if eq.size(-1) <= 255 else torch.int32
    return eq.view(torch.uint8).sum(dim=-1, dtype=dtype)


def _float_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps parity with the Python floats of sacrebleu/nltk; MPS has none.
    return torch.float32 if device.type == "mps" else torch.float64


def _totals(lengths: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Number of n-grams of each order, ``(batch_size, n_orders)``."""
    return (lengths[:, None] - orders[None, :] + 1).clamp(min=0)


def sentence_bleu(
    hyps: torch.Tensor,
    refs: torch.Tensor,
    pad_id: int,
    max_order: int = 4,
    smooth: str = "exp",
    smooth_value: float | None = None,
) -> torch.Tensor:
    """Sentence BLEU (0-100) of each hypothesis against its single reference.

    Equals ``sacrebleu.metrics.BLEU(tokenize="none", smooth_method=smooth,
    smooth_value=smooth_value, effective_order=True, max_ngram_order=max_order)
    .sentence_score(hyp, [ref]).score`` where ``hyp`` and ``ref`` are the
    non-pad ids joined by spaces. As in sacrebleu, a hypothesis with no
    matching unigram (in particular an empty hypothesis, or an empty
    reference) scores 0; orders longer than the hypothesis are left out
    (effective order), except with ``add-k`` whose smoothed totals never
    vanish for ``n > 1``.

    Args:
        hyps: hypothesis ids, ``(batch_size, length)``, CPU or CUDA.
        refs: reference ids, ``(batch_size, length')``, on the same device.
        pad_id: id ignored wherever it stands (the sentence is the sequence
            of the other ids, in order).
        max_order: the largest n-gram order.
        smooth: ``"exp"``, ``"floor"``, ``"add-k"`` or ``"none"``.
        smooth_value: the value of ``floor`` (default 0.1) or ``add-k``
            (default 1); ignored by the others.

    Returns:
        Float32 scores, ``(batch_size,)``, on the input device.
    """
    if smooth not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown smooth {smooth!r}; known: {', '.join(SMOOTH_DEFAULTS)}")
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}")
    if smooth_value is None:
        smooth_value = SMOOTH_DEFAULTS[smooth]
    matches, h_len, r_len = _ngram_matches(hyps, refs, pad_id, max_order)
    # |matches| = (batch_size, max_order), |h_len| = |r_len| = (batch_size,)
    dtype = _float_dtype(matches.device)
    orders = torch.arange(1, max_order + 1, device=matches.device)
    correct = matches.to(dtype)
    total = _totals(h_len, orders).to(dtype)
    # |correct| = |total| = (batch_size, max_order)
    if smooth == "add-k":
        add = (orders > 1).to(dtype) * smooth_value
        correct, total = correct + add, total + add

    # sacrebleu stops at the first order without n-grams: the effective order.
    valid = torch.cumprod((total != 0).to(torch.int32), dim=1).bool()
    eff_order = valid.sum(dim=1)
    # |valid| = (batch_size, max_order), |eff_order| = (batch_size,)
    safe_total = torch.where(total == 0, torch.ones_like(total), total)
    zero = (correct == 0) & valid
    if smooth == "exp":
        # the k-th order without matches gets precision 1 / (2^k * total)
        halvings = torch.cumsum(zero.to(dtype), dim=1)
        zero_prec = 100.0 / (torch.pow(2.0, halvings) * safe_total)
    elif smooth == "floor":
        zero_prec = 100.0 * smooth_value / safe_total
    else:
        zero_prec = torch.zeros_like(total)
    prec = torch.where(zero, zero_prec, 100.0 * correct / safe_total)
    # |prec| = (batch_size, max_order)

    # A zero precision (log floored at -9999999999 by sacrebleu) zeroes the score.
    # No unigram match (e.g. an empty side) gives 0 before any smoothing.
    null = ((prec <= 0) & valid).any(dim=1) | (matches[:, 0] == 0)
    safe_prec = torch.where(valid & (prec > 0), prec, torch.ones_like(prec))
    mean_log = torch.log(safe_prec).sum(dim=1) / eff_order.clamp(min=1).to(dtype)

    h_f, r_f = h_len.to(dtype), r_len.to(dtype)
    bp = torch.where(h_len < r_len, torch.exp(1.0 - r_f / h_f.clamp(min=1.0)), torch.ones_like(h_f))
    score = torch.where(null, torch.zeros_like(bp), bp * torch.exp(mean_log))
    # |score| = (batch_size,)
    return score.float()


def sentence_gleu(
    hyps: torch.Tensor,
    refs: torch.Tensor,
    pad_id: int,
    max_order: int = 4,
    min_order: int = 1,
) -> torch.Tensor:
    """Sentence GLEU (Wu et al., 2016), 0-100: min(n-gram precision, recall).

    Equals ``100 * nltk.translate.gleu_score.sentence_gleu([ref], hyp,
    min_len=min_order, max_len=max_order)`` on the non-pad ids. All n-grams of
    orders ``min_order..max_order`` are pooled; the score is the clipped
    matches over the larger of the hypothesis and reference n-gram counts,
    and 0 when both have none (empty sentences, or shorter than ``min_order``).

    Args:
        hyps: hypothesis ids, ``(batch_size, length)``.
        refs: reference ids, ``(batch_size, length')``, on the same device.
        pad_id: id ignored wherever it stands.
        max_order: the largest n-gram order.
        min_order: the smallest n-gram order (``1 <= min_order <= max_order``).

    Returns:
        Float32 scores, ``(batch_size,)``, on the input device.
    """
    if not 1 <= min_order <= max_order:
        raise ValueError(f"need 1 <= min_order <= max_order, got {min_order} and {max_order}")
    matches, h_len, r_len = _ngram_matches(hyps, refs, pad_id, max_order)
    # |matches| = (batch_size, max_order)
    orders = torch.arange(1, max_order + 1, device=matches.device)
    used = orders >= min_order
    tp = matches[:, used].sum(dim=1)
    tpfp = _totals(h_len, orders)[:, used].sum(dim=1)
    tpfn = _totals(r_len, orders)[:, used].sum(dim=1)
    n_all = torch.maximum(tpfp, tpfn)
    # |tp| = |n_all| = (batch_size,)
    dtype = _float_dtype(matches.device)
    score = 100.0 * (tp.to(dtype) / n_all.clamp(min=1).to(dtype))
    return torch.where(n_all > 0, score, torch.zeros_like(score)).float()


class SacreBLEUReward:
    """Exact sacrebleu sentence BLEU or chrF on detokenized strings.

    Each pair is decoded to text and scored by sacrebleu, one sentence at a
    time (a Python loop: use the tensor rewards when speed matters). BLEU uses
    sacrebleu's defaults (13a tokenizer, exp smoothing) with effective order;
    chrF uses its defaults (character 6-grams, beta 2).

    Args:
        decode: maps one list of ids (pads already removed) to a detokenized
            string; any other special ids (BOS, EOS) are its business.
        metric: ``"bleu"`` or ``"chrf"``.
        pad_id: id removed before decoding.
        n_gram: the largest n-gram order of BLEU (ignored by chrF).
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        metric: str = "bleu",
        pad_id: int = 0,
        n_gram: int = 4,
    ):
        from sacrebleu.metrics import BLEU, CHRF

        if metric == "bleu":
            self.metric = BLEU(effective_order=True, max_ngram_order=n_gram)
        elif metric == "chrf":
            self.metric = CHRF()
        else:
            raise ValueError(f"unknown metric {metric!r}; known: bleu, chrf")
        self.decode = decode
        self.pad_id = pad_id

    def __call__(self, hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """Score each hypothesis against its reference.

        Args:
            hyps: hypothesis ids, ``(batch_size, length)``.
            refs: reference ids, ``(batch_size, length')``.

        Returns:
            Float32 scores (0-100), ``(batch_size,)``, on the device of ``hyps``.
        """
        _check_pair(hyps, refs)
        pad = self.pad_id
        scores = [
            self.metric.sentence_score(
                self.decode([t for t in hyp if t != pad]),
                [self.decode([t for t in ref if t != pad])],
            ).score
            for hyp, ref in zip(hyps.tolist(), refs.tolist())
        ]
        return torch.tensor(scores, dtype=torch.float32, device=hyps.device)


def get_reward(
    name: str,
    n_gram: int = 4,
    pad_id: int = 0,
    decode: Callable[[list[int]], str] | None = None,
) -> Reward:
    """Build a reward ``(hyps, refs) -> (batch_size,)`` by name.

    Args:
        name: ``"bleu"`` and ``"gleu"`` (tensor rewards on ids), ``"sacrebleu"``
            and ``"chrf"`` (text rewards through sacrebleu, need ``decode``).
        n_gram: the largest n-gram order (ignored by chrF).
        pad_id: id ignored in hypotheses and references.
        decode: ids (pads removed) to detokenized string, for text rewards.
    """
    if name == "bleu":

        def bleu(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            return sentence_bleu(hyps, refs, pad_id, max_order=n_gram)

        return bleu
    if name == "gleu":

        def gleu(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            return sentence_gleu(hyps, refs, pad_id, max_order=n_gram)

        return gleu
    if name in ("sacrebleu", "chrf"):
        if decode is None:
            raise ValueError(f"reward {name!r} scores text: pass decode (ids to string)")
        metric = "bleu" if name == "sacrebleu" else "chrf"
        return SacreBLEUReward(decode, metric=metric, pad_id=pad_id, n_gram=n_gram)
    raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")


def as_reward(
    reward: str | Reward,
    n_gram: int = 4,
    pad_id: int = 0,
    decode: Callable[[list[int]], str] | None = None,
) -> Reward:
    """Return ``reward`` unchanged if it is callable, else ``get_reward(reward, ...)``.

    Any callable ``(hyps, refs) -> (batch_size,) tensor`` is accepted as a reward.

    Args:
        reward: a reward name (see ``REWARDS``) or a callable.
        n_gram: passed to ``get_reward``.
        pad_id: passed to ``get_reward``.
        decode: passed to ``get_reward``.
    """
    if callable(reward):
        return reward
    return get_reward(reward, n_gram=n_gram, pad_id=pad_id, decode=decode)
