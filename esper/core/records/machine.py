"""What a figure was measured on. CPU runs are bit-reproducible on one machine, not across CPU kinds (AVX2,
AVX-512 and ARM kernels round differently), so every document that carries figures (``esper bench``, ``esper
compare``) names the CPU model, the instruction set torch dispatches to and the torch build."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    if CPUINFO.is_file():
        for line in CPUINFO.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def describe() -> dict[str, str]:
    """``cpu``, ``isa`` (torch's CPU capability: DEFAULT, AVX2, AVX512, SVE256, ...), ``arch``, ``torch``,
    ``python``."""
    return {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "arch": platform.machine(),
            "torch": torch.__version__, "python": platform.python_version()}


def line() -> str:
    m = describe()
    return f"measured on: {m['cpu']} ({m['arch']}, {m['isa']}), torch {m['torch']}, Python {m['python']}"
