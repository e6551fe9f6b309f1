"""Mixed precision, decided once per run for CPU and GPU alike (``--precision``).

The weights, the optimizer state and the loss stay float32; under ``bf16`` or ``fp16`` the
matrix products of the forward pass (and so of its backward) run in that type through
``torch.autocast``. ``fp16`` needs a loss scaler against gradient underflow; ``bf16`` has
float32's range and needs none.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionWarning(RuntimeWarning):
    """A precision this machine runs more slowly than float32."""


class PrecisionError(ValueError):
    """A precision this device cannot run; the message is one line naming ``--precision``."""


@functools.cache
def cpu_has_native(name: str) -> bool:
    """Whether this CPU multiplies ``bf16`` / ``fp16`` matrices in hardware (AVX-512 BF16, AMX)."""
    checks = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"), "fp16": ("_is_amx_fp16_supported",)}
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks[name])


def lstm_precision() -> AbstractContextManager:
    """The precision of an LSTM call: float32 (autocast off) under CPU autocast on a CPU without native
    support for the autocast type, where oneDNN has no LSTM in that type; else the current autocast."""
    if torch.is_autocast_enabled("cpu"):
        name = {dtype: n for n, dtype in DTYPES.items()}.get(torch.get_autocast_dtype("cpu"))
        if name is not None and not cpu_has_native(name):
            return torch.autocast("cpu", enabled=False)
    return nullcontext()


def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The type a matrix product on ``device_type`` computes in here: the autocast type where autocast is
    on, else ``default`` (its operands' type)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


@contextmanager
def onednn_off() -> Iterator[None]:
    """ATen's CPU kernels instead of oneDNN's inside; oneDNN on again after."""
    torch.backends.mkldnn.set_flags(False, _fp32_precision=None)
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(True, _fp32_precision=None)


def lstm_backend(x: torch.Tensor) -> AbstractContextManager:
    """oneDNN off for an LSTM call on CPU that records a graph (the encoder in training, RL re-scoring)
    in float32.

    For backward oneDNN keeps a byte workspace per call about three times the gates ATen's LSTM
    saves. Without a graph (search, validation) oneDNN stays, and so it does under CPU autocast
    (``lstm_precision`` leaves it on only where the CPU has the type): ATen's bf16 LSTM was the
    slower one there. Seq2Seq's decoder trains on neither on CPU: ``UnrolledLSTM`` steps it by hand.
    """
    graph_in_fp32 = torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    on = x.device.type == "cpu" and torch.backends.mkldnn.enabled and graph_in_fp32
    return onednn_off() if on else nullcontext()


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` is fp32, bf16 or fp16 on ``device_type`` (cpu, cuda)."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast type (None: float32 throughout)."""
        return DTYPES.get(self.name)

    def autocast(self) -> torch.autocast:
        """The autocast context of the forward passes (a no-op for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 only."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """The precision ``--precision name`` means on ``device``.

    ``auto`` is mixed precision on CUDA (bf16 where the GPU supports it, else fp16) and
    float32 on CPU. bf16 or fp16 on a CPU without native support for it warns
    (``PrecisionWarning``): it runs, more slowly than float32.

    Raises:
        PrecisionError: an unknown name, or bf16 on a GPU without it.
    """
    device = torch.device(device)
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {name!r}")
    cuda = device.type == "cuda"
    if name == "auto":
        name = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if cuda and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("--precision bf16: this GPU has no bfloat16; use --precision fp16")
    if device.type == "cpu" and name in DTYPES and not cpu_has_native(name):
        warn_slow_cpu(name)
    return Precision(name, device.type)


@functools.cache  # once per process: a run builds an engine per phase
def warn_slow_cpu(name: str) -> None:
    """Warn that this CPU runs ``name`` (bf16, fp16) in software."""
    kind = "AVX-512 BF16 or AMX" if name == "bf16" else "AMX-FP16"
    warnings.warn(f"--precision {name}: this CPU has no {kind}, so {name} runs slower than fp32 here",
                  PrecisionWarning, stacklevel=3)
