"""Every option once: its type, default, bounds and help, in frozen dataclasses per group.

The command lines of the scripts are generated from these definitions (``simple_nmt.cli``),
and the engines and ``build_model`` read a ``Config`` by attribute. A config built in Python
(``Config(...)``, ``simple_nmt.cli.default_config(...)``) is validated exactly like the command
line: a bad value raises ``ValueError`` naming the option, and so does an unknown or misspelt
name given to ``Config.from_dict`` or ``default_config``.

Each option also says where ``continue_train.py`` takes it from (``source``):

- ``FIXED``: the architecture and the vocabularies; the checkpoint's value, and a different
  value on the command line is an error;
- ``INHERITED``: data, training and RL settings; the checkpoint's value unless given;
- ``LOCAL``: where to run, what to log and where to write; this command line and its defaults,
  never the checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from simple_nmt.data import split_lang
from simple_nmt.precision import PRECISIONS
from simple_nmt.rewards import REWARDS

FIXED, INHERITED, LOCAL = "fixed", "inherited", "local"

# the decoding limit of training and validation when --max_length is 0 (no limit on the data)
UNLIMITED_DECODING_LENGTH = 255
LARGEST_SEED = 2**32 - 1


def option(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    choices: tuple | None = None,
    check: Callable[[Any], Any] | None = None,
    source: str = INHERITED,
    aliases: Mapping[str, Any] | None = None,
) -> Any:
    """A dataclass field with the option's help, bounds and source.

    Args:
        minimum, above, maximum: the value must be >= ``minimum``, > ``above`` and <= ``maximum``.
        choices: the allowed values.
        check: raises ``ValueError`` for a bad value (e.g. ``split_lang``).
        source: where ``continue_train.py`` takes the option from: FIXED, INHERITED or LOCAL.
        aliases: command-line flags that set this option to a value, e.g. ``{"use_adam": "adam"}``.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "minimum": minimum, "above": above, "maximum": maximum, "choices": choices,
        "check": check, "source": source, "aliases": dict(aliases or {}),
    })


def value_type(hint: Any) -> tuple[type, bool]:
    """``int`` -> (int, False); ``float | None`` -> (float, True)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def check_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """``value`` checked against the option's type, bounds and choices (ints given for floats become floats).

    Raises:
        ValueError: a message without the option's name, e.g. ``must be >= 1, got 0``.
    """
    kind, optional = value_type(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"must be a {kind.__name__}, got None")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be True or False, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"must be an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
    elif not isinstance(value, kind):
        raise ValueError(f"must be a {kind.__name__}, got {value!r}")
    m = f.metadata
    if m["choices"] is not None and value not in m["choices"]:
        raise ValueError(f"must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
    if m["minimum"] is not None and value < m["minimum"]:
        raise ValueError(f"must be >= {m['minimum']}, got {value}")
    if m["above"] is not None and value <= m["above"]:
        raise ValueError(f"must be > {m['above']}, got {value}")
    if m["maximum"] is not None and value > m["maximum"]:
        raise ValueError(f"must be <= {m['maximum']}, got {value}")
    if m["check"] is not None:
        m["check"](value)
    return value


# names of earlier versions, and what replaces them
REPLACED = {"use_adam": ["optimizer='adam'"], "use_radam": ["optimizer='radam'"], "off_autocast": ["precision='fp32'"]}


def _lang(text: str) -> None:
    split_lang(text)


def _reward_name(name: str) -> None:
    """A reward of the library by name, or ``module:function`` (None, stored by the engine for a reward
    given in Python without an importable name, is let through: a resumed run must be given one)."""
    if name not in REWARDS and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", name):
        raise ValueError(f"must be one of {', '.join(sorted(REWARDS))}, or an importable module:function, "
                         f"got {name!r}")


class Options:
    """Base of the option groups: every field is checked when the dataclass is made."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            try:
                value = check_value(f, hints[f.name], getattr(self, f.name))
            except ValueError as e:
                raise ValueError(f"{f.name}: {e}") from None
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Options:
        """Build from a mapping; an unknown key is a ``ValueError`` naming it (and the closest option)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            hints = [f"{k} (did you mean {close[0]}?)" if (close := [*REPLACED.get(k, []),
                                                                    *difflib.get_close_matches(k, names, 1)])
                     else k for k in unknown]
            raise ValueError(f"unknown options: {', '.join(hints)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes``, validated."""
        return type(self).from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The options as plain values (what a checkpoint stores)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DeviceOptions(Options):
    """where to run"""

    gpu_id: int = option(-1, "GPU to use (-1: CPU)", minimum=-1, source=LOCAL)
    precision: str = option(
        "auto", "matrix products in float32, or under bfloat16 / float16 autocast with float32 weights and loss "
                "(auto: bf16 on GPUs that have it, else fp16; fp32 on CPU)", choices=PRECISIONS, source=LOCAL,
        aliases={"off_autocast": "fp32"})


