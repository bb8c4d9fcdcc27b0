"""The device a run trains on (``run.device``), checked once, in one place: an unavailable device is a config
error naming the key and torch's own reason (exit 3), never a crash and never a CPU fallback (SPEC §1, H-7)."""

from __future__ import annotations

import torch

from esper.core.bounded import clip
from esper.core.errors import ConfigError


def resolve_device(name: str, key: str = "run.device") -> torch.device:
    """``name`` as a torch device this process can use, or ConfigError saying why not."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{key} = {name!r}: not a device torch knows: {clip(str(exc), 200)}", key=key) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = {name!r}: CUDA is not available: {_cuda_reason()}", key=key)
    return device


def _cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as exc:  # torch reports a missing driver or device this way
        return clip(str(exc), 300)
    return "torch.cuda.is_available() is false"
