"""Shared test helpers. Pytest loads this module first; test modules import what they use from it by name
(``from conftest import events, flip_byte``). Fixture modules a child process imports by ``module:function``
(``fake_controllers``, ``plugins_fixture``) stay modules of their own.

- :class:`EventRecorder`: an ``emit`` stand-in that keeps every event it is given (thread-safe);
- :func:`events` / :func:`event_names`: a run's ``events.jsonl``, read by Esper's own reader;
- :func:`flip_byte`: damage one byte of a file in place;
- :func:`malicious_pickle` / :func:`malicious_torch_save`: inputs whose unpickling runs code;
- :func:`make_config`: a validated config from a base and ``key=value`` overrides;
- :func:`seed_to_training` / :func:`seed_to_probationary`: drive a seed through its gates on any Kasmina;
- running ``esper`` in-process (CliRunner) or as the real console script, and reading a run directory back.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from esper.cli.main import app
from esper.core.checkpoint import manifest_digest
from esper.core.config import EsperConfig, from_dict
from esper.core.kasmina import Kasmina, SeedSlot
from esper.core.model.host import HostProbe
from esper.core.records.event_log import read_events
from esper.core.tolaria.rollback import FastSnapshot, RollbackError, RollbackManager, StructureChanged

# ------------------------------------------------------------------------------------------------ events


class Event(NamedTuple):
    source: str
    event: str
    level: str
    attributes: dict[str, Any]


class EventRecorder:
    """Stands in for the telemetry emitter: ``emit(source, event, level, **attributes)``, kept in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, source: str, event: str, level: str = "INFO", **attributes: Any) -> None:
        with self._lock:
            self.events.append(Event(source, event, str(level), attributes))

    def all(self, event: str) -> list[Event]:
        """The events named ``event``."""
        return [e for e in self.events if e.event == event]

    def named(self, event: str) -> list[dict[str, Any]]:
        """The attributes of the events named ``event``."""
        return [e.attributes for e in self.all(event)]


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait until the code under test reports ``cond`` (a counter, a thread gone, a file), polling every few ms.

    For what a thread or process reports, never a guessed duration: in-process handshakes use threading.Event."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.002)


# ------------------------------------------------------------------------------------------------ files


