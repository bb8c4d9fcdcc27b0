"""Shared plumbing for the end-to-end resume / crash-safety tests: run `esper` in-process (CliRunner) or as the
real console script (subprocess, for real signals), and read back a run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from esper.cli.main import app

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TOML = REPO / "esper.toml"
ESPER = Path(sys.executable).parent / "esper"
WALL_CLOCK_FIELDS = ("step_time_ms",)

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
    """Invoke the real `esper` app in-process with the shipped config."""
    return CliRunner().invoke(app, ["--config", str(SHIPPED_TOML), *args], env={"COLUMNS": "250"})


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


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def event_names(run: Path) -> list[str]:
    return [e["event"] for e in events(run)]


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def latest(run: Path) -> Path:
    ckpts = run / "checkpoints"
    return ckpts / (ckpts / "latest").read_text().strip()


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


def spawn(run_dir: Path, *items: str, log: Path) -> subprocess.Popen[bytes]:
    """The real console script in its own session (so a signal to its group is a terminal's Ctrl-C)."""
    cmd = [str(ESPER), "--config", str(SHIPPED_TOML), "train", "--quiet", "--run-dir", str(run_dir), *sets(*items)]
    with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "COLUMNS": "250"})


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str,
             timeout: float = 180.0) -> None:
    """Poll ``cond`` every few ms; fail (with the child's output) if the child exits first or time runs out."""
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
