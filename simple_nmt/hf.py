"""Hugging Face encoder-decoders (Marian, T5, mBART, NLLB, ...) behind the library's model interface.

``HuggingFaceModel`` presents an ``AutoModelForSeq2SeqLM`` as an ``EncoderDecoder``: ``encode``,
``decode_logits`` (and so ``decode_step``) with the model's own key/value cache, ``decode`` for
teacher forcing and the batch reordering of beam search and K samples. ``simple_nmt.search``, the
MLE engine and the RL engine then run on it unchanged.

The model's ids are used as they are. The adapter declares them as ``special_ids`` (Marian: EOS 0,
PAD last and decoding from PAD; T5: PAD 0, EOS 1, decoding from PAD), which collate, the searches,
the rewards and the losses read. A model that forces a target-language token after its decoder
start (mBART-50, NLLB) has that token as its BOS: the adapter feeds the decoder start before it, so
that the searches start from the language token like any other BOS and never emit it.

Optional: ``pip install -e .[hf]``. This module imports ``transformers`` only when it is used.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from simple_nmt.data import SpecialIds, collate, content_ids
from simple_nmt.models.base import EncoderDecoder
from simple_nmt.search import select_state, take_rows


class HuggingFaceError(ValueError):
    """A Hugging Face model or tokenizer that cannot be used; the message is one line naming it."""


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise HuggingFaceError("Hugging Face models need transformers: pip install -e .[hf]") from None
    return transformers


def _copied_layers(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
    """A copy of a ``DynamicCache`` with layer objects of its own (so that updating it leaves ``cache`` as it
    is), each layer's keys and values mapped by ``fn`` (kept as they are without one)."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if fn is not None:
        for layer in new.layers:
            if layer.is_initialized and layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
    return new


def _copied_cache(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  cross: bool = True) -> Any:
    """A copy of an ``EncoderDecoderCache``: ``fn`` maps the self-attention keys and values, and the
    cross-attention ones when ``cross``."""
    new = copy.copy(cache)
    new.self_attention_cache = _copied_layers(cache.self_attention_cache, fn)
    new.cross_attention_cache = _copied_layers(cache.cross_attention_cache, fn if cross else None)
    new.is_updated = dict(cache.is_updated)
    return new


