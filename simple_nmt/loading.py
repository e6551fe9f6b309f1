"""Restoring a model from a checkpoint or a Hugging Face folder, one path for both, behind ``load``:
the model, its source and target fields and its config, ready to translate or train further."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from simple_nmt.checkpoint import UNUSABLE, CheckpointError, load_checkpoint
from simple_nmt.config import Config, ConfigError, ModelOptions, TranslateOptions, config_from_checkpoint
from simple_nmt.data import SPECIALS, TextField, Vocab, collate, tokenizer_from_bytes
from simple_nmt.hf import HuggingFaceModel
from simple_nmt.mbr import mbr_select
from simple_nmt.models import build_model
from simple_nmt.precision import Precision, resolve_precision
from simple_nmt.search import special_ids

Fields = tuple[TextField, TextField]


def stored_config(checkpoint: Mapping[str, Any], path: str, options: type = Config) -> Config:
    """The ``Config`` a checkpoint was trained with (checkpoints of earlier versions included), without
    where it ran and logged: the LOCAL options are the defaults.

    Args:
        options: the option group to take (``ModelOptions``: what translation needs); the rest are defaults.
    """
    names = {f.name for f in dataclasses.fields(options)}
    try:
        return Config.from_dict({k: v for k, v in config_from_checkpoint(checkpoint["meta"]["config"]).items()
                                 if k in names})
    except ValueError as e:
        raise CheckpointError(f"{path}: {UNUSABLE}: its config: {e}") from None


def fields_from_checkpoint(meta: Mapping[str, Any], path: str) -> tuple[TextField, TextField]:
    """The tokenizers and vocabularies stored in the checkpoint read from ``path``."""
    fields = []
    for side in ("src", "tgt"):
        try:
            vocab = Vocab(meta[f"{side}_vocab"])
        except ValueError:
            raise CheckpointError(f"{path}: {UNUSABLE}: its {side}_vocab does not start "
                                  f"with the special tokens {SPECIALS}") from None
        try:
            tokenizer = tokenizer_from_bytes(meta[f"{side}_spm"])
        except RuntimeError:
            raise CheckpointError(f"{path}: {UNUSABLE}: its {side}_spm is not a "
                                  "SentencePiece model") from None
        fields.append(TextField(tokenizer, vocab))
    return fields[0], fields[1]


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str) -> None:
    """Load a state dict, turning a mismatch into one clear line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: {UNUSABLE}: its weights do not load into the model ({detail})") from None


