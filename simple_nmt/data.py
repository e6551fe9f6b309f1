"""Parallel text: reading, tokenizers, vocabularies, length-bucketed batches."""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class SpecialIds:
    """The ids of a vocabulary's special tokens, which collate, the searches, the rewards and the losses read.

    The library's own vocabularies put them at 0..3 (``LIBRARY_IDS``). A model with a vocabulary
    of its own declares them as ``model.special_ids`` (a Hugging Face Marian model: EOS 0 and PAD
    last; T5: PAD 0, EOS 1), so that its ids are used as they are, without a remapping.
    ``bos`` is the decoder's first input and is never emitted; it may equal ``pad`` (Marian, T5).
    """

    pad: int = PAD
    unk: int = UNK
    bos: int = BOS
    eos: int = EOS


LIBRARY_IDS = SpecialIds()


def content_ids(ids: Sequence[int], specials: SpecialIds = LIBRARY_IDS) -> list[int]:
    """The ids before the first EOS, without PAD and BOS: what an output says."""
    out = []
    for i in ids:
        if i == specials.eos:
            break
        if i != specials.pad and i != specials.bos:
            out.append(i)
    return out


class DataError(ValueError):
    """A problem with user data; the message is one line naming the file (and line)."""


def split_lang(lang: str) -> tuple[str, str]:
    """Split a language pair such as ``ende`` into ``("en", "de")``."""
    if len(lang) != 4 or not lang.isalpha():
        raise ValueError(f"--lang must be two 2-letter codes such as 'ende', got {lang!r}")
    return lang[:2], lang[2:]


