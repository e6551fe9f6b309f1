"""Pre-LayerNorm Transformer (Vaswani et al., 2017; Xiong et al., 2020) with a key/value cache."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simple_nmt.data import PAD
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.search import take_rows


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal position encodings: |positions| = (length,) -> (length, dim)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device).float() * (-math.log(10000.0) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # |angles| = (length, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(-1, dim)


# Queries per attention up to which two batched products beat torch's fused attention on CPU: a decoding
# step has one query per row (self-attention) or one per sample or beam of a source (cross-attention), and
# there the fused kernel took about twice as long, in float32 and bfloat16 alike (benchmarks/bench_decoding.py)
FEW_QUERIES = 16


def attend_few(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_size)) v by two batched products, the softmax in float32 (or wider).

    Keys and values that are a decoding cache's prefix (``cache_room``) are read with the room of
    their buffer, masked: the prefix of each (row, head) is not one dense block of memory, and
    oneDNN's bfloat16 batched product would copy the whole cache first, at every step and layer.

    |q| = (batch_size, n_splits, queries, head_size), |k| = |v| = (batch_size, n_splits, keys, head_size);
    ``mask`` (broadcast to (batch_size, n_splits, queries, keys)) is True where attending is allowed.
    """
    keys, room = k.size(2), min(cache_room(k), cache_room(v))
    if room > keys:  # |k| = |v| = (batch_size, n_splits, room, head_size), the room masked
        k, v = (x.as_strided((*x.shape[:2], room, x.size(3)), x.stride(), x.storage_offset()) for x in (k, v))
        in_prefix = torch.arange(room, device=k.device) < keys
        mask = in_prefix if mask is None else F.pad(mask, (0, room - keys), value=False)
    scores = torch.matmul(q, k.transpose(2, 3))  # |scores| = (batch_size, n_splits, queries, keys)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.size(3) ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention whose keys/values can be projected once and cached."""

    def __init__(self, hidden_size: int, n_splits: int, dropout: float):
        super().__init__()
        if hidden_size % n_splits:
            raise ValueError("--hidden_size must be divisible by --n_splits")
        self.n_splits, self.dropout = n_splits, dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # |x| = (batch_size, length, hidden_size) -> (batch_size, n_splits, length, head_size)
        return x.view(x.size(0), x.size(1), self.n_splits, -1).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of |x| = (batch_size, length, hidden_size), each split into heads."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend from |x| = (batch_size, length, hidden_size); ``mask`` is True where attending is allowed."""
        q = self._split(self.q(x))
        dropout = self.dropout if self.training else 0.0
        if q.size(2) <= FEW_QUERIES and dropout == 0.0:
            o = attend_few(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        # |o| = (batch_size, n_splits, length, head_size)
        return self.out(o.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


def cache_room(cache: torch.Tensor) -> int:
    """How many positions the buffer behind |cache| = (batch_size, n_splits, t, head_size) holds (t if none)."""
    n, heads, t, size = cache.shape
    stride = cache.stride()
    if t == 0 or not (stride[3] == 1 and stride[2] == size and stride[0] == heads * stride[1]):
        return t
    room = stride[1] // size
    end = cache.storage_offset() + (n - 1) * stride[0] + (heads - 1) * stride[1] + room * size
    return room if end * cache.element_size() <= cache.untyped_storage().nbytes() else t


def select_with_room(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The batch rows ``index`` of a cache, copied into a buffer with room for one more position, so that
    the step after a reordering appends in place. Beam search reorders at every step: each position of
    room more would be copied (and allocated) at every step, for every row and layer."""
    if cache.requires_grad and torch.is_grad_enabled():  # autograd copies the cache at each step anyway
        return take_rows(cache, index)
    n, heads, t, size = cache.shape
    buffer = cache.new_empty(len(index), heads, t + 1, size)
    buffer[:, :, t:] = 0  # room of zeros, as append_to_cache makes it
    return torch.index_select(cache, 0, index, out=buffer[:, :, :t])


# Positions a new cache buffer holds beyond those it is made with: a buffer is made (and the cache copied)
# once per CACHE_ROOM decoding steps, and attention reads at most CACHE_ROOM - 1 unused positions
CACHE_ROOM = 16

# Where a cache's buffer stands: a counter of in-place writes shared by every state made from that buffer,
# and the count this state saw. A state whose count is behind has been extended by another state since.
CacheMark = tuple[list[int], int]


def append_to_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mark: CacheMark | None,
) -> tuple[torch.Tensor, torch.Tensor, CacheMark]:
    """The cached keys and values with the new positions ``k``, ``v`` appended, and the new cache's mark.

    The cache is a view of a buffer with room for more positions: the new ones are written
    into that room in place, so that a decoding step does not copy the whole cache. A new
    buffer, with room for ``CACHE_ROOM`` more positions, is made when the room runs out (attention
    reads the room too: ``attend_few``), when the types differ, when the
    new keys need a gradient (autograd keeps the cache), and when the buffer has been
    written since ``mark`` (another state decoded from the same cache: it keeps its own).
    The marks count writes themselves rather than read tensor version counters, which
    tensors made under ``torch.inference_mode`` do not have.

    Args:
        k_cache, v_cache: |k_cache| = (batch_size, n_splits, t, head_size).
        k, v: |k| = (batch_size, n_splits, new, head_size).
        mark: what this function returned for this cache (None: a cache it did not make).
    """
    n, heads, t, size = k_cache.shape
    length = t + k.size(2)
    stride = k_cache.stride()
    fits = min(cache_room(k_cache), cache_room(v_cache)) >= length and k_cache.dtype == k.dtype
    if mark is not None and mark[0][0] == mark[1] and fits and not k.requires_grad:
        k_all = k_cache.as_strided((n, heads, length, size), stride, k_cache.storage_offset())
        v_all = v_cache.as_strided((n, heads, length, size), v_cache.stride(), v_cache.storage_offset())
        writes = mark[0]
        writes[0] += 1
    else:
        buffer = k.new_empty(2, n, heads, length + CACHE_ROOM, size)
        buffer[:, :, :, length:] = 0  # room of zeros: attend_few reads it (0 weight times memory's NaN is NaN)
        k_all, v_all = buffer[0, :, :, :length], buffer[1, :, :, :length]
        k_all[:, :, :t], v_all[:, :, :t] = k_cache, v_cache
        writes = [0]
    k_all[:, :, t:], v_all[:, :, t:] = k, v
    return k_all, v_all, (writes, writes[0])


class FeedForward(nn.Sequential):
    """Position-wise feed-forward block, ``ffn_size`` wide."""

    def __init__(self, hidden_size: int, ffn_size: int, dropout: float):
        super().__init__(
            nn.Linear(hidden_size, ffn_size), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(ffn_size, hidden_size),
        )


class EncoderBlock(nn.Module):
    def __init__(self, hidden_size: int, n_splits: int, ffn_size: int, dropout: float):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(hidden_size), nn.LayerNorm(hidden_size)
        self.attn = MultiHeadAttention(hidden_size, n_splits, dropout)
        self.ffn = FeedForward(hidden_size, ffn_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.attn_norm(x)
        x = x + self.dropout(self.attn(z, *self.attn.project_kv(z), mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, hidden_size: int, n_splits: int, ffn_size: int, dropout: float):
        super().__init__()
        self.self_norm, self.cross_norm, self.ffn_norm = (nn.LayerNorm(hidden_size) for _ in range(3))
        self.self_attn = MultiHeadAttention(hidden_size, n_splits, dropout)
        self.cross_attn = MultiHeadAttention(hidden_size, n_splits, dropout)
        self.ffn = FeedForward(hidden_size, ffn_size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        self_kv: tuple[torch.Tensor, torch.Tensor],
        self_mask: torch.Tensor | None,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor,
        group: int = 1,
    ) -> torch.Tensor:
        """|x| = |z| = (batch_size, length, hidden_size), z = self_norm(x) (its keys/values are projected
        by the caller); the self-attention keys/values are given (the whole prefix, cached or not), so
        that one code path serves training and decoding. With ``group`` > 1 the cross-attention keys,
        values and mask are one per source, for ``group`` consecutive rows each (samples or beams)."""
        x = x + self.dropout(self.self_attn(z, *self_kv, self_mask))
        c = self.cross_norm(x)
        # a source's rows become queries of one attention over its keys (cross-attention has no mask
        # between positions): |c| = (batch_size / group, group * length, hidden_size)
        c = c.view(-1, group * c.size(1), c.size(2))
        x = x + self.dropout(self.cross_attn(c, *cross_kv, cross_mask).view_as(x))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(EncoderDecoder):
    """Pre-LN Transformer encoder-decoder with sinusoidal positions.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        hidden_size: model size.
        n_splits: attention heads.
        n_layers: encoder blocks and decoder blocks.
        dropout: on embeddings, attention weights and residual branches.
        tie_embeddings: the output projection reuses the target embedding matrix.
        ffn_size: width of the feed-forward blocks (None: 4 x hidden_size).
        share_embeddings: the source embeddings are the target embedding matrix (one vocabulary for
            both languages: the vocabulary sizes must be equal).
    """

    source_state_keys = ("src_mask", "cross_kv")
    groups_rows = True

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        hidden_size: int = 512,
        n_splits: int = 8,
        n_layers: int = 6,
        dropout: float = 0.1,
        tie_embeddings: bool = False,
        ffn_size: int | None = None,
        share_embeddings: bool = False,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        ffn_size = ffn_size or 4 * hidden_size
        self.src_emb = nn.Embedding(src_vocab_size, hidden_size, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(tgt_vocab_size, hidden_size, padding_idx=PAD)
        self.encoder = nn.ModuleList(EncoderBlock(hidden_size, n_splits, ffn_size, dropout) for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderBlock(hidden_size, n_splits, ffn_size, dropout) for _ in range(n_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(hidden_size), nn.LayerNorm(hidden_size)
        self.generator = nn.Linear(hidden_size, tgt_vocab_size)
        self.dropout = nn.Dropout(dropout)
        for emb in (self.src_emb, self.tgt_emb):
            # unit variance after the sqrt(hidden_size) scaling, like the position encodings
            nn.init.normal_(emb.weight, std=hidden_size**-0.5)
            nn.init.zeros_(emb.weight[PAD])
        self.share_weights(tie_embeddings, share_embeddings)

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        # |ids| = (batch_size, length) -> (batch_size, length, hidden_size)
        positions = torch.arange(start, start + ids.size(1), device=ids.device)
        x = emb(ids) * math.sqrt(self.hidden_size) + sinusoids(positions, self.hidden_size)
        return self.dropout(x)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, Any]:
        src_mask = (src != PAD)[:, None, None, :]  # |src_mask| = (batch_size, 1, 1, src_length)
        x = self._embed(self.src_emb, src)
        for block in self.encoder:
            x = block(x, src_mask)
        memory = self.encoder_norm(x)  # |memory| = (batch_size, src_length, hidden_size)
        n_splits = self.decoder[0].self_attn.n_splits
        empty = memory.new_zeros(src.size(0), n_splits, 0, self.hidden_size // n_splits)
        return {
            "src_mask": src_mask,
            # encoder keys/values, projected once for all steps and made contiguous once, so that no
            # step's product copies them: |k| = |v| = (batch_size, n_splits, src_length, head_size)
            "cross_kv": [tuple(x.contiguous() for x in block.cross_attn.project_kv(memory)) for block in self.decoder],
            # self-attention cache, one position longer each step, and its marks (append_to_cache)
            "self_kv": [(empty, empty) for _ in self.decoder],
            "self_kv_marks": [None for _ in self.decoder],
            "step": 0,
            # rows per source entry: repeat_state keeps the source entries once for n rows
            "group": 1,
        }

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor, within_sources: bool = False) -> dict[str, Any]:
        """As ``EncoderDecoder.reorder_state``; the cache gets room for the next step (``select_with_room``)."""
        rest = super().reorder_state({k: v for k, v in state.items() if k != "self_kv"}, index, within_sources)
        cache = [(select_with_room(k, index), select_with_room(v, index)) for k, v in state["self_kv"]]
        return dict(rest, self_kv=cache, self_kv_marks=[([0], 0) for _ in cache])

    def _run_decoder(self, x: torch.Tensor, state: dict[str, Any], causal: bool) -> tuple[torch.Tensor, dict]:
        """Run the decoder blocks over |x| = (batch_size, length, hidden_size) after the state's cached
        positions; returns the output and the state's cache entries with these positions added."""
        self_mask = None
        if causal:
            length = x.size(1)
            self_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        cache, marks = [], []
        for block, (k_cache, v_cache), mark, cross_kv in zip(
                self.decoder, state["self_kv"], state.get("self_kv_marks", [None] * len(self.decoder)),
                state["cross_kv"]):
            z = block.self_norm(x)
            k, v = block.self_attn.project_kv(z)
            if k_cache.size(2):
                k, v, mark = append_to_cache(k_cache, v_cache, k, v, mark)
            cache.append((k, v))
            marks.append(mark if k_cache.size(2) else None)
            x = block(x, z, (k, v), self_mask, cross_kv, state["src_mask"], state["group"])
        return self.decoder_norm(x), {"self_kv": cache, "self_kv_marks": marks}

    def decode_logits(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = self._embed(self.tgt_emb, y_prev[:, None], start=state["step"])  # (batch_size, 1, hidden_size)
        h, cache = self._run_decoder(x, state, causal=False)
        return self.generator(h.squeeze(1)), dict(state, **cache, step=state["step"] + 1)

    def decode_features(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        h, _ = self._run_decoder(self._embed(self.tgt_emb, tgt_in), state, causal=True)
        return h  # |h| = (batch_size, length, hidden_size)
