"""Data-parallel training across the processes that torchrun starts.

torchrun describes the run in the environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` ...). ``process_group`` joins it through
``ignite.distributed``; everything else asks ``idist.get_rank()`` and
``idist.get_world_size()``, which are 0 and 1 in a plain ``python train.py``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ignite.distributed as idist
import torch
from torch.nn.parallel import DistributedDataParallel


@contextmanager
def process_group(use_gpu: bool) -> Iterator[None]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) for the body; a no-op without torchrun.

    Args:
        use_gpu: one GPU per process (``cuda:LOCAL_RANK``), else the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    idist.initialize("nccl" if use_gpu else "gloo")
    try:
        yield
    finally:
        # the run's engines and DDP model, held in reference cycles, are freed now, while the process group
        # and the interpreter are alive: left to the exit, a CPU (gloo) run of 2 processes ended in about one
        # of ten with SIGABRT, "terminate called without an active exception" (tests/test_distributed.py)
        gc.collect()
        idist.finalize()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` in a distributed run, ``model`` itself otherwise.

    Wrapping broadcasts rank 0's parameters to every rank. ``idist.auto_model`` is not
    used: without torchrun it would wrap the model in ``DataParallel`` on a multi-GPU
    machine, and with gloo it would move the model to a GPU when one is visible.

    Args:
        model: already on ``device``.
    """
    if idist.get_world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_main_process() -> bool:
    """True on rank 0, the process that prints, logs and writes checkpoints."""
    return idist.get_rank() == 0