def read_lines(path: str | Path, encoding_errors: str = "strict") -> tuple[list[str], int]:
    """Read a UTF-8 text file into lines without their line breaks.

    Args:
        path: the file.
        encoding_errors: ``"strict"`` raises on bad bytes, ``"replace"`` replaces them.

    Returns:
        The lines and the number of lines in which bytes were replaced. A UTF-8 byte-order
        mark at the start of the file (as Windows editors write) is not part of the text.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    lines, n_replaced = [], 0
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            if encoding_errors != "replace":
                raise DataError(
                    f"{path}:{i}: not valid UTF-8 (byte {e.start}); "
                    "fix the file or pass --encoding_errors replace"
                ) from None
            text, n_replaced = line.decode("utf-8", errors="replace"), n_replaced + 1
        lines.append(text.rstrip("\r"))
    if lines and lines[-1] == "":
        lines.pop()
    return lines, n_replaced


def read_parallel(
    prefix: str, lang: str, encoding_errors: str = "strict"
) -> tuple[list[str], list[str], int]:
    """Read ``PREFIX.SRC`` and ``PREFIX.TGT`` for ``lang`` such as ``ende``.

    Returns:
        Source lines, target lines and the number of lines with replaced bytes.
    """
    src_lang, tgt_lang = split_lang(lang)
    src_fn, tgt_fn = f"{prefix}.{src_lang}", f"{prefix}.{tgt_lang}"
    src, n_src = read_lines(src_fn, encoding_errors)
    tgt, n_tgt = read_lines(tgt_fn, encoding_errors)
    if not src:
        raise DataError(f"{src_fn}: file is empty")
    for fn, lines in ((src_fn, src), (tgt_fn, tgt)):
        if not any(line.strip() for line in lines):
            raise DataError(f"{fn}: every line is blank; there is no text to read")
    if len(src) != len(tgt):
        raise DataError(
            f"{src_fn} has {len(src)} lines but {tgt_fn} has {len(tgt)}: "
            "parallel files must have the same number of lines"
        )
    return src, tgt, n_src + n_tgt


class Tokenizer:
    """Whitespace tokenizer: the input is pre-tokenized (or BPE) text."""

    def encode(self, text: str) -> list[str]:
        """Split a line into tokens."""
        return text.split()

    def encode_batch(self, lines: Sequence[str]) -> list[list[str]]:
        """Split lines into tokens: ``encode`` of each."""
        return [self.encode(line) for line in lines]

    def decode(self, tokens: Sequence[str]) -> str:
        """Join tokens into a line."""
        return " ".join(tokens)

    def model_bytes(self) -> bytes | None:
        """The serialised model to store in a checkpoint (none for whitespace)."""
        return None


SPM_SAMPLE_SIZE = 1_000_000  # the most sentences SentencePiece trains on; a larger corpus is sampled


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece subwords: raw text in, detokenized text out."""

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self._model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)

    @classmethod
    def train(cls, lines: Sequence[str], vocab_size: int, seed: int = 1,
              sample_size: int = SPM_SAMPLE_SIZE) -> SentencePieceTokenizer:
        """Train a unigram SentencePiece model on ``lines``.

        Args:
            lines: training sentences (raw text).
            vocab_size: the number of pieces.
            seed: the sampling seed of the trainer (for reproducibility).
            sample_size: the most sentences the trainer learns from: a larger corpus is sampled
                (SentencePiece's own ``input_sentence_size`` and ``shuffle_input_sentence``).
        """
        import sentencepiece as spm

        text = [line for line in lines if line.strip()]
        # a smaller corpus is read whole, in order: sampling options change the model even when all is kept
        sample = {"input_sentence_size": sample_size, "shuffle_input_sentence": True} if len(text) > sample_size else {}
        buffer = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
            **sample,
        )
        return cls(buffer.getvalue())

    def encode(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def encode_batch(self, lines: Sequence[str]) -> list[list[str]]:
        return self._sp.encode(list(lines), out_type=str)

    def piece_ids(self, lines: Sequence[str]) -> list[list[int]]:
        """The ids in the SentencePiece model of each line's pieces (``encode_batch`` as ids; a character the
        model has never seen is its unknown piece, where ``encode_batch`` gives the character)."""
        return self._sp.encode(list(lines), out_type=int)

    def pieces(self) -> list[str]:
        """Every piece of the model, in id order."""
        return [self._sp.id_to_piece(i) for i in range(self.size())]

    def size(self) -> int:
        """The number of pieces of the model."""
        return self._sp.get_piece_size()

    def unk_id(self) -> int:
        """The id of the model's unknown piece."""
        return self._sp.unk_id()

    def decode(self, tokens: Sequence[str]) -> str:
        return self._sp.decode_pieces(list(tokens))

    def model_bytes(self) -> bytes:
        return self._model


def tokenizer_from_bytes(model: bytes | None) -> Tokenizer:
    """The tokenizer stored in a checkpoint: SentencePiece if a model is given."""
    return SentencePieceTokenizer(model) if model else Tokenizer()


class Vocab:
    """Token <-> id mapping with PAD/UNK/BOS/EOS at ids 0..3."""

    def __init__(self, itos: Sequence[str]):
        if list(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences: Sequence[Sequence[str]], max_vocab: int = 0, min_freq: int = 1) -> Vocab:
        """Build from tokenized sentences, most frequent first.

        Args:
            sentences: token lists.
            max_vocab: the most ids, specials included (0: no limit).
            min_freq: tokens seen fewer times map to UNK.
        """
        return cls.from_counts(Counter(token for sentence in sentences for token in sentence), max_vocab, min_freq)

    @classmethod
    def from_counts(cls, counts: Counter[str], max_vocab: int = 0, min_freq: int = 1) -> Vocab:
        """Build from token counts, most frequent first (``build``'s arguments)."""
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        if max_vocab > 0:
            words = words[: max(0, max_vocab - len(SPECIALS))]
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Map tokens to ids (unknown tokens to UNK)."""
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Map ids to tokens, stopping at EOS and skipping PAD and BOS."""
        return [self.itos[i] for i in content_ids(ids)]


@dataclass
class TextField:
    """A tokenizer and a vocabulary: the way from a line to ids and back."""

    tokenizer: Tokenizer
    vocab: Vocab
    special_ids: SpecialIds = LIBRARY_IDS  # what collate brackets and pads this side's ids with

    def to_ids(self, line: str) -> list[int]:
        """Tokenize and map a line to ids (without BOS/EOS)."""
        return self.vocab.encode(self.tokenizer.encode(line))

    def to_text(self, ids: Sequence[int]) -> str:
        """Map ids back to a (detokenized) line."""
        return self.tokenizer.decode(self.vocab.decode(ids))

    def reference(self, line: str) -> str:
        """A reference line as validation BLEU scores it: tokenized and detokenized, as outputs are."""
        return self.tokenizer.decode(self.tokenizer.encode(line))

    def stored(self) -> tuple[list[str], bytes | None]:
        """What a checkpoint keeps of this side: the vocabulary and the SentencePiece model (if any)."""
        return self.vocab.itos, self.tokenizer.model_bytes()

    def __len__(self) -> int:
        return len(self.vocab)


class ParallelDataset(torch.utils.data.Dataset):
    """Pairs of id lists, pairs longer than ``max_length`` tokens dropped.

    An example is ``(index, src, tgt)``: ``index`` is the pair's line number in the
    sequences given (counted from 0), kept when longer pairs before it are dropped, so that
    it finds the pair's raw lines (``collate`` puts it in the batch as ``index``). The
    sequences are kept as given (lists, or the on-disk arrays of a corpus cache).

    Args:
        lengths: (N, 2) every pair's source and target length, where they are known without reading
            every sequence (a corpus cache stores them); kept without a copy when no pair is dropped.
    """

    def __init__(self, src: Sequence[list[int]], tgt: Sequence[list[int]], max_length: int = 0,
                 lengths: np.ndarray | None = None):
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
        if lengths is None:
            lengths = np.stack([sequence_lengths(src), sequence_lengths(tgt)], axis=1)
        lengths = np.asarray(lengths, dtype=np.int32)  # |lengths| = (N, 2)
        if len(lengths) != len(src):
            raise ValueError(f"{len(lengths)} lengths for {len(src)} pairs")
        keep = (lengths <= max_length).all(axis=1) if max_length > 0 else None  # (N,)
        self.line_numbers: Sequence[int]  # (kept,): pair i is line line_numbers[i]
        if keep is None or keep.all():
            self.line_numbers = range(len(src))
            self._lengths = lengths
        else:
            self.line_numbers = np.flatnonzero(keep).astype(np.int32)
            self._lengths = lengths[keep]  # (kept, 2)
        self.n_dropped = len(src) - len(self.line_numbers)
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.line_numbers)

    def __getitem__(self, i: int) -> tuple[int, list[int], list[int]]:
        line = int(self.line_numbers[i])
        return line, self.src[line], self.tgt[line]

    def lengths(self) -> np.ndarray:
        """(N, 2) int32: the source and target length of every pair, for batching."""
        return self._lengths