class HuggingFaceModel(EncoderDecoder):
    """An ``AutoModelForSeq2SeqLM`` with the library's model interface.

    The decoder state is ``{"encoder_hidden", "attention_mask", "cache"}``: the encoder output
    (batch_size, src_length, hidden), its mask, and the model's ``EncoderDecoderCache`` (None before
    the first step). A step never changes the state it is given (its cache gets layer objects of its
    own; the tensors are new anyway), so that a state can be decoded twice, as the built-in models'.

    Args:
        model: a ``transformers`` encoder-decoder (``AutoModelForSeq2SeqLM``).
        tokenizer: its tokenizer (optional): gives the UNK id, the target-language token and
            ``translate``.
        tgt_lang: the target-language token the decoder starts with (mBART-50, NLLB: e.g.
            ``de_DE``, ``deu_Latn``); by default the model's ``forced_bos_token_id``, if any.
    """

    source_state_keys = ("encoder_hidden", "attention_mask")

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, tgt_lang: str | None = None):
        super().__init__()
        self.hf, self.tokenizer = model, tokenizer
        # what save_pretrained leaves out is rebuilt at load (Marian's sinusoidal positions, which
        # from_pretrained makes trainable): frozen, so that training never changes what a saved folder loses
        unsaved = getattr(model, "_keys_to_ignore_on_save", None) or []
        for name, param in model.named_parameters():
            if any(re.search(pattern, name) for pattern in unsaved):
                param.requires_grad_(False)
        config, generation = model.config, getattr(model, "generation_config", None)
        name = type(model).__name__
        pad, eos, start = config.pad_token_id, config.eos_token_id, config.decoder_start_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if start is None and generation is not None:
            start = generation.decoder_start_token_id
        if pad is None or eos is None or start is None:
            raise HuggingFaceError(f"{name}: its config lacks pad_token_id, eos_token_id or decoder_start_token_id")
        forced = getattr(generation, "forced_bos_token_id", None)
        if forced is None:  # id 0 is a token (BART's <s>)
            forced = getattr(config, "forced_bos_token_id", None)
        if tgt_lang is not None:
            if tokenizer is None:
                raise HuggingFaceError(f"tgt_lang {tgt_lang!r} needs the model's tokenizer")
            forced = tokenizer.convert_tokens_to_ids(tgt_lang)
            if forced is None or forced == tokenizer.unk_token_id:
                raise HuggingFaceError(f"tgt_lang {tgt_lang!r} is not a token of the tokenizer")
        # the decoder's first input: the forced language token (after the start token), else the start token
        bos, prefix = (forced, [start]) if forced is not None else (start, [])
        if bos == eos:
            raise HuggingFaceError(f"{name} starts decoding from its EOS id {eos} and forces no first token: "
                                   "give tgt_lang (the target-language token)")
        unk = getattr(tokenizer, "unk_token_id", None)
        self.special_ids = SpecialIds(pad=pad, unk=pad if unk is None else unk, bos=bos, eos=eos)
        self.register_buffer("prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self._files: dict[str, bytes] | None = None  # checkpoint_meta's, made once

    @classmethod
    def from_pretrained(cls, path: str | Path, tgt_lang: str | None = None) -> HuggingFaceModel:
        """The model and tokenizer saved with ``save_pretrained`` in the local folder ``path`` (or in the
        local Hugging Face cache under that name). Nothing is downloaded."""
        transformers = require_transformers()
        try:
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(path), local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HuggingFaceError(f"--hf_model {path}: not a local Hugging Face model folder (nothing is "
                                   f"downloaded): {detail}") from None
        return cls(model, tokenizer, tgt_lang=tgt_lang)

    @classmethod
    def from_checkpoint_meta(cls, files: dict[str, bytes], tgt_lang: str | None = None) -> HuggingFaceModel:
        """The model (with fresh weights: load the checkpoint's after) and tokenizer of the files that
        ``checkpoint_meta`` stored: its config, generation config and tokenizer."""
        transformers = require_transformers()
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                (Path(folder) / Path(name).name).write_bytes(data)
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForSeq2SeqLM.from_config(config)
            if "generation_config.json" in files:
                model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(model, tokenizer, tgt_lang=tgt_lang)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a library checkpoint keeps to rebuild this model without its folder: ``{"hf": {file name:
        bytes}}``, the model's config, generation config and tokenizer files (the weights are the
        checkpoint's own)."""
        if self._files is None:
            with tempfile.TemporaryDirectory() as folder:
                self.hf.config.save_pretrained(folder)
                self.hf.generation_config.save_pretrained(folder)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(folder)
                self._files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return {"hf": self._files}

    def fields(self) -> tuple[HuggingFaceText, HuggingFaceText]:
        """The source and target sides of the tokenizer, as the CLI's data and validation read them."""
        if self.tokenizer is None:
            raise HuggingFaceError(f"{type(self.hf).__name__}: reading text needs the model's tokenizer")
        return (HuggingFaceText(self.tokenizer, self.special_ids, target=False),
                HuggingFaceText(self.tokenizer, self.special_ids, target=True))

    def save_pretrained(self, path: str | Path) -> None:
        """Write the model (and tokenizer) with ``save_pretrained`` to the folder ``path``, which plain
        ``transformers`` loads back. Written beside it first and then renamed: a partial folder never
        replaces a complete one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.hf.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _with_prefix(self, tgt_in: torch.Tensor) -> torch.Tensor:
        """|tgt_in| = (batch_size, length) after the decoder start token(s) the BOS follows."""
        if not len(self.prefix):
            return tgt_in
        return torch.cat([self.prefix.expand(tgt_in.size(0), -1), tgt_in], dim=1)

    def _decoder(self, tgt_in: torch.Tensor, state: dict[str, Any], cache: Any = None) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        return self.hf(encoder_outputs=BaseModelOutput(last_hidden_state=state["encoder_hidden"]),
                       attention_mask=state["attention_mask"], decoder_input_ids=tgt_in, cache=cache,
                       use_cache=cache is not None)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, Any]:
        """|src| = (batch_size, src_length), padded after ``src_lengths`` -> the decoder state."""
        mask = (torch.arange(src.size(1), device=src.device)[None, :]
                < src_lengths.to(src.device)[:, None]).long()  # |mask| = (batch_size, src_length)
        hidden = self.hf.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
        return {"encoder_hidden": hidden, "attention_mask": mask, "cache": None}

    def decode_logits(self, y_prev: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """|y_prev| = (batch_size,) -> logits (batch_size, vocab_size), the state one token further (``decode_step``
        makes them float32 log-probs: under CPU autocast T5's are bf16)."""
        from transformers import DynamicCache, EncoderDecoderCache

        cache = state["cache"]
        if cache is None:  # the first step: the decoder start token(s) and BOS
            cache, tgt_in = EncoderDecoderCache(DynamicCache(), DynamicCache()), self._with_prefix(y_prev[:, None])
        else:
            cache, tgt_in = _copied_cache(cache), y_prev[:, None]
        out = self._decoder(tgt_in, state, cache)
        return out.logits[:, -1], {**state, "cache": out.cache}

    def reorder_state(self, state: dict[str, Any], index: torch.Tensor, within_sources: bool = False
                      ) -> dict[str, Any]:
        """The state's batch rows ``index``; ``within_sources`` keeps the source-only entries (the encoder
        output, its mask and the cross-attention cache) as they are."""
        rest = select_state({k: v for k, v in state.items() if k != "cache"}, index,
                            same=self.source_state_keys if within_sources else ())
        cache = state["cache"]
        if cache is not None:
            cache = _copied_cache(cache, lambda x: take_rows(x, index), cross=not within_sources)
        return {**rest, "cache": cache}

    def decode(self, tgt_in: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Teacher forcing: |tgt_in| = (batch_size, length), BOS first -> logits (batch_size, length, vocab_size)."""
        return self._decoder(self._with_prefix(tgt_in), state).logits[:, len(self.prefix):]

    @property
    def longest_output(self) -> int:
        """The most tokens the decoder takes: its position embeddings' (Marian, mBART), else 1024 (T5)."""
        positions = getattr(self.hf.config, "max_position_embeddings", None) or 1024
        return positions - len(self.prefix)

    def translate(self, lines: Sequence[str], beam_size: int = 5, max_length: int | None = None,
                  length_penalty: float = 1.0) -> list[str]:
        """Translate raw text lines with ``batch_beam_search`` (needs the tokenizer); ``max_length``
        defaults to ``min(255, longest_output)``."""
        max_length = max_length or min(255, self.longest_output)
        src_field, tgt_field = self.fields()
        batch = collate([(0, src_field.to_ids(line), []) for line in lines], self.special_ids)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            hyps, _ = self.batch_beam_search(batch["src"].to(device), batch["src_lengths"].to(device),
                                             beam_size=beam_size, max_length=max_length,
                                             length_penalty=length_penalty)
        finally:
            self.train(was_training)
        return [tgt_field.to_text(per_source[0]) for per_source in hyps]


class HuggingFaceText:
    """One side's way from a line to ids and back through a Hugging Face tokenizer (``TextField``'s
    ``to_ids`` / ``to_text`` / ``reference``).

    A source line gets the tokenizer's special tokens (EOS, the source-language token); a target line
    gets none: collate adds BOS and EOS.
    """

    def __init__(self, tokenizer: Any, special_ids: SpecialIds, target: bool):
        self.tokenizer, self.special_ids, self.target = tokenizer, special_ids, target

    def to_ids(self, line: str) -> list[int]:
        """The ids of a line (a target's without BOS / EOS); none for a line without text, as the library's
        tokenizers give (the tokenizer's special tokens alone would make it a sentence to translate)."""
        if not line.strip():
            return []
        if self.target:
            return self.tokenizer(text_target=line, add_special_tokens=False)["input_ids"]
        return self.tokenizer(line)["input_ids"]

    def to_text(self, ids: Sequence[int]) -> str:
        """The text of ids up to the first EOS, without PAD, BOS and the tokenizer's special tokens."""
        return self.tokenizer.decode(content_ids(ids, self.special_ids), skip_special_tokens=True).strip()

    def reference(self, line: str) -> str:
        """The line as validation BLEU scores it: as it is."""
        return line

    def stored(self) -> tuple[list[str], None]:
        """What a checkpoint keeps of this side: nothing (the tokenizer is in the model's ``checkpoint_meta``)."""
        return [], None

    def __len__(self) -> int:
        return len(self.tokenizer)
