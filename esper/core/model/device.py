"""The run's device and precision, checked before anything is written (``run.device``, ``run.precision``).

A device this torch cannot use is a ConfigError (exit 3) naming the key and what torch reports; there is never
a fallback to another device, because a run that silently trains on the CPU instead of the GPU it was given
is a lost day.
"""

from __future__ import annotations

import torch

from esper.core.config import EsperConfig
from esper.core.errors import ConfigError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _torch_says(exc: BaseException) -> str:
    """The first line of torch's own message (its dispatcher errors run to pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a torch device torch can allocate on, or a ConfigError saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"run.device = {name!r}: torch does not know this device ({_torch_says(exc)})",
                          key="run.device") from exc
    if device.type == "cpu":
        return device
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = ("this torch build has no MPS support" if not torch.backends.mps.is_built()
               else "torch.backends.mps.is_available() is False on this machine")
        raise ConfigError(f"run.device = {name!r}: {why}; set run.device = 'cpu' to train on the CPU",
                          key="run.device")
    if device.type == "cuda" and torch.cuda.is_available() and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"run.device = {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})", key="run.device")
    try:
        torch.zeros(1, device=device)  # what torch itself says about this device, in its own words
    except (RuntimeError, AssertionError, NotImplementedError) as exc:  # AssertionError: a CPU-only build
        raise ConfigError(f"run.device = {name!r}: torch cannot use it ({_torch_says(exc)}); set run.device = "
                          "'cpu' to train on the CPU", key="run.device") from exc
    return device


def check(cfg: EsperConfig) -> torch.device:
    """Check ``run.device`` and ``run.precision`` together (part of ``esper.app.preflight``)."""
    device = resolve_device(cfg.run.device)
    dtype = DTYPES[cfg.run.precision]
    if dtype is not None:
        try:
            with torch.autocast(device.type, dtype=dtype):
                torch.nn.functional.linear(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
        except (RuntimeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"run.precision = {cfg.run.precision!r}: torch has no {dtype} autocast on "
                              f"{device} ({_torch_says(exc)}); use run.precision = 'fp32'",
                              key="run.precision") from exc
    return device