@dataclasses.dataclass(frozen=True)
class RunOptions(DeviceOptions):
    """where to run, what to log and where to write"""

    model_fn: str | None = option(
        None, "DIR/STEM.pth: the best checkpoint; each epoch also writes DIR/STEM.epochN.pth", source=LOCAL)
    verbose: int = option(2, "0: quiet, 1: a line per epoch, 2: also a progress bar", choices=(0, 1, 2),
                          source=LOCAL)
    tensorboard_dir: str | None = option(None, "write TensorBoard logs to this folder", source=LOCAL)


@dataclasses.dataclass(frozen=True)
class DataOptions(Options):
    """data"""

    train: str | None = option(None, "training files prefix: PREFIX.SRC and PREFIX.TGT")
    valid: str | None = option(None, "validation files prefix")
    lang: str = option("ende", "source and target language codes, e.g. ende", check=_lang, source=FIXED)
    max_length: int = option(
        100, "drop training pairs longer than this many tokens (0: keep all); also the decoding limit of "
             f"sampling and validation ({UNLIMITED_DECODING_LENGTH} when 0)", minimum=0)
    batch_size: int = option(32, "sentences per batch", minimum=1)
    max_tokens: int = option(0, "if > 0, batches hold up to this many padded tokens instead of --batch_size "
                                "sentences", minimum=0)
    max_vocab: int = option(0, "largest vocabulary (0: no limit)", minimum=0, source=FIXED)
    min_freq: int = option(1, "rarer tokens map to <unk>", minimum=1, source=FIXED)
    spm_vocab_size: int = option(0, "if > 0, train SentencePiece models of this size on raw training text",
                                 minimum=0, source=FIXED)
    encoding_errors: str = option("strict", "non-UTF-8 bytes: stop with an error, or replace them and count "
                                            "the lines", choices=("strict", "replace"))
    cache_dir: str | None = option(
        None, "folder of the encoded training corpus, read from disk (not held in memory) and reused by later "
              "runs and every torchrun rank (default: PREFIX.LANG.cache beside the training files, e.g. "
              "data/train.ende.cache, or in ~/.cache/simple-nmt where the data folder is read-only; off: encode "
              "in memory every run)",
        source=LOCAL)


@dataclasses.dataclass(frozen=True)
class ModelOptions(Options):
    """model"""

    use_transformer: bool = option(False, "a Transformer instead of the LSTM Seq2Seq", source=FIXED)
    word_vec_size: int = option(512, "embedding size (Seq2Seq)", minimum=1, source=FIXED)
    hidden_size: int = option(768, "hidden / model size", minimum=1, source=FIXED)
    n_layers: int = option(4, "encoder and decoder layers", minimum=1, source=FIXED)
    n_splits: int = option(8, "attention heads (Transformer)", minimum=1, source=FIXED)
    ffn_size: int = option(0, "width of the Transformer's feed-forward blocks (0: 4 x --hidden_size)", minimum=0,
                           source=FIXED)
    dropout: float = option(0.2, "dropout probability", minimum=0.0, maximum=1.0)
    tie_embeddings: bool = option(
        False, "share the target embeddings with the output projection (Press & Wolf, 2017); Seq2Seq needs "
               "--word_vec_size equal to --hidden_size", source=FIXED)
    joint_vocab: bool = option(
        False, "one SentencePiece model (or word list) and one vocabulary for both languages, built from both "
               "sides of the training text; the source and target embeddings are then one matrix", source=FIXED)


OPTIMIZERS = ("sgd", "adam", "adamw", "radam")


