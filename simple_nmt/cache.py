"""The encoded training corpus on disk: built once, then memory-mapped by later runs and every torchrun rank.

A cache folder (``--cache_dir``; by default ``PREFIX.SRCTGT.cache`` beside the training files,
e.g. ``data/train.ende.cache``) holds, in numpy's own format (``np.save``, read back with
``np.load(mmap_mode="r")``)::

    fields-KEY.json      the fields built from the training text (vocabularies, SentencePiece models);
                         KEY: the files' contents and the options that build them
    KEY/                 the training pairs encoded with one pair of fields; KEY: the files' contents,
                         --lang, --encoding_errors and the fields
        manifest.json    written last: format, version, key, pairs, every array's shape and dtype
        src.ids.npy      every source id, one pair after another (uint16; int32 past 65,536 ids)
        src.offsets.npy  (N + 1,) int64: pair i's ids are ids[offsets[i]:offsets[i + 1]]
        src.text.npy     the raw lines as UTF-8 bytes (uint8), with src.text_offsets.npy (N + 1,)
        tgt.*            the same for the target side

``--max_length`` is applied when the cache is read (from the offsets), so one cache serves
every length limit. An entry is written into a temporary folder and renamed into place, so
a half-written one is never read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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

FORMAT, VERSION = "simple_nmt corpus cache", 1
CHUNK_LINES = 10_000  # lines per task of the encoding processes
PARALLEL_LINES = 200_000  # fewer lines are encoded in this process
SIDES = ("src", "tgt")


class CacheError(DataError):
    """A cache entry that cannot be read; the message is one line naming it."""


class IdArray(Sequence):
    """Memory-mapped id lists: item i is ``ids[offsets[i]:offsets[i + 1]]`` as a list.

    Args:
        ids: (total,) every id, one sequence after another.
        offsets: (N + 1,) where each sequence starts, and the end.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets
        self.lengths = np.diff(offsets).astype(np.int32)  # (N,) read by ParallelDataset instead of every sequence

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()


