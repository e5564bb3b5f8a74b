"""The one precision policy: (device, the bundle's ``amp`` switch) -> autocast dtype and grad scaler.

Training, validation and prediction all ask :func:`autocast_dtype`:

- ``amp`` false: fp32 everywhere.
- CUDA: bf16 autocast where the GPU computes bf16 (Ampere and later), no grad scaler (bf16 has
  fp32's range); else fp16 autocast with a grad scaler (:func:`grad_scaler`).
- CPU: bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX): measured
  1.4-1.6x faster than fp32 there with the same Dice (BENCHMARKS.md); elsewhere fp32, because
  emulated bf16 is slower than fp32.

The decision is logged once per device and dtype; ``segpipe train`` records it in MLflow (param
``amp_dtype``). Where it is applied:

- training: MONAI's ``SupervisedTrainer`` autocasts on CUDA itself (``amp`` + ``amp_kwargs``,
  with the scaler that ``pipeline.train`` gives it); on a CPU the bundle's training inferer is
  :func:`autocast_inferer` (MONAI's engines autocast only on CUDA);
- validation and prediction: ``pipeline.inference.OverlapTileInferer`` autocasts its windows
  (evaluators run with ``amp`` false, so nothing is autocast twice).

``SEGPIPE_CPU_BF16=1`` (or ``0``) overrides the CPU detection: for testing the bf16 path on a CPU
without it (``pytest --cpu-bf16 on``) or for turning it off on one that has it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import lru_cache
from typing import Any

import torch
from monai.inferers import Inferer

log = logging.getLogger(__name__)

CPU_BF16_ENV = "SEGPIPE_CPU_BF16"
_logged: set[tuple[str, str]] = set()


@lru_cache(maxsize=1)
def _cpu_flags_have_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = set()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, p, lambda: False)()) for p in probes)


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX; plain AVX512 is not enough),
    unless ``SEGPIPE_CPU_BF16`` says otherwise (``1`` forces it on, ``0`` off)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_flags_have_bf16()


def autocast_dtype(device: torch.device | str, amp: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: bf16, fp16, or None for fp32 (see the module
    docstring). Logged once per device type and result."""
    device = torch.device(device)
    dtype: torch.dtype | None = None
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp and device.type == "cpu" and cpu_has_bf16():
        dtype = torch.bfloat16
    name = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with a grad scaler"}[dtype]
    if (device.type, name) not in _logged:
        _logged.add((device.type, name))
        why = " (no native bf16 on this CPU: AVX512-BF16 or AMX)" if amp and dtype is None else ""
        log.info("precision on %s: %s%s", device.type, name if amp else "fp32 (amp off)", why)
    return dtype


def cuda_amp(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether MONAI's own AMP (CUDA autocast and grad scaler in ``SupervisedTrainer``) is on."""
    return dtype is not None and torch.device(device).type == "cuda"


def grad_scaler(device: torch.device | str, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A CUDA grad scaler, enabled only for fp16 (bf16 and fp32 need none: a disabled scaler
    passes the loss and the optimizer step through unchanged)."""
    enabled = dtype == torch.float16 and torch.device(device).type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``'s type, or a no-op for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class _AutocastInferer(Inferer):
    def __init__(self, inferer: Inferer, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inferer, self.device, self.dtype = inferer, device, dtype

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.device, self.dtype):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def autocast_inferer(inferer: Inferer, device: torch.device | str, dtype: torch.dtype | None) -> Inferer:
    """The training inferer: ``inferer`` under CPU autocast when ``dtype`` is set on a CPU device
    (on CUDA the trainer itself autocasts); unchanged otherwise."""
    if dtype is None or torch.device(device).type != "cpu":
        return inferer
    return _AutocastInferer(inferer, device, dtype)