def flip_byte(path: Path, offset: int = -1) -> None:
    """Invert one byte of a file in place (offset from the start, or from the end when negative)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# Inputs whose unpickling runs code: used to prove no Esper path ever unpickles (SPEC §1, C-3).
# The payload's ``__reduce__`` calls ``open(marker, "w")``: the marker file appearing means code from the input ran.
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


# ------------------------------------------------------------------------------------------------ configs


def make_config(*overrides: str, base: Mapping[str, Any] | Sequence[str] = ()) -> EsperConfig:
    """A validated config: ``base`` (a dict of sections, or overrides applied first), then ``overrides``."""
    if isinstance(base, Mapping):
        return from_dict(json.loads(json.dumps(base)), overrides)
    return from_dict({}, [*base, *overrides])


# --------------------------------------------------------------------------------------------- seeds


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``gpu`` (``gpu(2)``: two devices) run only where torch sees that many CUDA devices; elsewhere
    they are deselected, never skipped or faked. ``pytest -m gpu`` on a GPU machine runs them all."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("gpu")
        (drop if mark is not None and devices < (mark.args[0] if mark.args else 1) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def new_kasmina(cfg: EsperConfig, host: torch.nn.Module, probe: HostProbe, emit: Any,
                build: Callable[..., torch.nn.Module] | None = None) -> Kasmina:
    """Kasmina built from ``cfg`` as the run's builder builds it (its section and the three values it reads
    from others)."""
    return Kasmina(cfg.seeds, host, probe, emit, run_seed=cfg.run.seed, output=cfg.host.output,
                   fossilize_min_improvement=cfg.controller.fossilize_min_improvement, build=build)


def fake_evaluate(bypass: frozenset[str]) -> dict[str, float]:
    """Validation with the seed is better than without it: counterfactual gain 0.5."""
    return {"val_loss": 1.5, "val_accuracy": 0.4} if bypass else {"val_loss": 1.0, "val_accuracy": 0.6}


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero weights everywhere, so a seed that leaked into the host would change its gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def seed_to_training(k: Kasmina, slot: str, blueprint: str, x: torch.Tensor, y: torch.Tensor) -> SeedSlot:
    """Germinate (G0) and pass the G1 probe on the batch ``(x, y)``."""
    k.germinate(slot, blueprint, "test")
    result = k.probe_g1(slot, x, y, torch.nn.functional.cross_entropy)
    assert result.passed, result.reason
    k.start_training(slot, result, "test")
    return k.slots[slot]


def seed_to_probationary(k: Kasmina, name: str, blueprint: str, x: torch.Tensor, y: torch.Tensor) -> SeedSlot:
    """Drive a seed through G1, G2, G3 and SHADOWING with the real end_epoch logic."""
    slot = seed_to_training(k, name, blueprint, x, y)
    st = slot.stats
    # one finished epoch with seed loss 2.0 and the current one at 1.0: a 50% improvement for G2
    st.epoch_losses = [2.0]
    st.loss_sum, st.loss_count = 1.0, 1
    st.epochs_in_stage = k.scfg.min_training_epochs - 1
    k.end_epoch(fake_evaluate)
    assert slot.stage == "BLENDING"
    for _ in range(k.spec.steps):
        k.forward(x)
        k.after_step()
    assert slot.alpha == 1.0
    k.end_epoch(fake_evaluate)
    assert slot.stage == "SHADOWING"
    k.end_epoch(fake_evaluate)
    assert slot.stage == "PROBATIONARY"
    return slot


# --------------------------------------------------------------------------------------- esper, run dirs

REPO = Path(__file__).resolve().parents[1]
# the built-in defaults (an empty file); the shipped esper.toml is MNIST-1D on a cnn host, tested on its own
BASE_TOML = REPO / "tests" / "data" / "base.toml"
SHIPPED = REPO / "esper.toml"
ESPER = Path(sys.executable).parent / "esper"
WALL_CLOCK_FIELDS = ("step_time_ms", "step_seconds")  # the compute figures: FLOPs are exact, seconds are not

# Small synthetic job: 6 steps per epoch; seconds for a whole run.
SYNTHETIC = ['data.task="synthetic"']
# Wall-clock budgets a busy CI box could miss would make lifecycle decisions timing-dependent; lift them. One
# torch thread: on a shared box, spinning intra-op workers cost more CPU than they save.
UNHURRIED = ["run.threads=1", "seeds.max_step_latency_ms=600000.0", "controller.risk.max_step_latency_ms=600000.0",
             "controller.timeout_ms=120000", "emergency.slow_step_ms=600000.0"]
# A synthetic job whose controller germinates at once, so resumes cross live seed stages (TRAINING, BLENDING...).
GROWING = [*SYNTHETIC, *UNHURRIED, "controller.plateau_min_delta=1.0", "controller.warmup_epochs=0",
           "controller.plateau_window=2",
           "seeds.min_training_epochs=1", "seeds.g2_min_improvement=0.0", "seeds.blend.steps=10"]


def sets(*items: str) -> list[str]:
    """``--set`` flags for each ``key=value``."""
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def esper(*args: str) -> Result:
    """Invoke the real `esper` app in-process with the base config (the built-in defaults)."""
    return CliRunner().invoke(app, ["--config", str(BASE_TOML), *args], env={"COLUMNS": "250"})


def train(run_dir: Path, *items: str, extra: Sequence[str] = ()) -> Result:
    """`esper train --quiet --run-dir RUN --set ...` in-process."""
    return esper("train", "--quiet", "--run-dir", str(run_dir), *sets(*items), *extra)


def resume(target: Path, *items: str, allow: Sequence[str] = ()) -> Result:
    """`esper train --quiet --resume TARGET --set ... --allow-config-change ...` in-process."""
    flags = [a for key in allow for a in ("--allow-config-change", key)]
    return esper("train", "--quiet", "--resume", str(target), *sets(*items), *flags)


def verify(target: Path) -> Result:
    return esper("inspect-checkpoint", str(target), "--verify")


def out(result: Result) -> str:
    """Everything the command printed (stdout and stderr are mixed by CliRunner), plus any exception."""
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += f"\n{type(result.exception).__name__}: {result.exception}"
    return text


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def metrics_without_wall_clock(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_FIELDS} for row in metrics(run)]


def events(run: Path, name: str | None = None) -> list[dict[str, Any]]:
    """A run's events (all, or those named ``name``), read by Esper's own tolerant reader; the file of a run that
    has ended must have no bad line."""
    result = read_events(run / "events.jsonl")
    assert result.problems == [], result.problems
    return [e for e in result.records if name is None or e["event"] == name]


def event_names(run: Path) -> list[str]:
    return [e["event"] for e in events(run)]


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def latest(run: Path) -> Path:
    ckpts = run / "checkpoints"
    return ckpts / (ckpts / "latest").read_text().strip()


def rewrite_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None], *, rehash: bool = True) -> None:
    """Edit the manifest; by default re-seal it so only the edited property is wrong (a deliberate attacker)."""
    doc = json.loads((ckpt / "manifest.json").read_text())
    edit(doc)
    if rehash:
        doc["manifest_sha256"] = manifest_digest(doc)
    (ckpt / "manifest.json").write_text(json.dumps(doc))


def manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text())


def checkpoint_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def tensors(ckpt: Path, stem: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / f"{stem}.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not differing, f"tensors differ: {differing}"


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (relative path -> bytes): proves a refused command touched nothing."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- subprocesses


def spawn(run_dir: Path, *items: str, log: Path, flags: Sequence[str] = (),
          env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The real console script in its own session (so a signal to its group is a terminal's Ctrl-C)."""
    return _spawn_train(["--run-dir", str(run_dir)], items, log, flags, env)