@dataclasses.dataclass(frozen=True)
class TrainingOptions(Options):
    """training (MLE)"""

    seed: int = option(1, "seed of data order, initialisation, dropout and sampling", minimum=0,
                       maximum=LARGEST_SEED)
    n_epochs: int = option(20, "MLE epochs", minimum=0)
    optimizer: str = option("sgd", "optimizer of both phases", choices=OPTIMIZERS,
                            aliases={"use_adam": "adam", "use_radam": "radam"})
    lr: float | None = option(None, "learning rate (default: 1 for SGD, 1e-3 else)", above=0.0)
    lr_step: int = option(0, "multiply the lr by --lr_gamma every this many epochs (0: no decay)", minimum=0)
    lr_gamma: float = option(0.5, "step decay factor", above=0.0)
    lr_decay_start: int = option(1, "first epoch of step decay", minimum=1)
    warmup_steps: int = option(0, "linear warmup over this many updates, then inverse square root decay (0: off)",
                               minimum=0)
    label_smoothing: float = option(0.0, "label smoothing of the MLE loss", minimum=0.0, maximum=1.0)
    iteration_per_update: int = option(1, "gradient accumulation: batches per update", minimum=1)
    max_grad_norm: float = option(5.0, "gradient clipping (0: off)", minimum=0.0)
    max_bad_steps: int = option(10, "stop after this many updates in a row with a non-finite loss or gradient",
                                minimum=1)
    early_stop: int = option(0, "stop after this many epochs without a better validation score (0: off)",
                             minimum=0)


@dataclasses.dataclass(frozen=True)
class RLOptions(Options):
    """reinforcement learning"""

    rl_n_epochs: int = option(0, "RL fine-tuning epochs (0: none)", minimum=0)
    rl_lr: float | None = option(None, "RL learning rate, from the first RL update on unless --rl_warmup_steps "
                                       "(default: 0.01 for SGD, 1e-5 else)", above=0.0)
    rl_warmup_steps: int = option(0, "RL phase: linear warm-up to --rl_lr over this many updates, then "
                                     "constant (0: --rl_lr from the first update); the MLE schedule options "
                                     "do not apply to RL", minimum=0)
    rl_n_samples: int = option(4, "K: samples for the baseline", minimum=1)
    rl_baseline: str = option(
        "mean", "mean: one actor, baseline the mean reward of K samples; loo: all K+1 are actors with "
                "leave-one-out baselines; greedy: the greedy output's reward; none",
        choices=("mean", "loo", "greedy", "none"))
    rl_objective: str = option("reinforce", "REINFORCE, or minimum risk training over the sample set "
                                            "(Shen et al., 2016)", choices=("reinforce", "mrt"))
    rl_mrt_alpha: float = option(0.005, "MRT sharpness alpha", above=0.0)
    rl_reward: str | None = option(
        "bleu", f"sentence reward: one of {', '.join(sorted(REWARDS))}, or an importable module:function "
                "(a reward of your own; see docs/research-api.md)", check=_reward_name)
    rl_n_gram: int = option(4, "largest n-gram of BLEU / GLEU rewards", minimum=1)
    rl_temperature: float = option(1.0, "sampling temperature", above=0.0)
    rl_top_k: int = option(0, "sample from the k best tokens (0: all)", minimum=0)
    rl_top_p: float = option(1.0, "nucleus sampling mass, in (0, 1]", above=0.0, maximum=1.0)
    rl_epsilon: float = option(0.0, "epsilon sampling: never a token of probability below this, unless the most "
                                    "probable (Hewitt et al., 2022; 0: off)", minimum=0.0, maximum=1.0)
    rl_mle_weight: float = option(0.0, "add this weight times the MLE loss on the reference", minimum=0.0)
    rl_adv_norm: bool = option(
        False, "divide each source's advantages by the standard deviation of its K+1 rewards (as GRPO); a "
               "source whose rewards are all equal gets advantage 0")
    rl_length_weight: float = option(
        0.0, "subtract this weight times 100 |log(hypothesis length / reference length)|, in the tokens the reward "
             "scores, from each sample's reward: a length term kept apart from the reward, e.g. with --rl_reward "
             "bleu_precision (0: off)", minimum=0.0)
    rl_kl_weight: float = option(
        0.0, "subtract this weight times log P(y) - log P_start(y), the log-ratio of each sample to the frozen "
             "model RL started from, from its reward (a KL penalty, as in TRL)", minimum=0.0)
    rl_n_best: int = option(
        0, "--rl_objective mrt: add the N best hypotheses of a beam search of size N to each source's "
           "candidates (Edunov et al., 2018)", minimum=0)
    rl_n_best_only: bool = option(
        False, "--rl_n_best: the candidates are the n-best list alone, without samples (as Edunov et al., 2018)")


