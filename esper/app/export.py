"""`esper export` and `esper.load_model`: the trained network out of Esper, as a plain ``nn.Module``.

An export directory holds ``model.safetensors`` (the host's tensors as ``host.*``, each kept seed's as
``seeds.<slot>.*``: the ``GrownModel``'s own state dict, no pickle) and ``export.json`` (``ExportManifest``: the
run's config, the task's input shape and output count, each kept seed's slot, layer, kind, blueprint and alpha,
and the weights file's size and BLAKE3 digest). FOSSILIZED seeds are part of the network; DORMANT, CULLED,
EMBARGOED and RESETTING slots hold none; a seed still mid-lifecycle (GERMINATED .. PROBATIONARY) is refused
unless ``live=True`` keeps it at the alpha it has now. Reading an export trusts nothing: the manifest is bounded
and validated, the weights hashed before they are loaded, the config validated like any config.

A host or blueprint that is a user plug-in is rebuilt from its ``module:function`` (``host.factory``,
``seeds.user_blueprints``): that module must be importable where the model is loaded, as it was for training.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import blake3
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load, save_file

from esper.app.session import Resume
from esper.core.checkpoint import BEST, LoadedCheckpoint, latest_checkpoint
from esper.core.checkpoint.payload import SeedRecord
from esper.core.config import EsperConfig, from_toml_text
from esper.core.data import Task, build_task
from esper.core.errors import CheckpointError, ConfigError, UsageError
from esper.core.io import bounded, confine
from esper.core.io.durable import fsync_dir, fsync_file
from esper.core.kasmina import BlueprintRegistry, SlotShape
from esper.core.kasmina.blending import parse_blend
from esper.core.kasmina.grown import GrownModel, KeptSeed
from esper.core.kasmina.kinds import resolve
from esper.core.model.host import build_host, probe_host
from esper.statemachines import SEED_LIVE

FORMAT = "esper.export/1"
MANIFEST, WEIGHTS = "export.json", "model.safetensors"
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_WEIGHTS_BYTES = 64 * 2**30
KEPT = "FOSSILIZED"
BLENDED = frozenset({"BLENDING", "SHADOWING", "PROBATIONARY"})  # in the forward at their alpha (--live keeps them)
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class ExportedSeed(BaseModel):
    model_config = _STRICT

    slot: str = Field(min_length=1, max_length=128)
    layer: str = Field(min_length=1, max_length=256)
    kind: str
    shape: list[int] = Field(min_length=1, max_length=3)
    blueprint: str = Field(min_length=1, max_length=128)
    stage: str
    alpha: float = Field(ge=0.0, le=1.0)


class WeightsEntry(BaseModel):
    model_config = _STRICT

    file: Literal["model.safetensors"]
    bytes: int = Field(ge=0, le=MAX_WEIGHTS_BYTES)
    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExportManifest(BaseModel):
    """``export.json``: written by ``export_checkpoint``, read by ``load_model``; the one description of both."""

    model_config = _STRICT

    format: Literal["esper.export/1"]
    run_id: str = Field(max_length=256)
    checkpoint: str = Field(max_length=4096)
    epoch: int = Field(ge=0)
    input_shape: list[int] = Field(min_length=1, max_length=8)
    n_outputs: int = Field(ge=1)
    seeds: list[ExportedSeed] = Field(max_length=64)
    dropped: dict[str, str] = Field(max_length=64)  # slot -> its stage, for slots whose seed was not kept
    config_toml: str = Field(max_length=2**20)
    weights: WeightsEntry
    averaged: bool = False  # the weights are the run's trainer.ema moving average (what its validation judged)


@dataclass
class Exported:
    out: Path
    manifest: ExportManifest


def _kept(records: list[SeedRecord], live: bool) -> tuple[list[SeedRecord], dict[str, str]]:
    kept: list[SeedRecord] = []
    dropped: dict[str, str] = {}
    refused: list[str] = []
    for r in records:
        if r.stage == KEPT or (live and r.stage in BLENDED):
            kept.append(r)
        elif r.stage in SEED_LIVE:
            refused.append(f"{r.slot} ({r.stage}, alpha {r.alpha:g})")
            dropped[r.slot] = r.stage
        else:
            dropped[r.slot] = r.stage
    if refused and not live:
        raise ConfigError(f"seed(s) {', '.join(refused)} are still mid-lifecycle: only FOSSILIZED seeds are part of "
                          "the network; train on until they fossilize or are culled, or pass --live to keep them at "
                          "their current alpha", key="--live")
    return kept, dropped


@dataclass
class Grown:
    """A checkpoint's network as a plain module, with what built it."""

    model: GrownModel
    cfg: EsperConfig
    task: Task
    checkpoint: LoadedCheckpoint
    seeds: list[ExportedSeed]
    dropped: dict[str, str]
    averaged: bool  # the weights are trainer.ema's moving average, not the last step's


