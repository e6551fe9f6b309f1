"""The encoded training corpus on disk: built once, then read from disk by later runs and every torchrun rank.

A cache folder (``--cache_dir``; by default ``PREFIX.SRCTGT.cache`` beside the training files,
e.g. ``data/train.ende.cache``) holds, in numpy's own format (``np.save``, read back with
``np.load``)::

    fields-KEY.json      the fields built from the training text (vocabularies, SentencePiece models);
                         KEY: the files' contents and the options that build them
    KEY/                 the training pairs encoded with one pair of fields; KEY: the files' contents,
                         --lang, --encoding_errors and the fields
        manifest.json    written last: format, version, key, pairs, every array's shape and dtype
        lengths.npy      (N, 2) int32: every pair's source and target length, in tokens
        src.ids.npy      every source id, one pair after another (uint16; int32 past 65,536 ids)
        src.offsets.npy  (N + 1,) int64: pair i's ids are ids[offsets[i]:offsets[i + 1]]
        src.text.npy     the raw lines as UTF-8 bytes (uint8), with src.text_offsets.npy (N + 1,)
        tgt.*            the same for the target side

``--max_length`` is applied when the cache is read (from the lengths), so one cache serves
every length limit. A run reads the lengths into memory and the rest by position (``os.pread``) as
its batches ask for it: it holds the lengths and the pairs it reads. The offsets are checked when
an entry is opened, read from the files in chunks. An entry is written into a temporary
folder and renamed into place, so a half-written one is never read.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from simple_nmt.data import (
    LIBRARY_IDS,
    UNK,
    DataError,
    SentencePieceTokenizer,
    TextField,
    Tokenizer,
    Vocab,
    tokenizer_from_bytes,
)

FORMAT, VERSION = "simple_nmt corpus cache", 2
CHUNK_LINES = 10_000  # lines per task of the encoding processes
PARALLEL_LINES = 200_000  # fewer lines are encoded in this process
SIDES = ("src", "tgt")


class CacheError(DataError):
    """A cache entry that cannot be read; the message is one line naming it."""


class TokenizerTrainingError(RuntimeError):
    """SentencePiece could not train the model of job ``index`` of ``train_tokenizers``; the message is its own."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class Encoded(NamedTuple):
    """Lines as ids: every line's ids, one line after another, and every line's length."""

    ids: np.ndarray  # (total,)
    lengths: np.ndarray  # (N,) int32

    def split(self, n: int) -> tuple[Encoded, Encoded]:
        """The first ``n`` lines and the rest."""
        end = int(self.lengths[:n].sum())
        return Encoded(self.ids[:end], self.lengths[:n]), Encoded(self.ids[end:], self.lengths[n:])


class FileArray:
    """A 1-d array of an ``np.save`` file, read by position (``os.pread``): a read copies what it asks for
    into the process and nothing else. (Through a memory mapping every read brought the file's pages
    around it into the process, several MiB at a time where the page cache holds large folios, so that a
    run's resident memory grew towards the corpus's size as it read batches.)

    Raises:
        ValueError: not an ``np.save`` file of a 1-d C-ordered array, or shorter than its header says.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            shape, self.dtype, self.start = _npy_header(f)
            size = os.fstat(f.fileno()).st_size
        if len(shape) != 1 or self.start + shape[0] * self.dtype.itemsize > size:
            raise ValueError(f"a file of {size} bytes for an array of shape {shape}")
        self.shape = shape
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __getstate__(self) -> dict[str, Any]:  # a process that unpickles it opens the file again
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Items ``start`` to ``stop - 1`` (within the array)."""
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._fd, (stop - start) * size, self.start + start * size), dtype=self.dtype)


class _Sequences(Sequence):
    """Item i is ``flat[offsets[i]:offsets[i + 1]]``, read from the files by position.

    Args:
        flat: (total,) every sequence, one after another.
        offsets: (N + 1,) where each sequence starts, and the end.
    """

    def __init__(self, flat: FileArray, offsets: FileArray):
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _read(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} of {len(self)}")
        i %= len(self)
        start, stop = self.offsets.read(i, i + 2).tolist()
        return self.flat.read(start, stop)


