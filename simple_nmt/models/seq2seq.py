"""LSTM encoder-decoder with attention and input feeding (Luong et al., 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from simple_nmt.data import PAD
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.precision import compute_dtype, lstm_backend, lstm_precision


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
        share_embeddings: the source embeddings are the target embedding matrix (one vocabulary for
            both languages: the vocabulary sizes must be equal).
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
        share_embeddings: bool = False,
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
        self.share_weights(tie_embeddings, share_embeddings)
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

    def _step(self, emb: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One decoder step from the previous token's embedding |emb| = (batch_size, word_vec_size) up to
        the attentional hidden state h_tilde (batch_size, hidden_size)."""
        x = torch.cat([emb, state["h_tilde"].to(emb.dtype)], dim=-1).unsqueeze(1)
        hidden = (state["h"].transpose(0, 1).contiguous(), state["c"].transpose(0, 1).contiguous())
        with lstm_precision(), lstm_backend(x):
            out, (h, c) = self.decoder(x, hidden)  # |out| = (batch_size, 1, hidden_size)
        return self._attend(out.squeeze(1), dict(state, h=h.transpose(0, 1), c=c.transpose(0, 1)))

    def _attend(self, out: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Attention of the decoder's output |out| = (batch_size, hidden_size): h_tilde and the state with it."""
        # the rows of a source attend together to its one copy of the keys: |queries| = (sources, group, hidden_size)
        queries = out.view(-1, state["group"], out.size(1))
        scores = torch.bmm(queries, state["keys"].transpose(1, 2))  # |scores| = (sources, group, src_length)
        weights = scores.float().masked_fill(state["pad_mask"][:, None, :], float("-inf")).softmax(dim=-1)
        context = torch.bmm(weights.to(state["memory"].dtype), state["memory"]).view(out.size(0), -1)
        h_tilde = self.dropout(torch.tanh(self.concat(torch.cat([out, context.to(out.dtype)], -1))))
        return h_tilde, dict(state, h_tilde=h_tilde)

    def decode_logits(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        h_tilde, state = self._step(self.dropout(self.tgt_emb(y_prev)), state)
        return self.generator(h_tilde), state

    def decode_features(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        emb = self.dropout(self.tgt_emb(tgt_in))  # |emb| = (batch_size, length, word_vec_size)
        lstm = UnrolledLSTM(self.decoder, emb, state["h"], state["c"]) if unrolls(self.decoder, emb) else None
        outputs = []
        for t in range(tgt_in.size(1)):
            if lstm is None:
                h_tilde, state = self._step(emb[:, t], state)
            else:
                h_tilde, state = self._attend(lstm.step(t, state["h_tilde"]), state)
            outputs.append(h_tilde)
        return torch.stack(outputs, dim=1)  # |h_tilde| = (batch_size, length, hidden_size)


def unrolls(lstm: nn.Module, emb: torch.Tensor) -> bool:
    """Whether teacher forcing steps the decoder ``lstm`` by hand (``UnrolledLSTM``): where it records a
    graph on CPU under autocast in a type the CPU multiplies natively (``lstm_precision`` leaves that
    autocast on, so the hand-stepped LSTM runs under it as it is), for a plain ``nn.LSTM`` (biases, no
    projection). There it trains faster than one ``nn.LSTM`` call per step and saves less; in float32
    ATen's LSTM per step (``lstm_backend``) is as fast and saves less (``benchmarks/bench_rl_step.py``)."""
    plain = type(lstm) is nn.LSTM and lstm.bias and not lstm.proj_size and not lstm.bidirectional
    with lstm_precision():
        return plain and torch.is_grad_enabled() and emb.device.type == "cpu" and torch.is_autocast_enabled("cpu")


class UnrolledLSTM:
    """The decoder's ``nn.LSTM`` stepped by hand over teacher-forced inputs, with input feeding.

    The same function as one ``nn.LSTM`` call per step (its weights, its dropout between layers),
    computed so that a recorded graph trains faster on CPU: the embeddings' share of the first
    layer's gates is one product over all steps, and each step is one product per layer with the
    input and hidden weights side by side, made (and cast to the autocast type) once. oneDNN's LSTM
    backward, called once per step, took about twice as long (``torch.profiler``, bf16, 64 rows).
    The cell state stays float32 under autocast.

    Args:
        lstm: the decoder, whose first layer's input is [embedding; fed-back h_tilde].
        emb: |emb| = (batch_size, length, word_vec_size), the embedded decoder inputs.
        h, c: |h| = |c| = (batch_size, n_layers, hidden_size), the initial state.
    """

    def __init__(self, lstm: nn.LSTM, emb: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        dtype = compute_dtype(emb.device.type, lstm.weight_hh_l0.dtype)
        self.dropout = lstm.dropout if lstm.training else 0.0
        self.weights, self.biases = [], []
        for layer in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")  # |bias| = (4 * hidden,)
            if layer == 0:  # the embeddings' columns, for all steps at once: |gates_in[t]| = (batch_size, 4 * hidden)
                gates_in = torch.nn.functional.linear(emb.to(dtype), w_ih[:, :emb.size(2)].to(dtype), bias.to(dtype))
                self.gates_in = gates_in.unbind(1)  # one gradient for all steps, not a (batch, length, 4 * hidden) each
                w_ih, bias = w_ih[:, emb.size(2):], None
            self.weights.append(torch.cat([w_ih, w_hh], dim=1).to(dtype).t())  # (fed + hidden, 4 * hidden)
            self.biases.append(bias if bias is None else bias.to(dtype))
        self.cell_dtype = torch.promote_types(dtype, torch.float32)  # the cell state's and gates' type
        self.h, self.c = list(h.to(dtype).unbind(1)), list(c.to(self.cell_dtype).unbind(1))

    def step(self, t: int, fed: torch.Tensor) -> torch.Tensor:
        """Step ``t`` with the fed-back |fed| = (batch_size, hidden_size): the top layer's output, of the same size."""
        x = fed
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            xh = torch.cat([x.to(weight.dtype), self.h[layer]], dim=1)  # |xh| = (batch_size, fed + hidden)
            # |gates| = (batch_size, 4 * hidden), in nn.LSTM's order: input, forget, cell, output
            gates = self.gates_in[t] + xh @ weight if bias is None else torch.addmm(bias, xh, weight)
            i, f, g, o = gates.to(self.cell_dtype).chunk(4, dim=1)
            self.c[layer] = torch.sigmoid(f) * self.c[layer] + torch.sigmoid(i) * torch.tanh(g)
            self.h[layer] = x = (torch.sigmoid(o) * torch.tanh(self.c[layer])).to(weight.dtype)
            if layer < len(self.weights) - 1 and self.dropout > 0:  # nn.LSTM's dropout between layers
                x = torch.nn.functional.dropout(x, self.dropout)
        return x
