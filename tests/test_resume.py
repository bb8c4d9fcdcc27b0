"""End-to-end resume (SPEC C-3, C-4; issue 4): exact continuation, same run directory, refusal of damaged,
pickled or differently-configured inputs. Runs the real `esper` app in-process on real (small) training."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_TOML,
    GROWING,
    SYNTHETIC,
    UNHURRIED,
    assert_same_tensors,
    checkpoint_dirs,
    esper,
    event_names,
    events,
    flip_byte,
    latest,
    malicious_torch_save,
    manifest,
    metrics,
    metrics_without_wall_clock,
    out,
    resume,
    rewrite_manifest,
    snapshot,
    summary,
    tensors,
    train,
    verify,
)

from esper.app.session import TrainSession
from esper.core import config as config_mod
from esper.core.errors import ExitCode

CONSTANT = 'trainer.lr_policy="constant"'


def transitions(seeds: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Seed records without wall-clock fields (utc, monotonic_ms)."""
    return [(s["slot"], s["stage"], s["blueprint"], s["seed_id"], s["alpha"],
             [(h["source"], h["dest"], h["trigger"], h["reason"]) for h in s["history"]]) for s in seeds]


def field_reports(run: Path) -> list[dict[str, Any]]:
    """Field reports without what differs between two runs of the same job (run id, issue time, digest)."""
    path = run / "field_reports.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line)["body"] for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("run_id", "issued_at")} for r in rows]


# ------------------------------------------------------------------------------------- exact resume (C-4)


@pytest.mark.slow
def test_three_epochs_plus_resume_to_six_is_bit_identical_on_the_default_task(tmp_path: Path) -> None:
    # lr_policy=constant (pinned, whatever the shipped default): a cosine spans trainer.epochs, so a 3-epoch run
    # *is* a different schedule from the first half of a 6-epoch one (the stop/resume test below covers cosine).
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = train(straight, *UNHURRIED, "trainer.epochs=6", CONSTANT)
    assert r.exit_code == 0, out(r)
    r = train(split, *UNHURRIED, "trainer.epochs=3", CONSTANT)
    assert r.exit_code == 0, out(r)
    assert [row["epoch"] for row in metrics(split)] == [1, 2, 3]
    r = resume(split, *UNHURRIED, "trainer.epochs=6", CONSTANT, allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)

    assert latest(straight).name == latest(split).name == "epoch-0006"
    for stem in ("model", "optimizer"):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(split), stem))
    assert metrics_without_wall_clock(split) == metrics_without_wall_clock(straight)
    assert [row["epoch"] for row in metrics(split)] == [1, 2, 3, 4, 5, 6]
    # the resumed run continued in the same run directory, appending
    s = summary(split)
    assert s["status"] == "COMPLETED" and s["exit_code"] == 0 and s["epochs_completed"] == 6
    assert Path(s["run_dir"]).resolve() == split.resolve()
    names = event_names(split)
    assert names.count("resumed") == 1 and names.count("run.started") == 1
    assert names.index("run.started") < names.index("resumed")
    resumed = next(e for e in events(split) if e["event"] == "resumed")
    assert resumed["level"] == "CRITICAL" and resumed["attributes"]["epoch"] == 3
    changed = next(e for e in events(split) if e["event"] == "config.changed_on_resume")
    assert changed["attributes"]["keys"] == ["trainer.epochs"]
    assert {e["run_id"] for e in events(split)} == {s["run_id"]}


class SignalAt:
    """A reporter that sends this process a real signal after global step ``step`` or at the end of epoch
    ``epoch_end`` -- the installed handler then stops the run exactly there."""

    def __init__(self, *, step: int | None = None, epoch_end: int | None = None,
                 signum: int = signal.SIGTERM) -> None:
        self.at_step, self.at_epoch_end, self.signum = step, epoch_end, signum
        self.steps = 0
        self.sent = False

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), self.signum)

    def epoch_start(self, epoch: int, steps: int) -> None:
        return None

    def step(self, loss: float) -> None:
        self.steps += 1
        if self.steps == self.at_step and not self.sent:
            self._send()

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        if row["epoch"] == self.at_epoch_end and not self.sent:
            self._send()

    def notice(self, text: str) -> None:
        return None


def stop_with_signal(run: Path, items: list[str], reporter: SignalAt) -> dict[str, Any]:
    cfg = config_mod.load(BASE_TOML, items).config
    return TrainSession.prepare(cfg, run_dir=run).run(reporter)