class IdArray(_Sequences):
    """The id lists of a cache entry: item i is pair i's ids on one side, as a list."""

    def __getitem__(self, i: int) -> list[int]:
        return self._read(i).tolist()


class LineArray(_Sequences):
    """The raw lines of a cache entry: item i is pair i's line on one side (its UTF-8 bytes decoded)."""

    def __getitem__(self, i: int) -> str:
        return self._read(i).tobytes().decode("utf-8")


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a missing file is left to the reader's error)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return "unreadable"


def make_key(*parts: Any) -> str:
    """A short hash of JSON-able ``parts``: the name of a cache entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cacheable(fields: Sequence[Any]) -> bool:
    """True for the library's own fields (a Hugging Face model's tokenizer is not stored in a cache)."""
    return all(isinstance(f, TextField) and type(f.tokenizer) in (Tokenizer, SentencePieceTokenizer)
               and f.special_ids == LIBRARY_IDS for f in fields)


def fields_digest(fields: Sequence[TextField]) -> str:
    """The SHA-256 of what the fields store: vocabularies and SentencePiece models."""
    h = hashlib.sha256()
    for field in fields:
        itos, model = field.stored()
        for part in (json.dumps(itos).encode(), model or b""):
            h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` (a file or folder) through ``write(temporary path)``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        if path.is_dir():  # a damaged entry that is being rebuilt
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:
        if not path.exists():  # else another process wrote the same entry first
            raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def save_fields(path: Path, fields: Sequence[TextField]) -> None:
    """Store the fields built from the training text (JSON: vocabularies, base64 SentencePiece models)."""
    sides = [{"itos": itos, "spm": base64.b64encode(model).decode() if model else None}
             for itos, model in (f.stored() for f in fields)]
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                                "sides": sides})))


def load_fields(path: Path) -> tuple[TextField, TextField]:
    """The fields ``save_fields`` stored.

    Raises:
        CacheError: the file is missing, damaged or of another version.
    """
    try:
        stored = json.loads(path.read_text())
        _check_version(stored, path)
        src, tgt = (TextField(tokenizer_from_bytes(base64.b64decode(side["spm"]) if side["spm"] else None),
                              Vocab(side["itos"])) for side in stored["sides"])
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CacheError(f"{path}: not a readable corpus cache ({type(e).__name__})") from None
    return src, tgt


def _check_version(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT}")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path}: a corpus cache of version {manifest.get('version')}, "
                         f"this is version {VERSION}")


class CorpusArrays:
    """A cache entry, opened: every pair's lengths (in memory), ids and raw lines (read from the files).

    Args:
        folder: the entry.
        key: the key it must have been written with.
        vocab_sizes: the source and target vocabulary sizes (every id must be below them).

    Raises:
        CacheError: the entry is missing, half-written, damaged or of another version or key.
    """

    def __init__(self, folder: Path, key: str, vocab_sizes: tuple[int, int]):
        manifest_fn = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_fn.read_text())
        except OSError:
            raise CacheError(f"{folder}: no corpus cache (no manifest.json)") from None
        except ValueError:
            raise CacheError(f"{manifest_fn}: damaged (not JSON)") from None
        _check_version(manifest, manifest_fn)
        try:
            if manifest["key"] != key:
                raise CacheError(f"{manifest_fn}: written for other data (key {manifest['key']}, not {key})")
            self.n_pairs, self.n_replaced = int(manifest["pairs"]), int(manifest["replaced"])
            specs = dict(manifest["arrays"])
            # |lengths| = (N, 2): in memory, as every run reads all of them
            self.lengths = self._load(folder / "lengths.npy", specs.pop("lengths"), in_memory=True)
            if self.lengths.shape != (self.n_pairs, 2) or self.lengths.dtype != np.int32:
                raise CacheError(f"{folder / 'lengths.npy'}: not the (pairs, 2) int32 lengths")
            arrays = {name: self._load(folder / f"{name}.npy", spec) for name, spec in specs.items()}
            ids, lines = [], []
            for column, (side, vocab_size) in enumerate(zip(SIDES, vocab_sizes)):
                offsets = self._checked(folder, arrays, f"{side}.ids", f"{side}.offsets", self.lengths[:, column])
                ids.append(IdArray(arrays[f"{side}.ids"], offsets))
                lines.append(LineArray(arrays[f"{side}.text"],
                                       self._checked(folder, arrays, f"{side}.text", f"{side}.text_offsets")))
                if _largest(folder / f"{side}.ids.npy") >= vocab_size:
                    raise CacheError(f"{folder / side}.ids.npy: ids beyond the vocabulary of {vocab_size}")
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{manifest_fn}: damaged ({type(e).__name__}: {e})") from None
        self.src, self.tgt = ids
        self.src_lines, self.tgt_lines = lines

    @staticmethod
    def _load(path: Path, spec: dict[str, Any], in_memory: bool = False) -> np.ndarray | FileArray:
        try:
            array = np.load(path, allow_pickle=False) if in_memory else FileArray(path)
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: damaged or missing ({type(e).__name__})") from None
        if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise CacheError(f"{path}: {array.dtype} {list(array.shape)}, the manifest says "
                             f"{spec['dtype']} {spec['shape']}")
        return array

    def _checked(self, folder: Path, arrays: dict[str, np.ndarray], flat: str, name: str,
                 lengths: np.ndarray | None = None) -> np.ndarray:
        """The offsets ``name`` of the sequences in ``flat``, once checked: from 0 to the end of ``flat``,
        by the ``lengths`` (N,) if given, else by steps of 0 or more."""
        offsets, start, previous = arrays[name], 0, None
        fits = offsets.shape == (self.n_pairs + 1,)
        for chunk in _read_chunks(folder / f"{name}.npy") if fits else ():
            steps = np.diff(chunk) if previous is None else np.diff(chunk, prepend=previous)
            fits = (previous is not None or chunk[0] == 0) and bool(
                np.all(steps >= 0) if lengths is None else np.array_equal(steps, lengths[start:start + len(steps)]))
            if not fits:
                break
            start, previous = start + len(steps), chunk[-1]
        if not fits or previous != len(arrays[flat]):
            raise CacheError(f"{folder / name}.npy: offsets that do not fit {flat}.npy")
        return offsets


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and data offset of the ``np.save`` file ``f`` (left at the data)."""
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"an .npy file of version {version}")
    shape, fortran_order, dtype = read(f)
    if fortran_order:
        raise ValueError("a Fortran-ordered array")
    return shape, dtype, f.tell()