def export_checkpoint(target: Path, out: Path, *, live: bool = False) -> Exported:
    """Write the network of a verified checkpoint (a run directory means its ``best`` with checkpoint.keep_best,
    else its ``latest``) to ``out``, which must
    not exist or be empty; everything is written to a temporary directory first and renamed into place."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory: export writes a directory of its own",
                         key="-o")
    grown = grown_network(_best_of(target), live=live)
    model, task, loaded, seeds, dropped = grown.model, grown.task, grown.checkpoint, grown.seeds, grown.dropped
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights = tmp / WEIGHTS
        save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(weights))
        fsync_file(weights)
        data = weights.read_bytes()
        manifest = ExportManifest(
            format=FORMAT, run_id=loaded.manifest.run_id, checkpoint=str(loaded.path), epoch=loaded.manifest.epoch,
            input_shape=list(task.input_shape), n_outputs=task.n_outputs, seeds=seeds, dropped=dropped,
            config_toml=loaded.manifest.config_toml or "", averaged=grown.averaged,
            weights=WeightsEntry(file=WEIGHTS, bytes=len(data), blake3=blake3.blake3(data).hexdigest()))
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        fsync_file(tmp / MANIFEST)
        umask = os.umask(0)
        os.umask(umask)
        for path, mode in ((tmp, 0o777), (weights, 0o666), (tmp / MANIFEST, 0o666)):
            path.chmod(mode & ~umask)  # a directory for others to read, as any file the user writes
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, manifest)


def _best_of(target: Path) -> Path:
    """A run directory with a ``best`` pointer (checkpoint.keep_best) means its best checkpoint; anything else is
    resolved as usual (a run directory: its ``latest``; a checkpoint: itself)."""
    root = target / "checkpoints"
    if target.is_dir() and (root / BEST).exists():
        best = latest_checkpoint(root, BEST)
        if best is not None:
            return best
    return target


def grown_network(target: Path, *, live: bool = False, overrides: Sequence[str] = ()) -> Grown:
    """The network of a verified checkpoint as a plain module (FOSSILIZED seeds kept; with ``live``, seeds still
    blending at their current alpha), built from the checkpoint's config (``overrides`` on top) and loaded
    strictly with its weights."""
    resume = Resume.load(target)
    loaded = resume.checkpoint
    cfg = resume.config_with(overrides) if overrides else resume.config
    kept, dropped = _kept(loaded.manifest.seeds or [], live)
    task = build_task(cfg)
    host = build_host(cfg, task.input_shape, task.n_outputs)
    probe = probe_host(host, [r.layer for r in kept], task.example_x(), cfg.host.output)
    declared = {sc.name: sc.kind for sc in cfg.seeds.slots}
    shapes = {r.slot: resolve(declared.get(r.slot, "auto"), probe.shapes[r.layer], f"seeds.slots ({r.slot})", r.layer)
              for r in kept}
    model = _assemble(cfg, host, [(r.slot, r.layer, shapes[r.slot], r.blueprint, r.alpha) for r in kept])
    tensors = loaded.tensors["model"]
    state = {f"host.{k.removeprefix('host.')}": v for k, v in tensors.items() if k.startswith("host.")}
    # trainer.ema: the averaged weights, the ones every validation of the run judged, over the trained ones
    averaged = loaded.tensors.get("ema", {}) if cfg.trainer.ema else {}
    state.update({k: v for k, v in averaged.items() if k.startswith("host.")})
    for r in kept:
        head = f"seed.{r.slot}."
        for source in (tensors, averaged):
            state.update({f"seeds.{r.slot}.{k.removeprefix(head)}": v for k, v in source.items()
                          if k.startswith(head)})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{loaded.path}: its tensors do not fit the network its config builds: {exc}") from exc
    seeds = [ExportedSeed(slot=r.slot, layer=r.layer, kind=shapes[r.slot].kind, shape=list(shapes[r.slot].shape),
                          blueprint=r.blueprint, stage=r.stage, alpha=r.alpha) for r in kept]
    return Grown(model.eval(), cfg, task, loaded, seeds, dropped, bool(averaged))


def read_manifest(directory: Path) -> ExportManifest:
    try:
        raw = confine.read_bytes(directory / MANIFEST, MAX_MANIFEST_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{directory}: not an Esper export ({MANIFEST}: {exc.strerror or exc})") from exc
    try:
        return ExportManifest.model_validate(bounded.loads_json(raw))
    except (ValueError, ValidationError) as exc:  # a ValidationError is a ValueError; loads_json raises ValueError
        raise CheckpointError(f"{directory / MANIFEST}: not a valid export manifest: {bounded.clip(str(exc), 400)}"
                              ) from exc


def load_model(directory: Path | str) -> GrownModel:
    """Rebuild an exported network: the host from the export's config, each kept seed from its blueprint, the
    weights checked against their digest and loaded strictly. Returned in eval mode."""
    directory = Path(directory)
    m = read_manifest(directory)
    try:
        data = confine.read_bytes(directory / WEIGHTS, m.weights.bytes + 1)
    except OSError as exc:
        raise CheckpointError(f"{directory / WEIGHTS}: {exc.strerror or exc}") from exc
    if len(data) != m.weights.bytes or blake3.blake3(data).hexdigest() != m.weights.blake3:
        raise CheckpointError(f"{directory / WEIGHTS}: size or BLAKE3 digest differs from {MANIFEST}: the weights "
                              "were changed or damaged after export")
    try:
        cfg = from_toml_text(m.config_toml, source=f"{directory / MANIFEST} [config_toml]")
    except ConfigError as exc:
        raise CheckpointError(str(exc), key=exc.key) from None
    try:
        shapes = [SlotShape(e.kind, tuple(e.shape)) for e in m.seeds]
    except ValueError as exc:
        raise CheckpointError(f"{directory / MANIFEST}: {exc}") from exc
    host = build_host(cfg, tuple(m.input_shape), m.n_outputs)
    model = _assemble(cfg, host, [(e.slot, e.layer, shape, e.blueprint, e.alpha)
                                  for e, shape in zip(m.seeds, shapes, strict=True)])
    try:
        state = load(data)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 -- safetensors' own errors for a forged file are a damaged export
        raise CheckpointError(f"{directory / WEIGHTS}: does not load into the network {MANIFEST} describes: "
                              f"{bounded.clip(str(exc), 400)}") from exc
    return model.eval()


def _assemble(cfg: EsperConfig, host: torch.nn.Module, seeds: list[tuple[str, str, SlotShape, str, float]]
              ) -> GrownModel:
    """The host and each kept seed (slot, layer, shape, blueprint, alpha), built as the run built them."""
    budget = cfg.seeds.budget_for(sum(p.numel() for p in host.parameters()))
    registry = BlueprintRegistry(cfg.seeds.model_copy(update={"param_budget": budget}))
    unknown = [b for _, _, _, b, _ in seeds if b not in registry]
    if unknown:
        raise CheckpointError(f"blueprint(s) {unknown} are neither built in nor in the config's seeds.user_blueprints")
    modules = dict(host.named_modules())  # a copied layer's seed is rebuilt from the layer (its weights are loaded)
    kept = [KeptSeed(slot, layer, shape, alpha, registry.make(blueprint, shape, cfg.run.seed, modules[layer]))
            for slot, layer, shape, blueprint, alpha in seeds]
    return GrownModel(host, kept, parse_blend(cfg.seeds.blend), cfg.host.output)