@dataclasses.dataclass(frozen=True)
class HuggingFaceOptions(Options):
    """Hugging Face models (pip install -e .[hf])"""

    hf_model: str | None = option(
        None, "a local folder of a Hugging Face encoder-decoder saved with save_pretrained (Marian, T5, mBART, "
              "NLLB, ...): continue_train.py fine-tunes it, translate.py translates with it; nothing is "
              "downloaded", source=LOCAL)
    hf_tgt_lang: str | None = option(
        None, "the target-language token the decoder starts with (mBART-50: e.g. de_DE, NLLB: deu_Latn; "
              "default: the model's forced_bos_token_id, if any)", source=FIXED)


# train.py's option groups, in --help order
CONFIG_GROUPS = (RunOptions, DataOptions, ModelOptions, TrainingOptions, RLOptions)


class ConfigError(ValueError):
    """Options that do not fit together; the message is one line naming them."""


@dataclasses.dataclass(frozen=True)
class Config(HuggingFaceOptions, RLOptions, TrainingOptions, ModelOptions, DataOptions, RunOptions):
    """All the options of a training run (train.py, continue_train.py), read by attribute."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rl_n_best and self.rl_objective != "mrt":
            raise ConfigError(f"--rl_n_best {self.rl_n_best}: beam-search candidates are not samples of the "
                              "model, so they need --rl_objective mrt (the risk over the candidates)")
        if self.rl_n_best_only and not self.rl_n_best:
            raise ConfigError("--rl_n_best_only needs --rl_n_best N: the size of the n-best list")

    @property
    def decoding_length(self) -> int:
        """The longest output of sampling and validation: ``max_length``, or 255 when that is 0."""
        return self.max_length or UNLIMITED_DECODING_LENGTH

    def learning_rate(self, phase: str) -> float:
        """The peak learning rate of the ``mle`` or ``rl`` phase, with the optimizer's default."""
        if phase == "rl":
            return self.rl_lr if self.rl_lr is not None else (0.01 if self.optimizer == "sgd" else 1e-5)
        return self.lr if self.lr is not None else (1.0 if self.optimizer == "sgd" else 1e-3)


@dataclasses.dataclass(frozen=True)
class TranslateOptions(HuggingFaceOptions, DeviceOptions):
    """translation"""

    model_fn: str | None = option(None, "checkpoint to translate with", source=LOCAL)
    ctranslate2: str | None = option(
        None, "a folder written by export_ctranslate2.py: translate with CTranslate2 (pip install -e .[ct2]), "
              "in the type it was exported with unless --precision names one", source=LOCAL)
    input: str | None = option(None, "input file (default: stdin)", source=LOCAL)
    output: str | None = option(None, "output file (default: stdout)", source=LOCAL)
    batch_size: int = option(64, "sentences per batch", minimum=1, source=LOCAL)
    beam_size: int = option(5, "beam size (1: greedy)", minimum=1, source=LOCAL)
    n_best: int = option(1, "hypotheses per line, tab-separated", minimum=1, source=LOCAL)
    length_penalty: float = option(1.0, "GNMT length penalty alpha (0: none)", minimum=0.0, source=LOCAL)
    max_length: int = option(255, "longest output, and longest input (longer input is truncated, with a warning)",
                             minimum=1, source=LOCAL)
    max_length_ratio: float = option(0.0, "if > 0, outputs are at most this many times the input length (+1)",
                                     minimum=0.0, source=LOCAL)
    mbr: int = option(0, "minimum Bayes risk decoding: output the best of N candidates per line by expected "
                         "utility against the pseudo-references (0: beam search)", minimum=0, source=LOCAL)
    mbr_candidates: str = option("epsilon", "--mbr: the candidates: N epsilon samples (--epsilon), or the N-best "
                                            "list of a beam of size N", choices=("epsilon", "beam"), source=LOCAL)
    epsilon: float = option(0.02, "--mbr epsilon sampling: never a token of probability below this, unless the "
                                  "most probable (0: plain sampling)", minimum=0.0, maximum=1.0, source=LOCAL)
    mbr_references: int = option(0, "--mbr: the pseudo-references: 0 the candidates themselves, M > 0 M more "
                                    "epsilon samples", minimum=0, source=LOCAL)
    mbr_utility: str = option("bleu", "--mbr: the utility: sacreBLEU's sentence BLEU (13a, exp smoothing), chrF, or "
                                      "GLEU", choices=("bleu", "chrf", "gleu"), source=LOCAL)
    seed: int = option(1, "--mbr: the seed of the samples", minimum=0, maximum=LARGEST_SEED, source=LOCAL)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mbr and self.n_best > self.mbr:
            raise ConfigError(f"--n_best {self.n_best}: --mbr {self.mbr} gives {self.mbr} candidates per line")
        if self.mbr and self.ctranslate2:
            raise ConfigError(f"--mbr {self.mbr} samples with the model's own search: give the checkpoint "
                              "(--model_fn or --hf_model) instead of --ctranslate2")