JOBS = {
    "digits-cosine": [*UNHURRIED, "trainer.epochs=6", 'trainer.lr_policy="cosine"'],
    "growing-seeds": [*GROWING, "trainer.epochs=8"],
    # windows of 4 of the epoch's 6 batches (then 2): an optimizer step every 4th or 6th batch; averaged weights
    "accumulating-ema": [*GROWING, "trainer.epochs=8", "trainer.accumulate_steps=4", "trainer.ema=0.9"],
}


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for job, items in JOBS.items():
        run = tmp_path_factory.mktemp("straight") / job
        r = train(run, *items)
        assert r.exit_code == 0, out(r)
        runs[job] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(("job", "where"), [
    ("digits-cosine", {"step": 50}),              # epoch 3, 7th of 22 steps; cosine over trainer.epochs
    ("growing-seeds", {"step": 27}),               # epoch 5, 4th of 6 steps: a seed mid-BLENDING
    ("growing-seeds", {"epoch_end": 4}),           # right after epoch 4's periodic checkpoint
    ("accumulating-ema", {"step": 26}),            # epoch 5, 2 batches into its first window: gradients pending
])
def test_signal_stop_then_resume_continues_exactly(tmp_path: Path, straight_runs: dict[str, Path], job: str,
                                                   where: dict[str, int]) -> None:
    straight, run = straight_runs[job], tmp_path / "split"
    reporter = SignalAt(**where)
    stopped = stop_with_signal(run, JOBS[job], reporter)
    assert reporter.sent
    assert stopped["status"] == "STOPPED" and stopped["exit_code"] == ExitCode.SIGTERM
    assert stopped["failure"] is None
    # a graceful stop is a clean checkpoint, never a failed write (e.g. a name clash with the periodic one)
    assert "checkpoint.failed" not in event_names(run), [e for e in events(run) if e["event"] == "checkpoint.failed"]
    assert verify(run).exit_code == 0
    stop_point = manifest(latest(run))
    if "step" in where and job != "accumulating-ema":
        assert stop_point["step_in_epoch"] > 0 and stop_point["global_step"] == where["step"]
    if job == "accumulating-ema":  # 8 optimizer steps in 4 epochs; the 2 batches of the open window are saved
        assert (stop_point["step_in_epoch"], stop_point["global_step"]) == (2, 8)
        assert stop_point["accumulation"]["pending"] == 2 and tensors(latest(run), "accumulation")
        assert stop_point["ema"]["updates"] and tensors(latest(run), "ema")
    if job == "growing-seeds" and "step" in where:
        stages = {s["stage"] for s in stop_point["seeds"]}
        assert "BLENDING" in stages, stages  # the resume really crosses a live, half-blended seed

    r = resume(run, *JOBS[job])
    assert r.exit_code == 0, out(r)
    for stem in ("model", "optimizer", *(["ema"] if job == "accumulating-ema" else [])):
        assert_same_tensors(tensors(latest(straight), stem), tensors(latest(run), stem))
    assert metrics_without_wall_clock(run) == metrics_without_wall_clock(straight)
    assert transitions(summary(run)["seeds"]) == transitions(summary(straight)["seeds"])
    assert summary(run)["status"] == "COMPLETED"
    assert field_reports(run) == field_reports(straight)


# -------------------------------------------------------------------------------- resume target forms


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pristine") / "run"
    r = train(run, *SYNTHETIC, "trainer.epochs=2")
    assert r.exit_code == 0, out(r)
    return run


@pytest.fixture
def run2(two_epoch_run: Path, tmp_path: Path) -> Path:
    """A private copy of a finished 2-epoch synthetic run (checkpoints epoch-0001, epoch-0002)."""
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("form", ["run dir", "checkpoints dir", "checkpoint dir", "manifest"])
def test_resume_accepts_every_path_form_and_appends_to_the_run(run2: Path, form: str) -> None:
    target = {"run dir": run2, "checkpoints dir": run2 / "checkpoints", "checkpoint dir": latest(run2),
              "manifest": latest(run2) / "manifest.json"}[form]
    before = (run2 / "events.jsonl").read_text()
    r = resume(target, *SYNTHETIC, "trainer.epochs=3", allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    assert (run2 / "events.jsonl").read_text().startswith(before)  # appended, nothing rewritten
    assert [row["epoch"] for row in metrics(run2)] == [1, 2, 3]
    assert latest(run2).name == "epoch-0003"
    assert summary(run2)["status"] == "COMPLETED" and summary(run2)["epochs_completed"] == 3
    assert event_names(run2).count("resumed") == 1
    assert 'epochs = 3' in (run2 / "config.toml").read_text()  # the config the run now continues under


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_rewinds_metrics_without_duplicates(run2: Path) -> None:
    r = resume(run2 / "checkpoints" / "epoch-0001", *SYNTHETIC, "trainer.epochs=2")
    assert r.exit_code == 0, out(r)
    assert [row["epoch"] for row in metrics(run2)] == [1, 2]
    assert "metrics.rewound" in event_names(run2)
    # the redone epoch 2 never overwrites the abandoned timeline's epoch-0002 (which `latest` pointed at)
    assert latest(run2).name.startswith("epoch-0002-redo") and verify(run2).exit_code == 0
    assert (run2 / "checkpoints" / "epoch-0002").is_dir()


# ----------------------------------------------------------------------------- refusals (C-3, config hash)


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["model", "optimizer", "rng"])
def test_flipped_byte_is_refused_by_verify_and_by_resume_which_trains_nothing(run2: Path, stem: str) -> None:
    fname = f"{stem}.safetensors"
    flip_byte(latest(run2) / fname)
    before = snapshot(run2)

    v = verify(run2)
    assert v.exit_code == ExitCode.CHECKPOINT, out(v)
    assert fname in v.output and "mismatch" in v.output

    r = resume(run2, *SYNTHETIC, "trainer.epochs=4", allow=["trainer.epochs"])
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    assert fname in r.output
    assert snapshot(run2) == before  # no metrics row, no checkpoint, no event, no summary, no config rewrite