def _read_chunks(path: Path, chunk: int = 1 << 21) -> Iterator[np.ndarray]:
    """The array of the ``np.save`` file ``path`` (1-d) in chunks, so that a check reads it all without
    holding it all."""
    with open(path, "rb") as f:
        shape, dtype, _ = _npy_header(f)
        for _ in range(0, math.prod(shape), chunk):
            yield np.fromfile(f, dtype=dtype, count=chunk)


def _largest(path: Path) -> int:
    """The largest value of the array of the ``np.save`` file ``path`` (-1 if empty), read in chunks."""
    return max((int(chunk.max()) for chunk in _read_chunks(path)), default=-1)


def write_arrays(folder: Path, key: str, fields: Sequence[TextField], lines: Sequence[Sequence[str]],
                 n_replaced: int, processes: int, pieces: Sequence[Encoded | None] = (None, None)) -> None:
    """Encode the pairs and write them as the cache entry ``folder`` (atomically, the manifest last).

    Args:
        fields: the source and target fields.
        lines: the source and target lines.
        n_replaced: lines with replaced bytes (logged by every run that reads the entry).
        processes: encoding processes for a large corpus.
        pieces: each side's lines as SentencePiece ids, where the fields' building has them already.
    """

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        arrays, side_lengths = {}, []
        for side, field, side_lines, side_pieces in zip(SIDES, fields, lines, pieces):
            ids, lengths = encode(field, side_lines, processes, side_pieces)
            side_lengths.append(lengths)
            raw = [line.encode("utf-8") for line in side_lines]
            arrays[f"{side}.ids"] = ids
            arrays[f"{side}.offsets"] = _offsets_of(lengths)
            arrays[f"{side}.text"] = np.frombuffer(b"".join(raw), dtype=np.uint8)
            arrays[f"{side}.text_offsets"] = _offsets_of(np.fromiter(map(len, raw), np.int64, len(raw)))
        arrays["lengths"] = np.stack(side_lengths, axis=1).astype(np.int32)  # (N, 2)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        manifest = {"format": FORMAT, "version": VERSION, "key": key, "pairs": len(lines[0]), "replaced": n_replaced,
                    "arrays": {name: {"dtype": str(a.dtype), "shape": list(a.shape)} for name, a in arrays.items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    _write_atomic(folder, write)


def _offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 starts of N sequences of ``lengths``, and the end."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


# what an encoding process works on: the lines, the tokenizer and, once the vocabulary is built, the token -> id map
_worker: dict[str, Any] = {}


def _start_worker(model: bytes | None, itos: list[str] | None, lines: Sequence[Any]) -> None:
    _worker["tokenizer"], _worker["lines"] = tokenizer_from_bytes(model), lines
    if itos is not None:
        _worker["stoi"] = {s: i for i, s in enumerate(itos)}
        _worker["dtype"] = id_dtype(len(itos))


def _on_span(task: Callable[[Sequence[Any]], Any], span: tuple[int, int]) -> Any:
    return task(_worker["lines"][span[0]:span[1]])


def _count(lines: Sequence[str]) -> Counter[str]:
    return Counter(t for tokens in _worker["tokenizer"].encode_batch(lines) for t in tokens)


def _encode(lines: Sequence[str]) -> Encoded:
    stoi, tokens = _worker["stoi"], _worker["tokenizer"].encode_batch(lines)
    ids = np.fromiter((stoi.get(t, UNK) for sentence in tokens for t in sentence), dtype=_worker["dtype"])
    return Encoded(ids, np.fromiter(map(len, tokens), dtype=np.int32, count=len(tokens)))


def _piece_ids(lines: Sequence[str]) -> Encoded:
    tokenizer = _worker["tokenizer"]
    pieces = tokenizer.piece_ids(lines)
    ids = np.fromiter(chain.from_iterable(pieces), dtype=id_dtype(tokenizer.size()))
    return Encoded(ids, np.fromiter(map(len, pieces), dtype=np.int32, count=len(pieces)))


def _train_tokenizer(jobs: Sequence[tuple[Sequence[str], int, int]]) -> list[bytes | str]:
    """Each job's model, or SentencePiece's error message where it could not train one."""
    models: list[bytes | str] = []
    for job in jobs:
        try:
            models.append(SentencePieceTokenizer.train(*job).model_bytes())
        except RuntimeError as e:
            models.append(str(e))
    return models


def id_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest array type of a vocabulary's ids: uint16, or int32 past 65,536 ids."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _map(task: Callable[[Sequence[Any]], Any], model: bytes | None, itos: list[str] | None, items: Sequence[Any],
         processes: int, chunk: int = CHUNK_LINES) -> list[Any]:
    """``task`` on ``items`` (lines, or jobs) with a tokenizer (and vocabulary) set up: on chunks of ``chunk``
    items in ``processes`` forked processes, which inherit the items rather than receive them, or in one go in
    this process when ``processes`` is 1."""
    if processes <= 1 or len(items) <= 1:
        _start_worker(model, itos, items)
        try:
            return [task(items)]
        finally:
            _worker.clear()
    spans = [(i, min(i + chunk, len(items))) for i in range(0, len(items), chunk)]
    with multiprocessing.get_context("fork").Pool(min(processes, len(spans)), _start_worker,
                                                  (model, itos, items)) as pool:
        return pool.map(functools.partial(_on_span, task), spans, chunksize=1)