# the weight types of a CTranslate2 model (its converters' --quantization)
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ExportOptions(Options):
    """export to CTranslate2 (pip install -e .[ct2])"""

    model_fn: str | None = option(None, "checkpoint to export (a Transformer, or a Hugging Face model)", source=LOCAL)
    hf_model: str | None = option(None, "a local Hugging Face model folder to export, through CTranslate2's own "
                                        "converter", source=LOCAL)
    output_dir: str | None = option(None, "the folder to write: the CTranslate2 model, with the tokenizers beside it",
                                    source=LOCAL)
    quantization: str | None = option(None, "the type of the weights (default: as stored, float32 for the "
                                            "library's checkpoints)", choices=QUANTIZATIONS, source=LOCAL)
    max_positions: int = option(1024, "the positions a Transformer's table encodes: the longest input and output "
                                      "it translates (a Hugging Face model keeps its own)", minimum=1, source=LOCAL)
    force: bool = option(False, "replace --output_dir if it exists", source=LOCAL)


def as_config(config: Config | Mapping[str, Any]) -> Config:
    """A ``Config`` as it is; a mapping of option names to values as a validated ``Config`` (the options it
    leaves out take their defaults); a checkpoint's stored config (``checkpoint["meta"]["config"]``, which
    names its ``phase``) as ``config_from_checkpoint`` reads it."""
    if isinstance(config, Config):
        return config
    return Config.from_dict(config_from_checkpoint(config) if "phase" in config else config)


# keys of a stored config that are not options: the phase, the file it was continued from, and
# earlier versions' --off_autocast (LOCAL, now --precision)
_NOT_OPTIONS = ("phase", "load_fn", "off_autocast")


def config_from_checkpoint(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a checkpoint's stored config that a later run takes from it, as ``Config`` keys.

    Drops the phase, the file it was continued from and the LOCAL options (where and how it
    ran and logged: never taken from a checkpoint), and maps the ``use_adam`` / ``use_radam``
    flags of earlier versions onto ``optimizer``.
    """
    local = {f.name for f in dataclasses.fields(Config) if f.metadata["source"] == LOCAL}
    values = {k: v for k, v in saved.items() if k not in _NOT_OPTIONS and k not in local}
    use_adam, use_radam = values.pop("use_adam", False), values.pop("use_radam", False)
    if use_radam or use_adam:
        values["optimizer"] = "radam" if use_radam else "adam"
    return values


def source_of(name: str) -> str:
    """Where continue_train.py takes option ``name`` from: FIXED, INHERITED or LOCAL."""
    return {f.name: f.metadata["source"] for f in dataclasses.fields(Config)}[name]


def default_config(**overrides: Any) -> Config:
    """train.py's defaults with ``overrides``: the ``Config`` the engines and ``build_model`` read.

    Raises:
        ValueError: an unknown option, or a bad value, named.
    """
    return Config.from_dict(overrides)
