"""Export to CTranslate2, the inference engine translation models are deployed with, and translation through it.

``export`` writes the Transformer of a checkpoint (through CTranslate2's own spec API) or a Hugging Face
model (through CTranslate2's own ``TransformersConverter``) to a folder that plain
``ctranslate2.Translator(folder)`` loads, with what the library reads text with beside it: the
SentencePiece models (``source.spm``, ``target.spm``) if the checkpoint has them (the vocabularies are
CTranslate2's own files), or a Hugging Face tokenizer (``hf_tokenizer/``), and ``simple_nmt.json``.
``load_ctranslate2`` reads such a folder back as a ``LoadedModel`` whose ``translate`` is translate.py's
(``--ctranslate2 DIR``): the same lines, batches, truncation, n-best lists and empty lines, through
``translate_lines`` and ``CTranslate2Model.batch_beam_search``.

Optional: ``pip install -e .[ct2]``. This module imports ``ctranslate2`` only when it is used.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simple_nmt.config import Config
from simple_nmt.data import SentencePieceTokenizer, SpecialIds, TextField, Tokenizer, Vocab
from simple_nmt.hf import HuggingFaceModel, HuggingFaceText, require_transformers
from simple_nmt.loading import LoadedModel, load
from simple_nmt.models import Transformer
from simple_nmt.models.transformer import sinusoids
from simple_nmt.precision import PrecisionError, resolve_precision
from simple_nmt.search import length_penalty as gnmt_penalty
from simple_nmt.search import never_emitted, special_ids

METADATA = "simple_nmt.json"  # what the library needs beside CTranslate2's own files
SPM_FILES = {"src": "source.spm", "tgt": "target.spm"}
HF_TOKENIZER = "hf_tokenizer"
# --precision -> CTranslate2's compute type (auto: the type the model was exported with)
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CTranslate2Error(ValueError):
    """A model that cannot be exported, or a folder that cannot be translated with; one line naming it."""


def require_ctranslate2() -> Any:
    """The ``ctranslate2`` module, or a one-line error saying how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise CTranslate2Error("CTranslate2 models need ctranslate2: pip install -e .[ct2]") from None
    return ctranslate2


def _weights(*tensors: torch.Tensor) -> torch.Tensor:
    """The tensors as one float32 tensor, concatenated along their first dimension (fused projections)."""
    return torch.cat([t.detach().float().cpu() for t in tensors])


def _set_linear(spec: Any, *layers: nn.Linear) -> None:
    """A CTranslate2 linear layer from ``layers``, their outputs concatenated (q, k, v fused into one)."""
    spec.weight = _weights(*(layer.weight for layer in layers))
    spec.bias = _weights(*(layer.bias for layer in layers))