def test_the_crafted_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    # Control for the two tests below: without it, "the marker never appears" could pass vacuously.
    marker = tmp_path / "control"
    with zipfile.ZipFile(malicious_torch_save(marker, tmp_path / "m.pt")) as z:
        pickle.loads(z.read("archive/data.pkl"))  # the only unpickling here, of bytes this test made
    assert marker.exists()


@pytest.mark.parametrize("command", ["resume", "inspect", "inspect --verify"])
def test_pt_file_is_refused_with_exit_4_and_never_unpickled(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "PWNED"
    pt = malicious_torch_save(marker, tmp_path / "model.pt")
    args = command.split()[1:]
    r = resume(pt, *SYNTHETIC) if command == "resume" else esper("inspect-checkpoint", str(pt), *args)
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    assert "pickle" in r.output.lower()
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_pickle_in_place_of_a_tensor_file_is_refused_by_resume(run2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    malicious_torch_save(marker, latest(run2) / "model.safetensors")
    before = snapshot(run2)
    r = resume(run2, *SYNTHETIC, "trainer.epochs=4", allow=["trainer.epochs"])
    assert r.exit_code == ExitCode.CHECKPOINT, out(r)
    assert "model.safetensors" in r.output
    assert not marker.exists()
    assert snapshot(run2) == before


@pytest.mark.slow
def test_changed_config_is_refused_naming_the_key_unless_allowed(run2: Path) -> None:
    before = snapshot(run2)
    r = resume(run2, *SYNTHETIC, "trainer.lr=0.0123")
    assert r.exit_code == ExitCode.CONFIG, out(r)
    assert "trainer.lr" in r.output and "--allow-config-change" in r.output
    # allowing some other key does not let this one through
    r = resume(run2, *SYNTHETIC, "trainer.lr=0.0123", allow=["trainer.epochs"])
    assert r.exit_code == ExitCode.CONFIG, out(r)
    assert "trainer.lr" in r.output
    assert snapshot(run2) == before

    r = resume(run2, *SYNTHETIC, "trainer.lr=0.0123", "trainer.epochs=3", allow=["trainer.lr", "trainer.epochs"])
    assert r.exit_code == 0, out(r)
    assert summary(run2)["status"] == "COMPLETED"
    assert [row["epoch"] for row in metrics(run2)] == [1, 2, 3]
    changed = next(e for e in events(run2) if e["event"] == "config.changed_on_resume")
    assert changed["attributes"]["keys"] == ["trainer.epochs", "trainer.lr"]
    assert latest(run2).name == "epoch-0003"
    assert manifest(latest(run2))["config_hash"] != manifest(run2 / "checkpoints" / "epoch-0002")["config_hash"]
    assert checkpoint_dirs(run2) == ["epoch-0001", "epoch-0002", "epoch-0003"]


@pytest.mark.parametrize("key", ["config_toml", "config_hash", "seeds", "history"])
def test_verify_passes_a_run_checkpoint_exactly_when_resume_can_use_it(run2: Path, key: str) -> None:
    """Issue 26: with ``config_toml`` removed (the seal recomputed) --verify said ok while --resume refused it."""
    ckpt = latest(run2)
    rewrite_manifest(ckpt, lambda doc: doc.pop(key))
    checked = esper("inspect-checkpoint", str(ckpt), "--verify")
    assert checked.exit_code == ExitCode.CHECKPOINT, checked.output
    assert f"missing key '{key}' (not a training checkpoint)" in checked.output.replace("\n", " ")
    resumed = esper("train", "--resume", str(ckpt))
    assert resumed.exit_code == ExitCode.CHECKPOINT, resumed.output