def _line_processes(lines: Sequence[str], processes: int) -> int:
    """The processes that encode ``lines``: this one alone when they are fewer than ``PARALLEL_LINES``."""
    return processes if len(lines) >= PARALLEL_LINES else 1


def _joined(parts: Sequence[Encoded], dtype: type[np.integer]) -> Encoded:
    return Encoded(np.concatenate([np.zeros(0, dtype=dtype), *(p.ids for p in parts)]),
                   np.concatenate([np.zeros(0, dtype=np.int32), *(p.lengths for p in parts)]))


def train_tokenizers(jobs: Sequence[tuple[Sequence[str], int, int]], processes: int) -> list[SentencePieceTokenizer]:
    """SentencePiece models of (lines, vocab_size, seed), each trained in a process of its own when there
    are several and ``processes`` > 1 (each trainer runs on one thread, so that the model does not depend
    on the machine).

    Raises:
        TokenizerTrainingError: a model SentencePiece could not train, with the job's index.
    """
    models = [model for part in _map(_train_tokenizer, None, None, jobs, processes, chunk=1) for model in part]
    for index, model in enumerate(models):
        if isinstance(model, str):
            raise TokenizerTrainingError(index, model)
    return [SentencePieceTokenizer(model) for model in models]


def encode_pieces(tokenizer: SentencePieceTokenizer, lines: Sequence[str], processes: int) -> Encoded:
    """Every line as the ids of its pieces in the SentencePiece model (``piece_ids``)."""
    parts = _map(_piece_ids, tokenizer.model_bytes(), None, lines, _line_processes(lines, processes))
    return _joined(parts, id_dtype(tokenizer.size()))


