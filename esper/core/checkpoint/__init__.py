"""Checkpoint storage (SPEC §5 C-1..C-3, C-7): safetensors files + a JSON manifest, written atomically and
verified before anything is loaded. Generic: it knows files, hashes and manifests, not the trainer (what a
training checkpoint holds is ``esper.core.tolaria.components``).

Modules: ``manifest`` (the format: one pydantic model), ``locate`` (names, ``latest``, resolving a path),
``verify`` (verified reads), ``write`` (atomic writes, pruning).
"""

from typing import TYPE_CHECKING, Any

from esper.core.checkpoint.locate import BEST, LATEST, latest_checkpoint, resolve_checkpoint
from esper.core.checkpoint.manifest import MANIFEST, SCHEMA_VERSION, STRUCTURAL_KEYS, Manifest, manifest_digest

if TYPE_CHECKING:
    from esper.core.checkpoint.verify import (
        FileCheck,
        LoadedCheckpoint,
        VerifyReport,
        load_checkpoint,
        verify_checkpoint,
    )
    from esper.core.checkpoint.write import (
        CheckpointPruneError,
        CheckpointWriteError,
        prune,
        write_checkpoint,
        write_pointer,
    )

# reading and writing tensors needs torch: imported on first use, so the operator views (`esper runs`, `watch`),
# which only read pointers and manifests, start without it
_LAZY = {**dict.fromkeys(("FileCheck", "LoadedCheckpoint", "VerifyReport", "load_checkpoint", "verify_checkpoint"),
                         "esper.core.checkpoint.verify"),
         **dict.fromkeys(("CheckpointPruneError", "CheckpointWriteError", "prune", "write_checkpoint",
                          "write_pointer"), "esper.core.checkpoint.write")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BEST", "LATEST", "MANIFEST", "SCHEMA_VERSION", "STRUCTURAL_KEYS", "CheckpointPruneError", "CheckpointWriteError",
    "FileCheck", "LoadedCheckpoint", "Manifest", "VerifyReport", "latest_checkpoint", "load_checkpoint",
    "manifest_digest", "prune", "resolve_checkpoint", "verify_checkpoint", "write_checkpoint", "write_pointer",
]