def check_weights_fit(config: Config, fields: tuple[TextField, TextField], weights: Mapping[str, torch.Tensor],
                      path: str) -> None:
    """Refuse the weights of the checkpoint read from ``path`` unless their names and shapes are the model's.

    The model is built on the ``meta`` device, which allocates nothing, so that a damaged
    config cannot ask for a huge model.
    """
    shapes = {k: tuple(v.shape) for k, v in meta_model(config, fields, path).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != shapes:
        key = sorted(k for k in shapes.keys() | found.keys() if shapes.get(k) != found.get(k))[0]
        raise CheckpointError(f"{path}: {UNUSABLE}: its weights do not fit its config and vocabularies "
                              f"({key}: {found.get(key, 'missing')}, expected {shapes.get(key, 'none')})")


def meta_model(config: Config, fields: tuple[TextField, TextField], path: str | None = None) -> torch.nn.Module:
    """The model of ``config`` on the ``meta`` device (shapes only); a config it cannot be built from is an
    ``ConfigError``, or a ``CheckpointError`` when it comes from the checkpoint ``path``."""
    try:
        with torch.device("meta"):
            return build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    except (ValueError, RuntimeError) as e:  # --tie_embeddings with unequal sizes; sizes past what torch can hold
        detail = str(e).strip().splitlines()[0] if isinstance(e, ValueError) else f"no such model can be built ({e})"
        if path is None:
            raise ConfigError(detail) from None
        raise CheckpointError(f"{path}: {UNUSABLE}: its config: {detail}") from None


def model_for(config: Config, fields: tuple[TextField, TextField], weights: Mapping[str, torch.Tensor] | None = None,
              path: str | None = None) -> torch.nn.Module:
    """``build_model`` for ``config`` and the fields' vocabularies, with the ``weights`` of the checkpoint
    read from ``path`` if given (checked first by ``check_weights_fit``)."""
    if weights is None:
        meta_model(config, fields)
    else:
        check_weights_fit(config, fields, weights, path)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    if weights is not None:
        load_model_weights(model, dict(weights), path)
    return model


def hf_model_for(config: Config | TranslateOptions, checkpoint: Mapping[str, Any] | None = None,
                 path: str | None = None) -> HuggingFaceModel | None:
    """The Hugging Face model of a run: the checkpoint's (read from ``path``) if it holds one, with its
    weights, else the one in the folder ``--hf_model``; None for the library's own models."""
    if checkpoint is not None and "hf" in checkpoint["meta"]:
        tgt_lang = checkpoint["meta"]["config"].get("hf_tgt_lang")
        try:
            model = HuggingFaceModel.from_checkpoint_meta(checkpoint["meta"]["hf"], tgt_lang=tgt_lang)
        except (OSError, ValueError, TypeError, KeyError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: {UNUSABLE}: its Hugging Face model files do not load ({detail})"
                                  ) from None
        load_model_weights(model, dict(checkpoint["model"]), path)
        return model
    if config.hf_model:
        return HuggingFaceModel.from_pretrained(config.hf_model, tgt_lang=config.hf_tgt_lang)
    return None


def check_hf_length(model: HuggingFaceModel, length: int) -> None:
    """Refuse a decoding limit (``--max_length``) longer than the Hugging Face model's positions."""
    if length > model.longest_output:
        raise ConfigError(f"--max_length {length}: {type(model.hf).__name__} decodes at most "
                          f"{model.longest_output} tokens (its max_position_embeddings); give at most that")


def check_translatable(checkpoint: Mapping[str, Any], path: str) -> None:
    """Refuse a checkpoint that translate.py would refuse: its vocabularies, tokenizers and model options,
    and its weights against them."""
    if "hf" in checkpoint["meta"]:
        hf_model_for(TranslateOptions(), checkpoint, path)
        return
    check_weights_fit(stored_config(checkpoint, path, ModelOptions), fields_from_checkpoint(checkpoint["meta"], path),
                      checkpoint["model"], path)



def restore(checkpoint: Mapping[str, Any] | None, path: str | None, config: Config | TranslateOptions | None = None
            ) -> tuple[torch.nn.Module, Fields]:
    """The model and fields of a checkpoint (read from ``path``), or of the Hugging Face folder
    ``config.hf_model`` when ``checkpoint`` is None: the one way the scripts and ``load`` rebuild a model.

    The checkpoint's own config builds a library model; a Hugging Face model comes back from the files the
    checkpoint stored. Parameters frozen when it was saved (``meta["frozen"]``) are frozen again, so that an
    optimizer over the trainable parameters resumes.

    Raises:
        CheckpointError: a checkpoint whose config, vocabularies or weights do not make a model, naming ``path``.
    """
    hf = hf_model_for(config or TranslateOptions(), checkpoint, path)
    if hf is not None:
        model, fields = hf, hf.fields()
    else:
        fields = fields_from_checkpoint(checkpoint["meta"], path)
        model = model_for(stored_config(checkpoint, path, ModelOptions), fields, checkpoint["model"], path)
    if checkpoint is not None:
        freeze(model, checkpoint["meta"].get("frozen", []), path)
    return model, fields


def freeze(model: torch.nn.Module, names: Sequence[str], path: str | None) -> None:
    """Set ``requires_grad=False`` on the parameters ``names`` (a checkpoint's ``meta["frozen"]``)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(names) - params.keys())
    if unknown:
        raise CheckpointError(f"{path}: {UNUSABLE}: its frozen parameter {unknown[0]} is not in the model")
    for name in names:
        params[name].requires_grad_(False)


@dataclasses.dataclass
class LoadedModel:
    """A model restored by ``load``: what it translates with, and what it was trained with.

    Attributes:
        model: the ``EncoderDecoder`` (a ``Transformer``, ``Seq2Seq`` or ``HuggingFaceModel``), in eval mode.
        src_field, tgt_field: the source and target ``TextField`` (tokenizer and vocabulary).
        config: the ``Config`` it was trained with (for a Hugging Face folder: ``hf_model`` set, the rest
            defaults); ``build_model(config, len(src_field), len(tgt_field))`` builds a library model again.
        checkpoint: the checkpoint's plain data (None for a Hugging Face folder), e.g. to resume from.
        device: where the model is.
        precision: the autocast ``translate`` runs under.
    """

    model: torch.nn.Module
    src_field: TextField
    tgt_field: TextField
    config: Config
    checkpoint: dict[str, Any] | None
    device: torch.device
    precision: Precision

    def translate(self, lines: Sequence[str], beam_size: int = 5, n_best: int = 1, length_penalty: float = 1.0,
                  max_length: int = 255, max_length_ratio: float = 0.0, batch_size: int = 64, mbr: int = 0,
                  mbr_candidates: str = "epsilon", epsilon: float = 0.02, mbr_references: int = 0,
                  mbr_utility: str = "bleu") -> list[str] | list[list[str]]:
        """Translate raw text lines, as translate.py does: an empty line gives an empty line.

        Args:
            beam_size: 1 for greedy decoding.
            n_best: hypotheses per line; with n_best > 1 a list of them per line, best first.
            length_penalty: the GNMT length penalty alpha (0: none).
            max_length: the longest output, and the longest input (longer input is truncated, with a warning).
            max_length_ratio: if > 0, outputs are at most this many times the input length (+1).
            mbr: minimum Bayes risk decoding from this many candidates per line (0: beam search); the best
                are those of the highest expected utility. Seed torch first for repeatable samples.
            mbr_candidates: ``"epsilon"`` (epsilon samples) or ``"beam"`` (the n-best list of a beam of size
                ``mbr``).
            epsilon: epsilon sampling's cut (0: plain sampling).
            mbr_references: 0: the candidates are the pseudo-references; M > 0: M more epsilon samples.
            mbr_utility: ``"bleu"``, ``"chrf"`` or ``"gleu"`` (``simple_nmt.mbr.mbr_select``).

        Raises:
            ValueError: a bad option, named.
        """
        options = TranslateOptions(beam_size=beam_size, n_best=n_best, length_penalty=length_penalty,
                                   max_length=max_length, max_length_ratio=max_length_ratio, batch_size=batch_size,
                                   mbr=mbr, mbr_candidates=mbr_candidates, epsilon=epsilon,
                                   mbr_references=mbr_references, mbr_utility=mbr_utility)
        outputs = self.translate_n_best(lines, options)
        return outputs if n_best > 1 else [per_line[0] for per_line in outputs]

    def translate_n_best(self, lines: Sequence[str], options: TranslateOptions) -> list[list[str]]:
        """``translate`` with its options as translate.py's ``TranslateOptions``: ``options.n_best``
        translations per line, best first."""
        if isinstance(self.model, HuggingFaceModel):
            check_hf_length(self.model, options.max_length)
        with self.precision.autocast():
            return translate_lines(self.model, self.src_field, self.tgt_field, list(lines), options, self.device)


def load(path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
         tgt_lang: str | None = None) -> LoadedModel:
    """Load a checkpoint (``.pth``) or a Hugging Face model folder (saved with ``save_pretrained``) to
    translate with or to train further, as translate.py and continue_train.py do.

    Args:
        path: a checkpoint file written by the library (train.py, continue_train.py, the engines' handlers,
            average_checkpoints.py), or a local folder of a Hugging Face encoder-decoder.
        device: where to put the model.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto``: the autocast ``translate`` runs under.
        tgt_lang: a Hugging Face folder's target-language token (mBART-50, NLLB), as ``--hf_tgt_lang``.

    Raises:
        CheckpointError: a file that is not a usable checkpoint, named with the reason.
        HuggingFaceError: a folder that does not hold a Hugging Face encoder-decoder.
    """
    device = torch.device(device)
    run_precision = resolve_precision(precision, device)
    if Path(path).is_dir():
        checkpoint, config = None, Config(hf_model=str(path), hf_tgt_lang=tgt_lang)
    else:
        checkpoint = load_checkpoint(path, map_location=device)
        try:
            config = stored_config(checkpoint, str(path))
        except CheckpointError as e:  # options that do not make the model (RL's, data's) do not stop translation
            config = stored_config(checkpoint, str(path), ModelOptions)
            warnings.warn(f"{e}; its model options alone are read", stacklevel=2)
    model, (src_field, tgt_field) = restore(checkpoint, str(path), config)
    return LoadedModel(model.to(device).eval(), src_field, tgt_field, config, checkpoint, device, run_precision)


def translate_lines(model: torch.nn.Module, src_field: TextField, tgt_field: TextField, lines: list[str],
                    options: TranslateOptions, device: torch.device) -> list[list[str]]:
    """The ``options.n_best`` translations of each line, best first; an empty line (or one with no
    tokens) gives ``n_best`` empty strings.

    Args:
        options: ``batch_size``, ``beam_size``, ``n_best``, ``length_penalty``, ``max_length``,
            ``max_length_ratio``.
    """
    outputs = [[""] * options.n_best for _ in lines]
    ids = [src_field.to_ids(line) for line in lines]
    n_truncated = sum(len(x) > options.max_length for x in ids)
    if n_truncated:
        print(f"warning: {n_truncated} input lines longer than --max_length {options.max_length} "
              "tokens were truncated", file=sys.stderr)
    todo = sorted((i for i, x in enumerate(ids) if x), key=lambda i: len(ids[i]))
    # MBR decodes mbr (+ mbr_references) outputs per line: as many lines at a time as keep them within MBR_ROWS
    per_batch = options.batch_size if not options.mbr else max(1, MBR_ROWS // (options.mbr + options.mbr_references))
    model.eval()
    for start in range(0, len(todo), per_batch):
        chunk = todo[start: start + per_batch]
        src = [ids[i][: options.max_length] for i in chunk]
        batch = collate([(0, s, []) for s in src], special_ids(model))
        src_t, lengths = batch["src"].to(device), batch["src_lengths"].to(device)
        if options.mbr:
            texts = mbr_translations(model, tgt_field, src_t, lengths, options)
        else:
            hyps, _ = model.batch_beam_search(src_t, lengths, beam_size=options.beam_size,
                                              max_length=options.max_length,
                                              max_length_ratio=options.max_length_ratio,
                                              length_penalty=options.length_penalty, n_best=options.n_best)
            texts = [[tgt_field.to_text(h) for h in per_line] for per_line in hyps]
        for i, per_line in zip(chunk, texts):
            outputs[i] = per_line
    return outputs


MBR_ROWS = 2048  # the most outputs MBR decoding samples at once (lines x (candidates + references))


def mbr_translations(model: torch.nn.Module, tgt_field: TextField, src: torch.Tensor, src_lengths: torch.Tensor,
                     options: TranslateOptions) -> list[list[str]]:
    """Minimum Bayes risk decoding of a batch: each line's ``options.n_best`` candidates of the highest
    expected utility (``simple_nmt.mbr.mbr_select``), best first.

    Args:
        src: |src| = (batch_size, src_length).
        src_lengths: |src_lengths| = (batch_size,).
        options: ``mbr``, ``mbr_candidates``, ``epsilon``, ``mbr_references``, ``mbr_utility``, ``max_length``.
    """
    n, limit = options.mbr, options.max_length

    def samples(k: int) -> list[list[str]]:
        ids, _ = model.search(src, src_lengths, is_greedy=False, max_length=limit, n_samples=k,
                              epsilon=options.epsilon)  # |ids| = (batch_size * k, length)
        texts = [tgt_field.to_text(row) for row in ids.tolist()]
        return [texts[i * k: (i + 1) * k] for i in range(src.size(0))]

    if options.mbr_candidates == "beam":
        hyps, _ = model.batch_beam_search(src, src_lengths, beam_size=n, max_length=limit,
                                          max_length_ratio=options.max_length_ratio, length_penalty=0.0, n_best=n)
        candidates = [[tgt_field.to_text(h) for h in per_line] for per_line in hyps]
    else:
        candidates = samples(n)
    references = samples(options.mbr_references) if options.mbr_references else None
    ranking = mbr_select(candidates, references, options.mbr_utility).ranking()
    return [[per_line[r] for r in order[: options.n_best]] for per_line, order in zip(candidates, ranking)]