def count_tokens(tokenizer: Tokenizer, lines: Sequence[str], processes: int,
                 pieces: Encoded | None = None) -> Counter[str]:
    """How often each token occurs in ``lines`` (what ``Vocab.build`` counts); for SentencePiece, counted from
    the lines' ``pieces`` (``encode_pieces``) when given, a character the model has never seen counted as its
    unknown piece."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        pieces = pieces if pieces is not None else encode_pieces(tokenizer, lines, processes)
        counts, names = np.bincount(pieces.ids, minlength=tokenizer.size()), tokenizer.pieces()
        return Counter({names[i]: int(counts[i]) for i in np.flatnonzero(counts)})
    total: Counter[str] = Counter()
    for counts in _map(_count, None, None, lines, _line_processes(lines, processes)):
        total.update(counts)
    return total


def encode(field: TextField, lines: Sequence[str], processes: int, pieces: Encoded | None = None) -> Encoded:
    """Every line's ids (``field.to_ids``), one after another, and every line's length (N,) int32; for
    SentencePiece, mapped from the lines' ``pieces`` (``encode_pieces``) when given."""
    tokenizer, vocab = field.tokenizer, field.vocab
    if not isinstance(tokenizer, SentencePieceTokenizer):
        itos, model = field.stored()
        return _joined(_map(_encode, model, itos, lines, _line_processes(lines, processes)), id_dtype(len(itos)))
    pieces = pieces if pieces is not None else encode_pieces(tokenizer, lines, processes)
    to_vocab = np.array([vocab.stoi.get(piece, UNK) for piece in tokenizer.pieces()], dtype=id_dtype(len(vocab)))
    ids = to_vocab[pieces.ids]  # (total,)
    # where the model met a character it has never seen, to_ids looks the character itself up in the vocabulary
    unknown = np.flatnonzero(pieces.ids == tokenizer.unk_id())
    if len(unknown):
        offsets = _offsets_of(pieces.lengths)
        for line in np.unique(np.searchsorted(offsets, unknown, side="right") - 1).tolist():
            ids[offsets[line]:offsets[line + 1]] = field.to_ids(lines[line])
    return Encoded(ids, pieces.lengths)


def default_processes() -> int:
    """The encoding processes: the CPU cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