class LineArray(Sequence):
    """Memory-mapped lines: item i is ``text[offsets[i]:offsets[i + 1]]`` decoded from UTF-8.

    Args:
        text: (total,) uint8, every line's bytes, one after another.
        offsets: (N + 1,) where each line starts, and the end.
    """

    def __init__(self, text: np.ndarray, offsets: np.ndarray):
        self.text, self.offsets = text, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.text[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


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
    """A cache entry, memory-mapped: every pair's ids and raw lines.

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
            arrays = {name: self._load(folder / f"{name}.npy", spec) for name, spec in manifest["arrays"].items()}
            ids, lines = [], []
            for side, vocab_size in zip(SIDES, vocab_sizes):
                ids.append(IdArray(arrays[f"{side}.ids"], self._offsets(arrays, f"{side}.ids", f"{side}.offsets")))
                lines.append(LineArray(arrays[f"{side}.text"],
                                       self._offsets(arrays, f"{side}.text", f"{side}.text_offsets")))
                if _largest(folder / f"{side}.ids.npy", arrays[f"{side}.ids"]) >= vocab_size:
                    raise CacheError(f"{folder / side}.ids.npy: ids beyond the vocabulary of {vocab_size}")
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{manifest_fn}: damaged ({type(e).__name__}: {e})") from None
        self.src, self.tgt = ids
        self.src_lines, self.tgt_lines = lines

    @staticmethod
    def _load(path: Path, spec: dict[str, Any]) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: damaged or missing ({type(e).__name__})") from None
        if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
            raise CacheError(f"{path}: {array.dtype} {list(array.shape)}, the manifest says "
                             f"{spec['dtype']} {spec['shape']}")
        return array

    def _offsets(self, arrays: dict[str, np.ndarray], flat: str, name: str) -> np.ndarray:
        offsets = arrays[name]
        if (offsets.shape != (self.n_pairs + 1,) or offsets[0] != 0 or offsets[-1] != len(arrays[flat])
                or np.any(np.diff(offsets) < 0)):
            raise CacheError(f"{name}.npy: offsets that do not fit {flat}.npy")
        return offsets


def _largest(path: Path, array: np.memmap, chunk: int = 1 << 24) -> int:
    """The largest value of the memory-mapped ``array`` (-1 if empty), read from ``path`` in chunks
    rather than through the mapping, which would count the whole file in the memory of the process."""
    largest = -1
    with open(path, "rb") as f:
        f.seek(array.offset)
        for _ in range(0, array.size, chunk):
            largest = max(largest, int(np.fromfile(f, dtype=array.dtype, count=chunk).max()))
    return largest


def write_arrays(folder: Path, key: str, fields: Sequence[TextField], lines: Sequence[Sequence[str]],
                 n_replaced: int, processes: int) -> None:
    """Encode the pairs and write them as the cache entry ``folder`` (atomically, the manifest last).

    Args:
        fields: the source and target fields.
        lines: the source and target lines.
        n_replaced: lines with replaced bytes (logged by every run that maps the entry).
        processes: encoding processes for a large corpus.
    """

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        arrays = {}
        for side, field, side_lines in zip(SIDES, fields, lines):
            ids, lengths = encode(field, side_lines, processes)
            raw = [line.encode("utf-8") for line in side_lines]
            arrays[f"{side}.ids"] = ids
            arrays[f"{side}.offsets"] = _offsets_of(lengths)
            arrays[f"{side}.text"] = np.frombuffer(b"".join(raw), dtype=np.uint8)
            arrays[f"{side}.text_offsets"] = _offsets_of(np.fromiter(map(len, raw), np.int64, len(raw)))
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


# the field of an encoding process: its tokenizer and, once the vocabulary is built, the token -> id map
_worker: dict[str, Any] = {}


def _start_worker(model: bytes | None, itos: list[str] | None) -> None:
    _worker["tokenizer"] = tokenizer_from_bytes(model)
    if itos is not None:
        _worker["stoi"] = {s: i for i, s in enumerate(itos)}
        _worker["dtype"] = id_dtype(len(itos))


def _count(lines: Sequence[str]) -> Counter[str]:
    return Counter(t for tokens in _worker["tokenizer"].encode_batch(lines) for t in tokens)


def _encode(lines: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    stoi, tokens = _worker["stoi"], _worker["tokenizer"].encode_batch(lines)
    ids = np.fromiter((stoi.get(t, UNK) for sentence in tokens for t in sentence), dtype=_worker["dtype"])
    return ids, np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))


def id_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest array type of a vocabulary's ids: uint16, or int32 past 65,536 ids."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _map(task: Callable[[Sequence[str]], Any], model: bytes | None, itos: list[str] | None,
         lines: Sequence[str], processes: int) -> list[Any]:
    """``task`` on chunks of ``lines`` with a tokenizer (and vocabulary): in ``processes`` processes
    when the lines are many, else in this one."""
    chunks = [lines[i:i + CHUNK_LINES] for i in range(0, len(lines), CHUNK_LINES)]
    if processes <= 1 or len(lines) < PARALLEL_LINES:
        _start_worker(model, itos)
        try:
            return [task(chunk) for chunk in chunks]
        finally:
            _worker.clear()
    with multiprocessing.get_context("fork").Pool(processes, _start_worker, (model, itos)) as pool:
        return pool.map(task, chunks)


def count_tokens(tokenizer: Tokenizer, lines: Sequence[str], processes: int) -> Counter[str]:
    """How often each token occurs in ``lines`` (what ``Vocab.build`` counts)."""
    total: Counter[str] = Counter()
    for counts in _map(_count, tokenizer.model_bytes(), None, lines, processes):
        total.update(counts)
    return total


def encode(field: TextField, lines: Sequence[str], processes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every line's ids (``field.to_ids``), one after another, and every line's length (N,) int64."""
    itos, model = field.stored()
    parts = _map(_encode, model, itos, lines, processes)
    if not parts:
        return np.zeros(0, dtype=id_dtype(len(itos))), np.zeros(0, dtype=np.int64)
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([lengths for _, lengths in parts])


def default_processes() -> int:
    """The encoding processes: the CPU cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