def spawn_resume(target: Path, *items: str, log: Path, flags: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`esper train --resume TARGET`, as :func:`spawn` starts a run."""
    return _spawn_train(["--resume", str(target)], items, log, flags, env)


def _spawn_train(where: list[str], items: Sequence[str], log: Path, flags: Sequence[str],
                 env: Mapping[str, str] | None) -> subprocess.Popen[bytes]:
    cmd = [str(ESPER), "--config", str(BASE_TOML), "train", "--quiet", *where, *sets(*items), *flags]
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**(env if env is not None else os.environ), "COLUMNS": "250"})


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str,
             timeout: float = 180.0) -> None:
    """Wait until the running child reports ``cond`` (a file it wrote, an event it emitted), polling every few
    ms; fail (with the child's output) if the child exits first or time runs out. Never a guessed duration."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"esper exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.005)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"esper did not exit within {timeout}s:\n{log.read_text()}") from None


def reported(run: Path, event: str, **attributes: Any) -> bool:
    """Whether a (running) run's events.jsonl already holds ``event`` with these attributes (torn tail skipped)."""
    path = run / "events.jsonl"
    if not path.exists():
        return False
    return any(e["event"] == event and all(e["attributes"].get(k) == v for k, v in attributes.items())
               for e in read_events(path).records)


def pointer_names(run: Path) -> str | None:
    """The name `latest` holds right now, or None before the first checkpoint."""
    try:
        return (run / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def temp_dirs(run: Path, prefix: str = ".tmp-") -> list[str]:
    ckpts = run / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith(prefix))


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session, e.g. a controller worker left behind by a killed trainer."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


# ------------------------------------------------------------------------------------------ run-dir readers

# A real second process that takes a run directory's writer lock, says so on stdout, and holds it until its stdin
# closes: a live writer as `watch`/`runs` see one, without training.
_HOLDER = """
import sys
from pathlib import Path
from esper.core.records.runlock import RunLock
with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def release(holder: subprocess.Popen[str]) -> None:
    """Let a :func:`hold_lock` holder go and wait until it has (the lock dies with it)."""
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(60)


def spawn_esper(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """The real console script with text pipes for stdout and stderr (a non-terminal, as in a log)."""
    return subprocess.Popen([str(ESPER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250", **(env or {})})


def break_fast_tier(monkeypatch: Any) -> None:
    """In-place restore finds a changed structure; the structural restore then fails too: a rollback falls
    through to the full tier (the last verified checkpoint)."""
    def in_place(self: FastSnapshot, live: Any) -> None:
        raise StructureChanged("test: live state no longer matches the snapshot")

    def structural(self: RollbackManager) -> Any:
        raise RollbackError("test: structural restore failed")

    monkeypatch.setattr(FastSnapshot, "restore_into", in_place)
    monkeypatch.setattr(RollbackManager, "structural_states", structural)


# Installed as sitecustomize in a child process: every finder answers "no such module" for the package, the way a
# machine without it does (the package itself is never uninstalled).
_HIDE_PACKAGE = """
import sys

class _Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
"""


def without_package(tmp_path: Path, name: str) -> dict[str, str]:
    """The environment of a child process in which the installed package ``name`` cannot be found (checked)."""
    site = tmp_path / f"site-without-{name}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_HIDE_PACKAGE.format(name=name))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    find = f"import importlib.util; print(importlib.util.find_spec({name!r}))"
    probe = subprocess.run([sys.executable, "-c", find], env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None", f"{name} is still found"  # the blocker works
    return env


# ------------------------------------------------------------------------------------- rank processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env() -> dict[str, str]:
    """The environment of an `esper` rank process: one intra-op thread, the tests' plug-ins importable."""
    tests = str(Path(__file__).parent)
    return {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}

