"""The model factory used by training, fine-tuning and translation alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from simple_nmt.config import Config, as_config
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.models.seq2seq import Seq2Seq
from simple_nmt.models.transformer import Transformer

__all__ = ["EncoderDecoder", "Seq2Seq", "Transformer", "build_model"]


def build_model(config: Config | Mapping[str, Any], src_vocab_size: int, tgt_vocab_size: int) -> EncoderDecoder:
    """Build a ``Transformer`` if ``config.use_transformer`` else a ``Seq2Seq``.

    Args:
        config: a ``Config``, or a mapping of option names (the rest take their defaults); read:
            ``word_vec_size``, ``hidden_size``, ``n_layers``, ``n_splits``, ``dropout``,
            ``use_transformer``, ``tie_embeddings``, ``ffn_size``, ``joint_vocab`` (the source embeddings
            are the target ones).
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
    """
    c = as_config(config)
    if c.use_transformer:
        return Transformer(src_vocab_size, tgt_vocab_size, hidden_size=c.hidden_size, n_splits=c.n_splits,
                           n_layers=c.n_layers, dropout=c.dropout, tie_embeddings=c.tie_embeddings,
                           ffn_size=c.ffn_size or None, share_embeddings=c.joint_vocab)
    return Seq2Seq(src_vocab_size, tgt_vocab_size, word_vec_size=c.word_vec_size, hidden_size=c.hidden_size,
                   n_layers=c.n_layers, dropout=c.dropout, tie_embeddings=c.tie_embeddings,
                   share_embeddings=c.joint_vocab)