def sequence_lengths(seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """The length of every sequence, (N,) int32."""
    return np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD) -> torch.Tensor:
    """Right-pad id lists into a (batch_size, max_length) long tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(examples: Sequence[tuple[int, list[int], list[int]]], ids: SpecialIds = LIBRARY_IDS
            ) -> dict[str, torch.Tensor]:
    """Batch examples: ``index`` (B,), ``src`` (B, S), ``src_lengths`` (B,), ``tgt`` = BOS y EOS (B, T + 2).

    An empty source becomes a single UNK, so that every source has a length.

    Args:
        ids: the special ids of the model's vocabulary.
    """
    src = [s if s else [ids.unk] for _, s, _ in examples]
    return {
        "index": torch.tensor([i for i, _, _ in examples], dtype=torch.long),
        "src": pad_batch(src, ids.pad),
        "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long),
        "tgt": pad_batch([[ids.bos] + t + [ids.eos] for _, _, t in examples], ids.pad),
    }


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar lengths, shuffled per epoch, reproducible under a seed.

    Batches hold ``batch_size`` sentences, or as many as fit in ``max_tokens``
    padded tokens (the longer of source and target). Call ``set_epoch`` before
    each epoch; with ``num_replicas`` > 1 each rank gets every ``num_replicas``-th
    batch of the same global order (give every rank the same ``seed``).

    Args:
        equal_shards: with ``num_replicas`` > 1, drop the last batches that do not
            divide evenly, so that every rank gets as many (training); False keeps
            every batch, some ranks getting one more (validation).
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]] | np.ndarray,
        batch_size: int = 64,
        max_tokens: int = 0,
        shuffle: bool = True,
        seed: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        equal_shards: bool = True,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int32).reshape(-1, 2)  # (N, 2): source, target
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank, self.equal_shards = num_replicas, rank, equal_shards
        self.epoch, self.skip = 0, 0
        self._made: tuple[int, list[np.ndarray]] | None = None  # the epoch and its batches, made once

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch whose order to produce, leaving out its first ``skip`` batches
        (of this rank's share) when a run resumes in the middle of the epoch."""
        self.epoch, self.skip = epoch, skip

    def _batches(self) -> list[np.ndarray]:
        if self._made is None or self._made[0] != self.epoch:
            self._made = self.epoch, self._make_batches()
        return self._made[1]

    def _make_batches(self) -> list[np.ndarray]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        n = len(self.lengths)
        keys = np.fromiter((rng.random() for _ in range(n)), np.float64, n) if self.shuffle else np.zeros(n)  # (N,)
        # by source length, target length, then the random key; stable, so ties keep their index order: sorted
        # by the key, then stably by the lengths as one int64, each array freed once used (a third less memory
        # than np.lexsort of the three)
        order = np.argsort(keys, kind="stable")  # (N,)
        del keys
        by_length = (self.lengths[:, 0].astype(np.int64) << 32 | self.lengths[:, 1])[order]  # (N,)
        within = np.argsort(by_length, kind="stable")  # (N,)
        del by_length
        order = order[within]
        if self.max_tokens <= 0:
            batches = np.split(order, range(self.batch_size, n, self.batch_size)) if n else []
        else:
            starts, width, size = [], 0, 0
            for position, longer in enumerate(self.lengths.max(axis=1)[order].tolist()):
                new_width = max(width, longer)
                if size and new_width * (size + 1) > self.max_tokens:
                    starts.append(position)
                    size, new_width = 0, longer
                size, width = size + 1, new_width
            batches = np.split(order, starts) if n else []
        if self.shuffle:
            rng.shuffle(batches)
        if self.equal_shards:
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return (batch.tolist() for batch in self._batches()[self.skip:])

    def __len__(self) -> int:
        return len(self._batches())
