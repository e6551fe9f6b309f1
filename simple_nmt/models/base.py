"""What every encoder-decoder offers: teacher forcing, one decoding step, search."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from simple_nmt import search as decoding


class EncoderDecoder(nn.Module):
    """Base class of the models: subclasses define ``encode``, ``decode_logits`` (or ``decode_step``) and
    ``decode_features`` (or ``decode``).

    ``forward`` (teacher forcing) is ``decode`` on ``encode``'s state, so that the RL
    engine can encode a source once and decode its K + 1 samples from that state.
    ``search`` and ``batch_beam_search`` are written once, in ``simple_nmt.search``,
    over the step interface; a research model gets them by subclassing this.
    """

    # entries of the decoder state that depend on the source only, the same for all its hypotheses:
    # beam search, which reorders hypotheses only among those of one source, leaves them as they are
    source_state_keys: tuple[str, ...] = ()
    # True: decode_step reads those entries once per source for state["group"] consecutive rows, so that
    # repeat_state (samples, beams) keeps one copy per source instead of one per row
    groups_rows: bool = False

    def share_weights(self, tie_embeddings: bool, share_embeddings: bool) -> None:
        """Make the output projection ``generator`` the target embeddings ``tgt_emb`` (``tie_embeddings``)
        and the source embeddings ``src_emb`` the target ones (``share_embeddings``: a joint vocabulary),
        as the models' constructors ask."""
        if tie_embeddings:
            self.generator.weight = self.tgt_emb.weight
        if share_embeddings:
            if self.src_emb.num_embeddings != self.tgt_emb.num_embeddings:
                raise ValueError(f"shared source and target embeddings need one vocabulary, got sizes "
                                 f"{self.src_emb.num_embeddings} and {self.tgt_emb.num_embeddings}")
            self.src_emb.weight = self.tgt_emb.weight

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, Any]:
        """Encode |src| = (batch_size, src_length) into a decoder state (batch first)."""
        raise NotImplementedError

    def decode_logits(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One step: |y_prev| = (batch_size,) -> logits (batch_size, vocab_size), new state."""
        raise NotImplementedError(f"{type(self).__name__} defines neither decode_logits nor decode_step")

    def decode_step(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One step: |y_prev| = (batch_size,) -> float32 log-probs (batch_size, vocab_size), new state: by
        default the log-softmax of ``decode_logits``."""
        logits, state = self.decode_logits(y_prev, state)
        return decoding.float_log_softmax(logits), state

    def decode_scores(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One step's scores over the vocabulary for a search that needs the log-probs of the tokens it
        picks only (greedy decoding, sampling): ``decode_logits`` where ``decode_step`` is the default
        one that normalises them, so that the search normalises only what it needs, else ``decode_step``
        (a subclass's or an instance's own; log-probs are logits too)."""
        if getattr(self.decode_step, "__func__", None) is EncoderDecoder.decode_step:
            return self.decode_logits(y_prev, state)
        return self.decode_step(y_prev, state)

    def repeat_state(self, state: dict[str, Any], n: int) -> dict[str, Any]:
        """Each batch row's state ``n`` times (rows i*n .. i*n + n - 1 decode source i): samples, beams.
        With ``groups_rows`` the source entries stay one per source, for ``state["group"]`` rows each."""
        if not self.groups_rows:
            return decoding.repeat_state(state, n)
        rest = decoding.repeat_state({k: v for k, v in state.items() if k not in self.source_state_keys}, n)
        return dict(rest, **{k: state[k] for k in self.source_state_keys}, group=state["group"] * n)

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor, within_sources: bool = False) -> dict[str, Any]:
        """The state's batch rows ``index`` (search ends rows that are done, beam search reorders hypotheses).

        Args:
            within_sources: ``index`` reorders only the rows of each source among themselves: the
                ``source_state_keys`` entries, equal for those rows, are kept as they are (one per row,
                or with ``groups_rows`` one per source). Reordering across sources keeps one copy of
                those entries per source where ``index`` takes whole sources, all their rows in order
                (beam search stops decoding sources that have ended), and else gives each kept row
                its own copy (group 1).
        """
        if within_sources or not self.groups_rows:
            return decoding.select_state(state, index, same=self.source_state_keys if within_sources else ())
        group = state["group"]
        sources = index[::group] // group  # the sources of index, if it takes them whole
        whole = len(index) % group == 0 and torch.equal(
            index, (sources[:, None] * group + torch.arange(group, device=index.device)).view(-1))
        if not whole:
            sources, group = index // group, 1
        rest = decoding.select_state({k: v for k, v in state.items() if k not in self.source_state_keys}, index)
        return dict(rest, **{k: decoding.select_state(state[k], sources) for k in self.source_state_keys},
                    group=group)

    def decode_features(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Teacher forcing from ``encode``'s state up to the output layer ``self.generator``.

        |tgt_in| = (batch_size, length) -> (batch_size, length, hidden_size).
        """
        raise NotImplementedError

    def decode(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Teacher forcing from ``encode``'s state: ``self.generator`` on ``decode_features``.

        |tgt_in| = (batch_size, length) -> logits (batch_size, length, vocab_size). A subclass
        defines ``decode_features`` (the RL engine then never holds these logits whole), or this.
        """
        return self.generator(self.decode_features(tgt_in, state)).float()

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                normalize: bool = True) -> torch.Tensor:
        """Teacher forcing: |tgt_in| = (batch_size, length) -> log-probs (batch_size, length, vocab_size).

        ``normalize=False`` returns the logits instead.
        """
        logits = self.decode(tgt_in, self.encode(src, src_lengths))
        return logits.log_softmax(dim=-1) if normalize else logits

    def search(
        self,
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
        """Greedy decoding or sampling; see ``simple_nmt.search.sample_search``."""
        return decoding.sample_search(
            self, src, src_lengths, is_greedy=is_greedy, max_length=max_length,
            temperature=temperature, top_k=top_k, top_p=top_p, n_samples=n_samples, epsilon=epsilon,
        )

    def batch_beam_search(
        self,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        beam_size: int = 5,
        max_length: int = 255,
        max_length_ratio: float = 0.0,
        length_penalty: float = 1.0,
        n_best: int = 1,
    ) -> tuple[list[list[list[int]]], torch.Tensor]:
        """Beam search over the whole batch; see ``simple_nmt.search.beam_search``.

        Returns:
            Each source's ``n_best`` hypotheses as id lists, best first, ending with EOS unless cut at
            the length limit (as ``search``'s rows), and their scores (batch_size, n_best).
        """
        return decoding.beam_search(
            self, src, src_lengths, beam_size=beam_size, max_length=max_length,
            max_length_ratio=max_length_ratio, length_penalty_alpha=length_penalty, n_best=n_best,
        )