def _set_norm(spec: Any, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _weights(norm.weight), _weights(norm.bias)


def _set_ffn(spec: Any, norm: nn.LayerNorm, ffn: nn.Sequential) -> None:
    """The pre-norm feed-forward block: ``ffn`` is Linear, ReLU, Dropout, Linear."""
    _set_norm(spec.layer_norm, norm)
    _set_linear(spec.linear_0, ffn[0])
    _set_linear(spec.linear_1, ffn[3])


def transformer_spec(model: Transformer, fields: tuple[TextField, TextField], max_positions: int) -> Any:
    """The ``ctranslate2.specs.TransformerSpec`` of the library's pre-LN Transformer, its weights set.

    The embeddings are scaled by sqrt(hidden_size) as the model scales them; the model's sinusoidal
    positions (sin and cos interleaved, not CTranslate2's halves) are given as a table of ``max_positions``
    rows; each sublayer's LayerNorm comes before it, and the encoder and decoder end with one; the
    self-attention's query and key/value projections are fused into one, the cross-attention's key/value
    projection is the model's own; a tied output projection is the target embedding matrix (CTranslate2
    stores it once).

    Args:
        fields: the source and target fields, whose vocabularies the spec registers.
        max_positions: the longest input and output the exported model translates.
    """
    specs = require_ctranslate2().specs
    heads = model.encoder[0].attn.n_splits
    spec = specs.TransformerSpec.from_config((len(model.encoder), len(model.decoder)), heads, pre_norm=True,
                                             activation=specs.Activation.RELU)
    spec.config.layer_norm_epsilon = model.encoder_norm.eps
    positions = sinusoids(torch.arange(max_positions), model.hidden_size)  # |positions| = (max_positions, hidden)
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _weights(model.src_emb.weight)
    encoder.position_encodings.encodings = positions
    _set_norm(encoder.layer_norm, model.encoder_norm)
    for layer, block in zip(encoder.layer, model.encoder):
        _set_norm(layer.self_attention.layer_norm, block.attn_norm)
        _set_linear(layer.self_attention.linear[0], block.attn.q, block.attn.kv)
        _set_linear(layer.self_attention.linear[1], block.attn.out)
        _set_ffn(layer.ffn, block.ffn_norm, block.ffn)
    decoder.embeddings.weight = _weights(model.tgt_emb.weight)
    decoder.position_encodings.encodings = positions
    _set_norm(decoder.layer_norm, model.decoder_norm)
    _set_linear(decoder.projection, model.generator)
    for layer, block in zip(decoder.layer, model.decoder):
        _set_norm(layer.self_attention.layer_norm, block.self_norm)
        _set_linear(layer.self_attention.linear[0], block.self_attn.q, block.self_attn.kv)
        _set_linear(layer.self_attention.linear[1], block.self_attn.out)
        _set_norm(layer.attention.layer_norm, block.cross_norm)
        _set_linear(layer.attention.linear[0], block.cross_attn.q)
        _set_linear(layer.attention.linear[1], block.cross_attn.kv)
        _set_linear(layer.attention.linear[2], block.cross_attn.out)
        _set_ffn(layer.ffn, block.ffn_norm, block.ffn)
    spec.register_source_vocabulary(fields[0].vocab.itos)
    spec.register_target_vocabulary(fields[1].vocab.itos)
    return spec


def _converter(make_spec: Callable[[], Any]) -> Any:
    """A ``ctranslate2.converters.Converter`` whose model is the spec ``make_spec`` returns."""
    converters = require_ctranslate2().converters

    class SpecConverter(converters.Converter):
        def _load(self) -> Any:
            return make_spec()

    return SpecConverter()


def export(source: str | Path, output_dir: str | Path, quantization: str | None = None, max_positions: int = 1024,
           force: bool = False) -> Path:
    """Write the model of a checkpoint or of a Hugging Face model folder as a CTranslate2 model folder.

    The folder is written beside ``output_dir`` and then renamed: a failed export leaves nothing.

    Args:
        source: a checkpoint of the library (a Transformer, or a Hugging Face model fine-tuned by it), or a
            local Hugging Face model folder (as ``simple_nmt.load`` reads them).
        output_dir: the folder to write.
        quantization: the weights' type (``int8``, ``int8_float32``, ``bfloat16``, ...; None: as stored).
        max_positions: the longest input and output of an exported Transformer (a Hugging Face model keeps
            its own position limit).
        force: replace ``output_dir`` if it exists.

    Raises:
        CTranslate2Error: a model CTranslate2 cannot express (the LSTM Seq2Seq, a model that forces a
            target-language token), or an ``output_dir`` that exists without ``force``.
        CheckpointError, HuggingFaceError: a source that does not load.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise CTranslate2Error(f"--output_dir {output_dir} exists: give --force to replace it")
    ct2 = require_ctranslate2()
    loaded = load(source)
    model = loaded.model
    if isinstance(model, HuggingFaceModel):
        if len(model.prefix):
            raise CTranslate2Error(f"{source}: {type(model.hf).__name__} starts its output with a forced token "
                                   "(a target language), which this export does not pass to CTranslate2")
        max_positions = model.longest_output
    elif not isinstance(model, Transformer):
        raise CTranslate2Error(f"{source}: a {type(model).__name__} (LSTM) model cannot be exported: CTranslate2 "
                               "runs Transformers")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.", dir=output_dir.parent) as tmp:
        folder = Path(tmp) / "model"
        if isinstance(model, HuggingFaceModel):
            model.save_pretrained(Path(tmp) / "hf")
            converter = ct2.converters.TransformersConverter(str(Path(tmp) / "hf"))
        else:
            converter = _converter(lambda: transformer_spec(model, (loaded.src_field, loaded.tgt_field),
                                                            max_positions))
        try:
            converter.convert(str(folder), quantization=quantization)
        except (ValueError, NotImplementedError) as e:
            raise CTranslate2Error(f"{source}: CTranslate2 cannot convert it ({str(e).strip().splitlines()[0]})"
                                   ) from None
        if isinstance(model, HuggingFaceModel):
            model.tokenizer.save_pretrained(folder / HF_TOKENIZER)
        for side, field in zip(("src", "tgt"), (loaded.src_field, loaded.tgt_field)):
            _, spm = field.stored()
            if spm:
                (folder / SPM_FILES[side]).write_bytes(spm)
        (folder / METADATA).write_text(json.dumps({
            "hugging_face": isinstance(model, HuggingFaceModel),
            "special_ids": dataclasses.asdict(special_ids(model)),
            "max_positions": max_positions,
            "config": loaded.config.to_dict(),
        }, indent=1), encoding="utf-8")
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        folder.replace(output_dir)
    return output_dir


def _vocabulary(folder: Path, side: str) -> list[str]:
    """The tokens of CTranslate2's ``source`` or ``target`` vocabulary file (or its shared one), in id order."""
    path = folder / f"{side}_vocabulary.json"
    return json.loads((path if path.exists() else folder / "shared_vocabulary.json").read_text(encoding="utf-8"))


class CTranslate2Model:
    """A ``ctranslate2.Translator`` behind the model interface's ``batch_beam_search``, on the ids of the
    library's fields (mapped to and from CTranslate2's token strings through its vocabularies).

    Beam search ranks the finished hypotheses as the library does, by their log-probability divided by
    GNMT's ((5 + |y|) / 6) ** alpha with EOS counted (CTranslate2 divides by |y| ** alpha): CTranslate2
    returns every hypothesis it finished, with its log-probability over its length, and they are ranked
    again. The search itself is CTranslate2's, which replaces a finished hypothesis by the next best one
    and stops when ``patience`` x ``beam_size`` have finished (the library's keeps finished hypotheses in
    the beam until all have finished): a beam output may differ where two hypotheses are close (1.5 made
    CTranslate2's outputs nearest the library's, docs/ctranslate2.md). Greedy decoding (``beam_size`` 1)
    is the same. PAD and BOS are never emitted (as in the library's searches), by suppressing them before
    the softmax (the library sets their log-probs to -inf after it): a step's log-probs then differ by the
    probability the model gives them, about 0 for a trained one.

    Args:
        translator: the ``ctranslate2.Translator`` of an exported folder.
        src_tokens, tgt_tokens: CTranslate2's source and target vocabularies, in id order.
        special_ids: the model's special ids (the library's 0..3, or a Hugging Face model's).
        max_positions: the longest input and output the model encodes.
        patience: beam search ends when this many times ``beam_size`` hypotheses have finished (with a length
            penalty; without one, when the best hypothesis has finished).
    """

    def __init__(self, translator: Any, src_tokens: list[str], tgt_tokens: list[str], special_ids: SpecialIds,
                 max_positions: int, patience: float = 1.5):
        self.translator, self.src_tokens, self.special_ids = translator, src_tokens, special_ids
        self.patience = patience
        self.tgt_ids = {token: i for i, token in enumerate(tgt_tokens)}
        self.max_positions = max_positions
        # the tokens no output has (a Hugging Face Marian model's PAD is not in CTranslate2's vocabulary)
        self.suppressed = [[tgt_tokens[i]] for i in never_emitted(special_ids) if i < len(tgt_tokens)]

    def eval(self) -> CTranslate2Model:
        """As ``nn.Module.eval``: a CTranslate2 model only translates."""
        return self

    def search(self, *args: Any, **kwargs: Any) -> None:
        """Sampling (``--mbr``) is the model's own search: refused."""
        raise CTranslate2Error("a CTranslate2 model translates by beam search: sample (--mbr) with the checkpoint")

    def batch_beam_search(self, src: torch.Tensor, src_lengths: torch.Tensor, beam_size: int = 5,
                          max_length: int = 255, max_length_ratio: float = 0.0, length_penalty: float = 1.0,
                          n_best: int = 1) -> tuple[list[list[list[int]]], torch.Tensor]:
        """``EncoderDecoder.batch_beam_search`` through CTranslate2 (see the class).

        Args:
            src: |src| = (batch_size, src_length), padded after ``src_lengths``.
            src_lengths: |src_lengths| = (batch_size,).
            max_length: the most output tokens (EOS included).
            max_length_ratio: if > 0, also at most ceil(ratio * source length) + 1 tokens.
            length_penalty: GNMT's alpha (0: rank by log-probability).
            n_best: hypotheses returned per source (at most ``beam_size``).

        Returns:
            For each source, its ``n_best`` hypotheses as id lists, best first, each ending with EOS unless cut
            at the length limit, and their scores, |scores| = (batch_size, n_best).

        Raises:
            CTranslate2Error: a ``max_length`` beyond the positions the model encodes.
        """
        if max_length > self.max_positions:
            raise CTranslate2Error(f"--max_length {max_length}: the CTranslate2 model encodes "
                                   f"{self.max_positions} positions (export it with --max_positions {max_length})")
        tokens = [[self.src_tokens[i] for i in row[:n]] for row, n in zip(src.tolist(), src_lengths.tolist())]
        limits = torch.full_like(src_lengths, max_length)
        if max_length_ratio > 0:
            limits = torch.minimum(limits, torch.ceil(src_lengths.float() * max_length_ratio).long() + 1)
        n_best = min(n_best, beam_size)
        # CTranslate2 divides a finished hypothesis's log-prob by its length (EOS counted: return_end_token),
        # undone here before GNMT's penalty; without a penalty it stops once the best hypothesis has ended
        by_length = 1.0 if length_penalty > 0 and beam_size > 1 else 0.0
        candidates = int(beam_size * self.patience + 0.5) if by_length else n_best  # as CTranslate2 rounds it
        hyps: list[list[list[int]]] = [[] for _ in tokens]
        scores = torch.zeros(len(tokens), n_best)
        for limit in sorted(set(limits.tolist())):  # one call per output limit (one without --max_length_ratio)
            rows = [i for i, n in enumerate(limits.tolist()) if n == limit]
            results = self.translator.translate_batch(
                [tokens[i] for i in rows], beam_size=beam_size, patience=self.patience, num_hypotheses=candidates,
                length_penalty=by_length, max_decoding_length=limit, min_decoding_length=0, max_input_length=0,
                return_scores=True, return_end_token=True, suppress_sequences=self.suppressed or None)
            for i, result in zip(rows, results):
                lengths = torch.tensor([len(h) for h in result.hypotheses])  # |lengths| = (hypotheses,)
                log_probs = torch.tensor(result.scores) * lengths**by_length
                best, order = (log_probs / gnmt_penalty(lengths, length_penalty)).topk(n_best)
                hyps[i] = [[self.tgt_ids[t] for t in result.hypotheses[j]] for j in order.tolist()]
                scores[i] = best
        return hyps, scores


def load_ctranslate2(path: str | Path, device: str | torch.device = "cpu", precision: str = "auto",
                     threads: int = 0) -> LoadedModel:
    """A folder written by ``export`` (export_ctranslate2.py), ready to ``translate`` as translate.py does.

    Args:
        path: the folder.
        device: ``cpu`` or ``cuda:N``.
        precision: ``auto`` computes in the type the model was exported with; ``fp32``, ``bf16`` or ``fp16``
            in that type (CTranslate2 computes bfloat16 and float16 on GPUs only).
        threads: CTranslate2's threads (0: as many as torch uses, ``torch.get_num_threads()``).

    Raises:
        CTranslate2Error: a folder that is not such a model, or a type the device does not compute in.
        PrecisionError: an unknown ``precision``.
    """
    if precision not in COMPUTE_TYPES:
        raise PrecisionError(f"--precision: must be one of {', '.join(COMPUTE_TYPES)}, got {precision!r}")
    ct2 = require_ctranslate2()
    folder, device = Path(path), torch.device(device)
    if not (folder / METADATA).is_file():
        raise CTranslate2Error(f"--ctranslate2 {folder}: not a folder written by export_ctranslate2.py "
                               f"(no {METADATA})")
    meta = json.loads((folder / METADATA).read_text(encoding="utf-8"))
    try:
        translator = ct2.Translator(str(folder), device=device.type, device_index=device.index or 0,
                                    compute_type=COMPUTE_TYPES[precision],
                                    intra_threads=threads or torch.get_num_threads())
    except (RuntimeError, ValueError) as e:
        raise CTranslate2Error(f"--ctranslate2 {folder}: {str(e).strip().splitlines()[0]}") from None
    specials = SpecialIds(**meta["special_ids"])
    model = CTranslate2Model(translator, _vocabulary(folder, "source"), _vocabulary(folder, "target"), specials,
                             meta["max_positions"])
    if meta["hugging_face"]:
        tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(folder / HF_TOKENIZER),
                                                                        local_files_only=True)
        fields = (HuggingFaceText(tokenizer, specials, target=False), HuggingFaceText(tokenizer, specials, target=True))
    else:
        fields = tuple(TextField(_tokenizer(folder / SPM_FILES[side]), Vocab(_vocabulary(folder, name)))
                       for side, name in (("src", "source"), ("tgt", "target")))
    return LoadedModel(model, fields[0], fields[1], Config.from_dict(meta["config"]), None, device,
                       resolve_precision("fp32", device))


def _tokenizer(spm: Path) -> Tokenizer:
    """The SentencePiece tokenizer in the file ``spm`` if there is one, else whitespace tokens."""
    return SentencePieceTokenizer(spm.read_bytes()) if spm.is_file() else Tokenizer()

