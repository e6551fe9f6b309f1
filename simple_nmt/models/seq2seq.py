"""LSTM encoder-decoder with attention and input feeding (Luong et al., 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from simple_nmt.data import PAD
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.precision import lstm_backend, lstm_precision


class Seq2Seq(EncoderDecoder):
    """Bidirectional LSTM encoder, LSTM decoder with input feeding and general attention.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        word_vec_size: embedding size.
        hidden_size: decoder size (each encoder direction has half of it).
        n_layers: LSTM layers of the encoder and of the decoder.
        dropout: between LSTM layers, on embeddings and on the attentional output.
        tie_embeddings: the output projection reuses the target embedding matrix
            (needs ``word_vec_size == hidden_size``).
    """

    source_state_keys = ("memory", "keys", "pad_mask")
    groups_rows = True

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        word_vec_size: int = 512,
        hidden_size: int = 768,
        n_layers: int = 4,
        dropout: float = 0.2,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        if hidden_size % 2:
            raise ValueError("--hidden_size must be even for the bidirectional encoder")
        if tie_embeddings and word_vec_size != hidden_size:
            raise ValueError(f"--tie_embeddings needs --word_vec_size ({word_vec_size}) equal to "
                             f"--hidden_size ({hidden_size})")
        self.n_layers, self.hidden_size = n_layers, hidden_size
        lstm_dropout = dropout if n_layers > 1 else 0.0
        self.src_emb = nn.Embedding(src_vocab_size, word_vec_size, padding_idx=PAD)
        self.tgt_emb = nn.Embedding(tgt_vocab_size, word_vec_size, padding_idx=PAD)
        self.encoder = nn.LSTM(word_vec_size, hidden_size // 2, n_layers, batch_first=True,
                               dropout=lstm_dropout, bidirectional=True)
        self.decoder = nn.LSTM(word_vec_size + hidden_size, hidden_size, n_layers, batch_first=True,
                               dropout=lstm_dropout)
        self.attn = nn.Linear(hidden_size, hidden_size, bias=False)
        self.concat = nn.Linear(2 * hidden_size, hidden_size)
        self.generator = nn.Linear(hidden_size, tgt_vocab_size)
        if tie_embeddings:
            self.generator.weight = self.tgt_emb.weight
        self.dropout = nn.Dropout(dropout)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, Any]:
        batch_size = src.size(0)
        x = self.dropout(self.src_emb(src))  # |x| = (batch_size, src_length, word_vec_size)
        packed = pack_padded_sequence(x, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        with lstm_precision(), lstm_backend(x):
            memory, (h, c) = self.encoder(packed)
        memory, _ = pad_packed_sequence(memory, batch_first=True, total_length=src.size(1))
        # |memory| = (batch_size, src_length, hidden_size)

        def merge_directions(s: torch.Tensor) -> torch.Tensor:
            # |s| = (n_layers * 2, batch_size, hidden_size / 2) -> (batch_size, n_layers, hidden_size)
            s = s.view(self.n_layers, 2, batch_size, self.hidden_size // 2)
            return s.permute(2, 0, 1, 3).reshape(batch_size, self.n_layers, self.hidden_size)

        return {
            "h": merge_directions(h),
            "c": merge_directions(c),
            "h_tilde": memory.new_zeros(batch_size, self.hidden_size),
            "memory": memory,
            "keys": self.attn(memory),  # projected once: |keys| = (batch_size, src_length, hidden_size)
            "pad_mask": src == PAD,  # |pad_mask| = (batch_size, src_length)
            "group": 1,  # rows per source entry: repeat_state keeps the source entries once for n rows
        }

    def _step(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One decoder step up to the attentional hidden state h_tilde (batch_size, hidden_size)."""
        emb = self.dropout(self.tgt_emb(y_prev))  # |emb| = (batch_size, word_vec_size)
        x = torch.cat([emb, state["h_tilde"].to(emb.dtype)], dim=-1).unsqueeze(1)
        hidden = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        with lstm_precision(), lstm_backend(x):
            out, (h, c) = self.decoder(x, hidden)  # |out| = (batch_size, 1, hidden_size)
        # the rows of a source attend together to its one copy of the keys: |queries| = (sources, group, hidden_size)
        queries = out.view(-1, state["group"], out.size(2))
        scores = torch.bmm(queries, state["keys"].transpose(1, 2))  # |scores| = (sources, group, src_length)
        weights = scores.float().masked_fill(state["pad_mask"][:, None, :], float("-inf")).softmax(dim=-1)
        context = torch.bmm(weights.to(state["memory"].dtype), state["memory"]).view(out.size(0), -1)
        h_tilde = self.dropout(torch.tanh(self.concat(torch.cat([out.squeeze(1), context.to(out.dtype)], -1))))
        new_state = dict(state, h=h.transpose(0, 1), c=c.transpose(0, 1), h_tilde=h_tilde)
        return h_tilde, new_state

    def decode_step(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        h_tilde, state = self._step(y_prev, state)
        return self.generator(h_tilde).float().log_softmax(dim=-1), state

    def decode_features(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        outputs = []
        for t in range(tgt_in.size(1)):
            h_tilde, state = self._step(tgt_in[:, t], state)
            outputs.append(h_tilde)
        return torch.stack(outputs, dim=1)  # |h_tilde| = (batch_size, length, hidden_size)
