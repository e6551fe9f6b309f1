"""Sentence-level rewards for RL fine-tuning, computed on token-id tensors.

The tensor rewards (``sentence_bleu``, ``sentence_gleu``) work on a whole batch
at once on the input device, with no Python loop over sentences or tokens: the
n-grams of a hypothesis are compared with those of the hypothesis itself and
of its reference through boolean equality matrices, which are exact for any
vocabulary size (no hashing). They reproduce sacrebleu's sentence BLEU with
``tokenize="none"`` and ``effective_order=True`` and nltk's sentence GLEU on
the sequences of ids joined by spaces.

Every position equal to ``pad_id`` is ignored wherever it stands; other
special ids (BOS, EOS) count as ordinary tokens, so remove them first if they
should not be scored (``strip_eos`` turns everything from the first EOS on
into PAD).

A reward is any callable ``(hyps, refs) -> (rows,) tensor`` on PAD-padded id
tensors. One that also names some of ``REWARD_INPUTS`` as parameters (or takes
``**kwargs``) is given them as keyword arguments, one entry per row
(``reward_inputs`` reads its signature): ``src`` (the source ids of each row),
``src_text`` / ``ref_text`` (the raw source / reference lines), ``hyp_text``
(the hypotheses as text) and ``index`` (each row's example, its line number in
the training files). ``SacreBLEUReward`` is such a text reward: it scores
``hyp_text`` against ``ref_text`` with sacrebleu itself (BLEU or chrF).

``get_reward`` builds one by name (the library's, or ``"module:function"``),
``as_reward`` also lets user callables through unchanged, and
``score_candidates`` scores every candidate of a source against every
reference of the same source (what minimum Bayes risk selection needs).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from simple_nmt.data import LIBRARY_IDS, SpecialIds

Reward = Callable[..., torch.Tensor]

SMOOTH_DEFAULTS: dict[str, float | None] = {
    "none": None,
    "floor": 0.1,
    "add-k": 1.0,
    "exp": None,
}

REWARDS = ("bleu", "bleu_precision", "gleu", "chrf", "sacrebleu")

# the keyword inputs a reward may name, each given one entry per scored row
REWARD_INPUTS = ("src", "src_text", "hyp_text", "ref_text", "index")


def after_eos(ids: torch.Tensor, eos: int = LIBRARY_IDS.eos) -> torch.Tensor:
    """True at every position after the first EOS: |ids| = (n, length) -> (n, length) bool."""
    is_eos = (ids == eos).long()
    return (is_eos.cumsum(dim=1) - is_eos) > 0


def strip_eos(ids: torch.Tensor, specials: SpecialIds = LIBRARY_IDS) -> torch.Tensor:
    """The tokens before the first EOS, PAD elsewhere: what a reward scores. |ids| = (n, length) -> (n, length)."""
    return ids.masked_fill(after_eos(ids, specials.eos) | (ids == specials.eos), specials.pad)


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
        pad_id: ignored id.
        max_order: the largest n-gram order.

    Returns:
        ``matches`` ``(batch_size, max_order)`` where column ``n - 1`` is
        ``sum over distinct hyp n-grams g of min(count_hyp(g), count_ref(g))``
        (exact integers, as floats), and the hypothesis and reference lengths
        ``(batch_size,)``.
    """
    _check_pair(hyps, refs)
    batch_size, device = hyps.size(0), hyps.device
    # Both sides in one tensor: hypotheses then references, as wide as the wider
    # (widened with new_full: F.pad's value goes through a float and rounds big ids).
    width = max(hyps.size(1), refs.size(1))
    sides = [torch.cat([ids, ids.new_full((batch_size, width - ids.size(1)), pad_id)], dim=1) for ids in (hyps, refs)]
    x, lengths = _compact(torch.cat(sides), pad_id)
    # |x| = (2 * batch_size, length), |lengths| = (2 * batch_size,)
    # max_order - 1 more positions after each sentence, so that no n-gram runs off
    # its side; every position past a sentence end gets its own id above every
    # token, so a padding position equals no other position.
    length = x.size(1) + max_order - 1
    pos = torch.arange(length, device=device)
    real = pos < lengths.view(2, batch_size, 1)
    # |real| = (2, batch_size, length)
    x = F.pad(x, (0, max_order - 1)).view(2, batch_size, length).masked_fill(~real, 0)
    lowest, top = torch.stack(torch.aminmax(x)).tolist() if x.numel() else (0, 0)
    top = max(top, 0)
    pad_ids = top + 1 + torch.arange(2, device=device)[:, None, None] * length + pos
    # |pad_ids| = (2, 1, length)
    x = torch.where(real, x, pad_ids)
    x = x.transpose(1, 2).contiguous()
    # |x| = (2, length, batch_size): x[0] the hypotheses, x[1] the references

    # Unigram equality of every hyp position i with every position k of the
    # hypothesis then the reference, laid out (k, i, batch) so that the batch is the
    # contiguous dimension: equal[k, i, b] = x.view(2 * length, batch_size)[k, b] ==
    # x[0, i, b]. It is written into a flat buffer with a False tail, where the step
    # (k, i) -> (k + 1, i + 1) is a constant offset: the n-gram equality is the
    # (n - 1)-gram equality AND the unigram equality n - 1 steps along the diagonal,
    # all on flat memory. A real n-gram at i never leaves its row i, and an n-gram
    # at k that would run off its block (or the buffer) starts on padding, which
    # equals no real token. (An n-gram that reaches padding matches itself in the
    # hypothesis block but nothing in the reference block, so it adds nothing.)
    size = 2 * length * length * batch_size
    step = (length + 1) * batch_size
    buffer = torch.empty(2 * size + (max_order - 1) * step, dtype=torch.bool, device=device)
    flat, work = buffer[:-size], buffer[-size:].view(2 * length, length, batch_size)
    flat[size:] = False
    equal = flat[:size].view(2 * length, length, batch_size)
    # Ids are compared one byte at a time, up to the highest byte in use (all of
    # them for negative ids): == on bytes is many times faster than on int64 on CPU.
    n_bytes = x.element_size() if lowest < 0 else max(1, ((top + 2 * length).bit_length() + 7) // 8)
    for byte in range(n_bytes):
        x_byte = ((x >> 8 * byte) & 255).to(torch.uint8)
        torch.eq(x_byte.view(2 * length, 1, batch_size), x_byte[0], out=work if byte else equal)
        if byte:
            equal &= work

    # counts[n - 1, 0, i, b] and counts[n - 1, 1, i, b]: occurrences of the n-gram at
    # hyp position i in the hypothesis (itself included) and in the reference.
    counts = torch.empty(max_order, 2, length, batch_size, dtype=_count_dtype(length), device=device)
    for n in range(1, max_order + 1):
        if n > 1:
            shifted = flat[(n - 1) * step : (n - 1) * step + size].view_as(equal)
            equal = torch.bitwise_and(equal, shifted, out=work)
        _count(equal.view(2, length, length, batch_size), out=counts[n - 1])
    # An n-gram seen c_h times adds min(c_h, c_r) / c_h at each of its c_h positions,
    # so the positions sum to its clipped count. The float error of that sum is
    # below length^2 / 2^24 in float32, at most 1/16 up to 1024 positions, so
    # rounding gives the exact integer; longer rows sum in float64 (but on MPS).
    count_h, count_r = counts[:, 0], counts[:, 1]
    # |count_h| = |count_r| = (max_order, length, batch_size)
    clipped = torch.minimum(count_h, count_r).to(torch.float32 if length <= 1024 else _float_dtype(device))
    matches = clipped.div_(count_h.clamp(min=1)).sum(dim=1).round().t()
    return matches, lengths[:batch_size], lengths[batch_size:]


def _count_dtype(size: int) -> torch.dtype:
    """The smallest dtype that counts up to ``size`` exactly: bytes while they suffice."""
    return torch.uint8 if size <= 255 else torch.int32


def _count(eq: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """True entries along dimension 1 of a bool tensor, written into ``out``.

    Summing its bytes is several times faster than summing bools; ``out`` has the
    dtype of ``_count_dtype`` for that dimension (or wider).
    """
    return torch.sum(eq.view(torch.uint8), dim=1, dtype=out.dtype, out=out)


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
    dtype: torch.dtype = torch.float32,
    brevity_penalty: bool = True,
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
        dtype: the scores' type: float32, or float64 (computed in float64 on CPU) where the scores must
            agree with sacrebleu's to 1e-6 (MBR's expected utilities).
        smooth: ``"exp"``, ``"floor"``, ``"add-k"`` or ``"none"``.
        smooth_value: the value of ``floor`` (default 0.1) or ``add-k``
            (default 1); ignored by the others.
        brevity_penalty: False leaves BLEU's brevity penalty out: the geometric mean of the (smoothed)
            n-gram precisions alone, which rewards no length (sacrebleu's score with the reference
            length set to the hypothesis's).

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
    compute = _float_dtype(matches.device)
    orders = torch.arange(1, max_order + 1, device=matches.device)
    correct = matches.to(compute)
    total = _totals(h_len, orders).to(compute)
    # |correct| = |total| = (batch_size, max_order)
    if smooth == "add-k":
        add = (orders > 1).to(compute) * smooth_value
        correct, total = correct + add, total + add

    # sacrebleu stops at the first order without n-grams: the effective order.
    valid = torch.cumprod((total != 0).to(torch.int32), dim=1).bool()
    eff_order = valid.sum(dim=1)
    # |valid| = (batch_size, max_order), |eff_order| = (batch_size,)
    safe_total = torch.where(total == 0, torch.ones_like(total), total)
    zero = (correct == 0) & valid
    if smooth == "exp":
        # the k-th order without matches gets precision 1 / (2^k * total)
        halvings = torch.cumsum(zero.to(compute), dim=1)
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
    mean_log = torch.log(safe_prec).sum(dim=1) / eff_order.clamp(min=1).to(compute)

    h_f, r_f = h_len.to(compute), r_len.to(compute)
    bp = torch.ones_like(h_f)
    if brevity_penalty:
        bp = torch.where(h_len < r_len, torch.exp(1.0 - r_f / h_f.clamp(min=1.0)), bp)
    score = torch.where(null, torch.zeros_like(bp), bp * torch.exp(mean_log))
    # |score| = (batch_size,)
    return score.to(dtype)


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
    """Exact sacrebleu sentence BLEU or chrF of texts: a text reward.

    It scores its keyword inputs ``hyp_text`` (the hypotheses as text) against
    ``ref_text`` (the reference lines), one sentence at a time (a Python loop: use
    the tensor rewards when speed matters); the id tensors only give the number of
    rows and the device. The RL engine gives it the hypotheses decoded by its
    ``tgt_field`` and the raw reference lines of the training file (``tgt_lines``),
    so that a word outside the vocabulary is scored as written, not as ``<unk>``.
    BLEU uses sacrebleu's defaults (13a tokenizer, exp smoothing) with effective
    order; chrF uses its defaults (character 6-grams, beta 2).

    Args:
        metric: ``"bleu"`` or ``"chrf"``.
        n_gram: the largest n-gram order of BLEU (ignored by chrF).
    """

    def __init__(self, metric: str = "bleu", n_gram: int = 4):
        from sacrebleu.metrics import BLEU, CHRF

        if metric == "bleu":
            self.metric = BLEU(effective_order=True, max_ngram_order=n_gram)
        elif metric == "chrf":
            self.metric = CHRF()
        else:
            raise ValueError(f"unknown metric {metric!r}; known: bleu, chrf")

    def __call__(self, hyps: torch.Tensor, refs: torch.Tensor, *, hyp_text: Sequence[str],
                 ref_text: Sequence[str]) -> torch.Tensor:
        """Score each hypothesis text against its reference text.

        Args:
            hyps: hypothesis ids, ``(rows, length)``.
            refs: reference ids, ``(rows, length')``.
            hyp_text: the hypotheses as text, one per row.
            ref_text: the references as text, one per row.

        Returns:
            Float32 scores (0-100), ``(rows,)``, on the device of ``hyps``.
        """
        _check_pair(hyps, refs)
        if len(hyp_text) != hyps.size(0) or len(ref_text) != hyps.size(0):
            raise ValueError(f"{hyps.size(0)} rows but {len(hyp_text)} hypothesis and {len(ref_text)} "
                             "reference texts")
        scores = [self.metric.sentence_score(hyp, [ref]).score for hyp, ref in zip(hyp_text, ref_text)]
        return torch.tensor(scores, dtype=torch.float32, device=hyps.device)


def import_reward(name: str) -> Reward:
    """The callable that ``name`` = ``"module:qualname"`` names, imported.

    Raises:
        ValueError: one line naming ``name`` when it does not import or is not callable.
    """
    module_name, _, qualname = name.partition(":")
    try:
        found = importlib.import_module(module_name)
    except Exception as e:  # any error of the module's code: it does not import
        first_line = str(e).partition("\n")[0]
        raise ValueError(f"reward {name!r} does not import: {type(e).__name__}: {first_line}") from e
    try:
        for part in qualname.split("."):
            found = getattr(found, part)
    except AttributeError:
        raise ValueError(f"reward {name!r} does not import: module {module_name} has no {qualname}") from None
    if not callable(found):
        raise ValueError(f"reward {name!r} is not callable: it is a {type(found).__name__}")
    return found


def reward_name(reward: str | Reward) -> str | None:
    """The name that rebuilds ``reward`` through ``get_reward``: a name given is returned as it is; a
    callable gets ``"module:qualname"`` where importing that gives back the same object (a module-level
    function), else None (a lambda, closure, bound method or instance, or anything of ``__main__``, which
    another run cannot import)."""
    if isinstance(reward, str):
        return reward
    module, qualname = getattr(reward, "__module__", None), getattr(reward, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or module == "__main__":
        return None
    name = f"{module}:{qualname}"
    try:
        return name if import_reward(name) is reward else None
    except ValueError:
        return None


def reward_label(reward: str | Reward) -> str:
    """How messages name ``reward``: its name if it is given by name or has one (``reward_name``), else its
    qualified name (or its type's)."""
    name = reward_name(reward)
    if name is not None:
        return repr(name)
    return getattr(reward, "__qualname__", None) or type(reward).__qualname__


def reward_inputs(reward: Reward, unavailable: Mapping[str, str] | None = None, label: str | None = None
                  ) -> frozenset[str]:
    """The inputs of ``REWARD_INPUTS`` to give ``reward`` as keyword arguments, decided from its signature.

    A reward gets the inputs it names as parameters, and with ``**kwargs`` every one that is available.
    A callable without a signature (some builtins) gets none.

    Args:
        reward: the callable.
        unavailable: the inputs the caller cannot give, each with what would make it available (e.g.
            ``{"ref_text": "pass tgt_lines"}``).
        label: the reward's name in messages (default ``reward_label(reward)``).

    Raises:
        ValueError: one line naming the reward, when it names an unavailable input.
    """
    unavailable = unavailable or {}
    try:
        parameters = list(inspect.signature(reward).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    named = {p.name for p in parameters if p.name in REWARD_INPUTS and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                  p.KEYWORD_ONLY)}
    for name in REWARD_INPUTS:
        if name in named and name in unavailable:
            raise ValueError(f"reward {label or reward_label(reward)} takes {name}: {unavailable[name]}")
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        named.update(name for name in REWARD_INPUTS if name not in unavailable)
    return frozenset(named)


def checked_scores(scores: Any, rows: int, label: str, check_finite: bool = True,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reward's output as |scores| = (rows,) of type ``dtype``.

    A real-valued tensor of shape (rows,) is accepted: floating, or integer or bool (counts, hits), all
    taken as ``dtype``.

    Args:
        scores: what the reward returned.
        rows: the number of rows it scored.
        label: the reward's name in messages.
        check_finite: also refuse NaN and infinite scores (one host sync).
        dtype: float32, or float64 for scores that must keep their precision.

    Raises:
        ValueError: one line naming the reward, what it returned and what was expected.
    """
    expected = f"expected a real-valued tensor of shape ({rows},), one score per row"
    if not torch.is_tensor(scores):
        raise ValueError(f"reward {label} returned a {type(scores).__name__}; {expected}")
    if tuple(scores.shape) != (rows,) or scores.is_complex():
        raise ValueError(f"reward {label} returned a tensor of shape {tuple(scores.shape)} and dtype "
                         f"{scores.dtype}; {expected}")
    scores = scores.to(dtype)
    if check_finite and not bool(scores.isfinite().all()):
        bad = scores[~scores.isfinite()][0]
        raise ValueError(f"reward {label} returned non-finite scores (e.g. {float(bad)}); expected finite ones")
    return scores


def get_reward(name: str, n_gram: int = 4, pad_id: int = 0) -> Reward:
    """Build a reward by name.

    Args:
        name: ``"bleu"``, ``"bleu_precision"`` (BLEU without its brevity penalty: the n-gram precisions
            alone, for a length term kept apart, ``rl_length_weight``) and ``"gleu"`` (tensor rewards on
            ids, ``(hyps, refs) -> (rows,)``),
            ``"sacrebleu"`` and ``"chrf"`` (text rewards, ``SacreBLEUReward``, which take
            ``hyp_text`` and ``ref_text``), or ``"module:function"``: a reward of your own, imported.
        n_gram: the largest n-gram order (ignored by chrF and by imported rewards).
        pad_id: id ignored in hypotheses and references (by the tensor rewards).
    """
    if ":" in name:
        return import_reward(name)
    if name == "bleu":

        def bleu(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            return sentence_bleu(hyps, refs, pad_id, max_order=n_gram)

        return bleu
    if name == "bleu_precision":

        def bleu_precision(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            return sentence_bleu(hyps, refs, pad_id, max_order=n_gram, brevity_penalty=False)

        return bleu_precision
    if name == "gleu":

        def gleu(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            return sentence_gleu(hyps, refs, pad_id, max_order=n_gram)

        return gleu
    if name in ("sacrebleu", "chrf"):
        return SacreBLEUReward(metric="bleu" if name == "sacrebleu" else "chrf", n_gram=n_gram)
    raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}, or module:function")


def as_reward(reward: str | Reward, n_gram: int = 4, pad_id: int = 0) -> Reward:
    """Return ``reward`` unchanged if it is callable, else ``get_reward(reward, n_gram, pad_id)``.

    Any callable ``(hyps, refs[, inputs]) -> (rows,) tensor`` is accepted as a reward.
    """
    if callable(reward):
        return reward
    return get_reward(reward, n_gram=n_gram, pad_id=pad_id)


def score_candidates(
    candidates: torch.Tensor,
    references: torch.Tensor,
    reward: str | Reward = "bleu",
    specials: SpecialIds = LIBRARY_IDS,
    chunk_rows: int = 4096,
    to_text: Callable[[Sequence[int]], str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Every candidate of a source scored against every reference of the same source.

    The (candidate, reference) pairs are laid out as rows and given to the reward ``chunk_rows`` at a
    time, so that memory stays bounded for any number of pairs (1,024 x 1,024 per source and more).
    Minimum Bayes risk selection takes the candidate of the highest mean over references that are the
    candidates themselves: ``score_candidates(c, c).mean(dim=-1).argmax(dim=-1)``.

    Args:
        candidates: |candidates| = (sources, n, length) ids, or (n, length) for one source. Everything from
            a row's first EOS on is ignored, and PAD wherever it stands.
        references: |references| = (sources, m, length') ids, or (m, length'), read as the candidates.
        reward: a name of ``REWARDS`` (n-gram order 4), ``"module:function"``, or a callable
            ``(hyps, refs[, hyp_text, ref_text]) -> (rows,)``; a text reward needs ``to_text``. A reward
            that takes ``src``, ``src_text`` or ``index`` is refused: only the pairs are given.
        specials: the vocabulary's special ids (EOS and PAD are read).
        chunk_rows: the most pairs per call of the reward. The tensor rewards hold about
            ``4 * chunk_rows * length**2`` bytes (length: the longest sentence of the chunk).
        to_text: ids (EOS and PAD removed) to text, for a reward that takes ``hyp_text`` / ``ref_text``;
            each candidate and reference is turned into text once.
        dtype: the scores' type: float32, or float64 to keep a float64 reward's precision.

    Returns:
        |scores| = (sources, n, m), or (n, m) for 2-D inputs, on the candidates' device:
        ``scores[s, i, j]`` is the reward of candidate i of source s against reference j of source s.
    """
    if candidates.dim() not in (2, 3) or references.dim() != candidates.dim():
        raise ValueError(f"candidates and references must be (sources, n, length) and (sources, m, length'), or "
                         f"(n, length) and (m, length'), got shapes {tuple(candidates.shape)} and "
                         f"{tuple(references.shape)}")
    single = candidates.dim() == 2
    if single:
        candidates, references = candidates[None], references[None]
    if candidates.size(0) != references.size(0):
        raise ValueError(f"{candidates.size(0)} sources of candidates but {references.size(0)} of references")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    sources, n, m = candidates.size(0), candidates.size(1), references.size(1)
    label, fn = reward_label(reward), as_reward(reward, pad_id=specials.pad)
    only_pairs = "score_candidates gives the candidates and references only"
    unavailable = dict.fromkeys(("src", "src_text", "index"), only_pairs)
    if to_text is None:
        unavailable.update(dict.fromkeys(("hyp_text", "ref_text"), "pass to_text (ids to text)"))
    inputs = reward_inputs(fn, unavailable, label)
    hyps = strip_eos(candidates.reshape(sources * n, -1), specials)  # |hyps| = (sources * n, length)
    refs = strip_eos(references.reshape(sources * m, -1), specials)  # |refs| = (sources * m, length')
    texts = {name: [to_text([t for t in row if t != specials.pad]) for row in ids.tolist()]
             for name, ids in (("hyp_text", hyps), ("ref_text", refs)) if name in inputs}

    scores = torch.empty(sources * n * m, dtype=dtype, device=candidates.device)
    for start in range(0, len(scores), chunk_rows):
        pairs = torch.arange(start, min(start + chunk_rows, len(scores)), device=candidates.device)
        # pair p = (s * n + i) * m + j: candidate row s * n + i, reference row s * m + j
        hyp_rows, ref_rows = pairs // m, pairs // (n * m) * m + pairs % m  # |hyp_rows| = |ref_rows| = (chunk,)
        rows = {"hyp_text": hyp_rows, "ref_text": ref_rows}
        kwargs = {name: [text[k] for k in rows[name].tolist()] for name, text in texts.items()}
        out = fn(hyps.index_select(0, hyp_rows), refs.index_select(0, ref_rows), **kwargs)
        scores[start:start + len(pairs)] = checked_scores(out, len(pairs), label, dtype=dtype)
    scores = scores.view(sources, n, m)
    return scores[0] if single else scores
