"""Inputs whose unpickling runs code: used to prove no Esper path ever unpickles (SPEC §1, C-3).

The payload's ``__reduce__`` calls ``open(marker, "w")``: the marker file appearing means code from the input ran.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any


class Marker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def malicious_pickle(marker: Path, key: str = "weight") -> bytes:
    return pickle.dumps({key: Marker(marker)}, protocol=4)


def malicious_torch_save(marker: Path, dest: Path) -> Path:
    """The layout `torch.save` writes (a zip holding archive/data.pkl), built without torch.save."""
    with zipfile.ZipFile(dest, "w") as z:
        z.writestr("archive/data.pkl", malicious_pickle(marker))
        z.writestr("archive/version", "3\n")
    return dest
