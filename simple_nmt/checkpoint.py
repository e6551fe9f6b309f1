"""Plain-data checkpoints: atomic writes, loads that can never run code."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.handlers.checkpoint import BaseSaveHandler

from simple_nmt.distributed import is_main_process

META_KEYS = {"config", "src_vocab", "tgt_vocab", "src_spm", "tgt_spm"}
UNUSABLE = "not a usable simple-nmt checkpoint"  # how every message about a damaged checkpoint begins


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def save_checkpoint(data: Mapping[str, Any], path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A process killed at any moment leaves either the old file or the new one, never a partial one.

    Raises:
        CheckpointError: the file could not be written (e.g. the disk is full); the file
            already at ``path``, if any, is unchanged and no temporary file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(data), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as RuntimeError
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
            raise CheckpointError(f"{path}: could not write the checkpoint ({detail}); "
                                  "the file in place, if any, is unchanged") from None
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint of plain data with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, truncated or corrupted file, or one that needs pickle to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: {UNUSABLE}: truncated or corrupted (not a complete torch archive)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found or "weights_only" in str(e):
            what = f"needs {found.group(1)}" if found else "holds objects that only pickle can load"
            raise CheckpointError(f"{path}: refused: the checkpoint {what}; only plain data is loaded") from None
        raise CheckpointError(f"{path}: {UNUSABLE}: truncated or corrupted (UnpicklingError)") from None
    except Exception as e:  # a damaged archive can fail anywhere in torch's reader and unpickler
        raise CheckpointError(f"{path}: {UNUSABLE}: truncated or corrupted ({type(e).__name__})") from None
    problem = checkpoint_problem(data)
    if problem:
        raise CheckpointError(f"{path}: {UNUSABLE}: {problem}")
    return data


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def checkpoint_problem(data: Any) -> str | None:
    """What makes loaded ``data`` unusable as a checkpoint (its layout and the types it holds), or None.

    The meaning of the contents (the config's values, the vocabularies' special tokens, the
    tokenizers, the weights' shapes) is checked where they are used, by the CLI.
    """
    if not isinstance(data, dict):
        return f"it holds a {type(data).__name__}, not a dict"
    meta = data.get("meta")
    if not isinstance(meta, dict) or "model" not in data:
        return f"it lacks model weights or meta data {sorted(META_KEYS)}"
    missing = sorted(META_KEYS - meta.keys())
    if missing:
        return f"its meta data lacks {', '.join(missing)}"
    if not _is_state(meta["config"]):
        return "its config is not a dict of option names"
    for key in ("src_vocab", "tgt_vocab"):
        if not isinstance(meta[key], list) or not all(isinstance(token, str) for token in meta[key]):
            return f"its {key} is not a list of strings"
    for key in ("src_spm", "tgt_spm"):
        if meta[key] is not None and not isinstance(meta[key], bytes):
            return f"its {key} is neither bytes nor None"
    hf = meta.get("hf", {})  # a Hugging Face model's config and tokenizer files
    if not _is_state(hf) or not all(isinstance(v, bytes) for v in hf.values()):
        return "its Hugging Face files are not a dict of file names to bytes"
    # the weights, and the RL phase's frozen start model (KL penalty)
    for key, what in (("model", "model weights"), ("reference", "KL start model's weights")):
        weights = data.get(key, {})
        if not _is_state(weights) or not all(torch.is_tensor(v) for v in weights.values()):
            return f"its {what} are not a state dict of tensors"
    for key in ("optimizer", "scheduler", "scaler", "trainer", "best_checkpointer"):
        if key in data and not _is_state(data[key]):
            return f"its {key} state is not a dict"
    if "trainer" in data:  # ignite's state: the epoch length and the iteration (or epoch) reached
        trainer = data["trainer"]
        if not isinstance(trainer.get("epoch_length"), int) or trainer["epoch_length"] < 1:
            return "its trainer state has no epoch length"
        counts = [trainer[k] for k in ("iteration", "epoch") if k in trainer]
        if not counts or not all(isinstance(n, int) and n >= 0 for n in counts):
            return "its trainer state has no iteration or epoch count"
    return None


class AtomicSaver(BaseSaveHandler):
    """Save handler for ``ignite.handlers.Checkpoint``: atomic writes, removals only after a good write.

    Ignite asks to remove a superseded file before it saves the new one; this
    handler defers that removal until the new file is safely in place, and never
    removes the file it is about to overwrite. In a distributed run only rank 0
    writes (the ranks hold the same weights), like ignite's ``DiskSaver``.
    """

    def __init__(self, dirname: str | Path):
        self.dirname = Path(dirname)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if is_main_process():
            save_checkpoint(checkpoint, self.dirname / filename)
            for old in self._pending:
                if old != filename and (self.dirname / old).exists():
                    os.remove(self.dirname / old)
        self._pending = []

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


def average_checkpoints(paths: list[str | Path],
                        check: Callable[[dict[str, Any], str | Path], None] | None = None) -> dict[str, Any]:
    """Average the model weights of checkpoints of one run (e.g. its last epochs).

    Returns a checkpoint that holds only the mean weights and the first file's meta, plus
    ``meta["averaged_from"]`` (the file names): it translates, and starts a new phase
    (``continue_train.py --reset_optimizer`` or ``--rl_n_epochs``), but resumes nothing.
    Floating-point tensors are summed in float64; other tensors must be equal in every file.

    Raises:
        CheckpointError: no files, a file that does not load, or one whose weights, vocabularies
            or tokenizers differ in shape or content from the first file's.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    first = load_checkpoint(paths[0])
    if check is not None:
        check(first, paths[0])
    sums = {k: v.double() if v.is_floating_point() else v for k, v in first["model"].items()}
    for path in paths[1:]:
        other = load_checkpoint(path)
        if check is not None:
            check(other, path)
        for key in sorted(META_KEYS - {"config"}):  # the vocabularies and tokenizers
            if other["meta"][key] != first["meta"][key]:
                raise CheckpointError(f"{path}: its {key} differs from {paths[0]}'s; average checkpoints of one run")
        weights = other["model"]
        if weights.keys() != sums.keys() or any(weights[k].shape != v.shape for k, v in sums.items()):
            raise CheckpointError(f"{path}: its weights differ in names or shapes from {paths[0]}'s")
        for key, value in weights.items():
            if value.is_floating_point():
                sums[key] += value.double()
            elif not torch.equal(value, sums[key]):
                raise CheckpointError(f"{path}: its non-float tensor {key} differs from {paths[0]}'s")
    model = {k: (v / len(paths)).to(first["model"][k].dtype) if v.is_floating_point() else v
             for k, v in sums.items()}
    meta = dict(first["meta"], averaged_from=[str(p) for p in paths])
    return {"model": model, "meta": meta}
