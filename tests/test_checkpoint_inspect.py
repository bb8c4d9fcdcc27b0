"""`esper inspect-checkpoint` (C-7): tables, --json, --verify exit codes, damaged and malicious inputs."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import flip_byte, malicious_torch_save
from typer.testing import CliRunner, Result

from esper.cli.inspect import inspect_checkpoint
from esper.core import checkpoint as ck

app = typer.Typer()


@app.callback()
def _root() -> None:
    """Forces the subcommand name, as in the real `esper` app."""


app.command("inspect-checkpoint")(inspect_checkpoint)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["inspect-checkpoint", *args], env={"COLUMNS": "250"})


def _seed(slot: str, stage: str, value: int, history: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    stats = {"epochs_in_stage": kw.get("epochs_in_stage", 0), "alpha_step": 0, "epoch_losses": [], "loss_sum": 0.0,
             "loss_count": 0, "latency_ms_sum": 0.0, "counterfactual": {}, "embargo_left": 0}
    return {"slot": slot, "layer": "hidden1", "seed_id": kw.get("seed_id"), "blueprint": kw.get("blueprint"),
            "stage": stage, "stage_value": value, "alpha": kw.get("alpha", 0.0),
            "epochs_in_stage": kw.get("epochs_in_stage", 0), "germinations": 1 if history else 0, "stats": stats,
            "history": history}


def _move(machine: str, subject: str, source: str, dest: str, trigger: str, reason: str, utc: str) -> dict[str, Any]:
    return {"machine": machine, "subject": subject, "source": source, "dest": dest, "trigger": trigger,
            "reason": reason, "utc": utc, "monotonic_ms": 1.5, "gate": None}


# A training checkpoint's payload in format v1 (the manifest schema checks every field's type)
FULL_PAYLOAD: dict[str, Any] = {
    "run_id": "run-abc",
    "reason": "periodic",
    "epoch": 3,
    "step_in_epoch": 0,
    "global_step": 300,
    "saved_at": "2025-05-01T12:00:00Z",
    "trainer_state": "TRAINING",
    "emergency": {"level": "ELEVATED", "ewma": 0.5, "healthy_epochs": 0, "consecutive_rollbacks": 1, "history": [
        _move("emergency", "run", "NOMINAL", "ELEVATED", "raise_elevated", "loss-spike-detected", "t0")]},
    "seeds": [
        _seed("block1", "BLENDING", 4, [
            _move("seed", "block1", "DORMANT", "GERMINATED", "germinate", "plateau", "t1"),
            _move("seed", "block1", "TRAINING", "BLENDING", "start_blending", "g1-passed-cosine", "t2")],
            seed_id="seed-7", blueprint="conv_adapter", alpha=0.25, epochs_in_stage=2),
        _seed("block2", "DORMANT", 1, []),
    ],
    "controller": {"schema_version": "tamiyo-state/1", "run_id": "run-abc", "observed_epochs": 5},
    "metrics": {"val_loss": 0.4321, "val_accuracy": 0.875},
    "history": [{"epoch": 3, "global_step": 300, "val_loss": 0.4321, "val_accuracy": 0.875}],
    "epoch_stats": None,
    "rollbacks": [],
    "commands": {"accepted": 1},
    "optimizer": {"groups": [{"name": "host", "lr": 0.01, "weight_decay": 0.0001, "params": [0, 1]},
                             {"name": "seed-7", "lr": 0.005, "weight_decay": 0.0, "params": [2]}],
                  "scalars": {}, "kind": "sgd"},
    "config_toml": "[run]\nseed = 1\n",
    "config_hash": "cafe1234" * 8,
    "versions": {"esper": "0.1.0", "torch": "2.x", "python": "3.11"},
}


def tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.ones(2, 3), "e": torch.zeros(4, dtype=torch.bfloat16)},
            "optimizer": {"s": torch.arange(3)},
            "rng": {"cpu": torch.arange(8, dtype=torch.uint8)}}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return ck.write_checkpoint(tmp_path / "run" / "checkpoints", "epoch-0003", tensors(), FULL_PAYLOAD,
                               keep_last=2)


def test_tables_show_every_section(ckpt: Path) -> None:
    res = run(str(ckpt.parents[1]))  # the run dir
    assert res.exit_code == 0, res.output
    out = res.stdout
    for text in ("run-abc", "300", "2025-05-01T12:00:00Z", "version.torch", "2.x",  # identity
                 "TRAINING", "ELEVATED", "loss-spike-detected",  # trainer + emergency
                 "block1", "seed-7", "conv_adapter", "BLENDING", "0.250", "TRAINING → BLENDING (start_blending)",
                 "g1-passed-cosine", "block2",  # slots: last transition and its reason
                 "val_loss", "0.4321",  # metrics
                 "bfloat16×1", "uint8×1",  # tensor summary
                 "weight_decay", "0.005",  # optimizer groups
                 "model.safetensors", "integrity: ok"):
        assert text in out, text
    assert "plateau" not in out  # only the *last* transition's reason is shown per slot
    assert res.stderr == ""


def test_json_is_one_document_with_the_same_content(ckpt: Path) -> None:
    res = run(str(ckpt), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["identity"]["run_id"] == "run-abc" and doc["identity"]["global_step"] == 300
    assert doc["trainer"]["state"] == "TRAINING" and doc["emergency"]["level"] == "ELEVATED"
    seed = doc["seeds"][0]
    assert seed["last_transition"]["reason"] == "g1-passed-cosine" and seed["transitions"] == 2
    assert doc["seeds"][1]["last_transition"] is None
    assert doc["metrics"] == FULL_PAYLOAD["metrics"]
    assert doc["optimizer"]["groups"][1]["lr"] == 0.005
    assert doc["tensors"]["total"] == {"count": 4, "parameters": 6 + 4 + 3 + 8,
                                       "bytes": 24 + 8 + 24 + 8, "dtypes": {"float32": 1, "bfloat16": 1,
                                                                            "int64": 1, "uint8": 1}}
    assert doc["integrity"]["ok"] is True
    assert {f["file"]: f["status"] for f in doc["integrity"]["files"]} == {
        "model.safetensors": "ok", "optimizer.safetensors": "ok", "rng.safetensors": "ok"}


def test_verify_passes_on_a_good_checkpoint(ckpt: Path) -> None:
    assert run(str(ckpt / "manifest.json"), "--verify").exit_code == 0


@pytest.mark.parametrize("fname", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_flipped_byte_verify_exits_4_naming_the_file(ckpt: Path, fname: str) -> None:
    flip_byte(ckpt / fname)
    res = run(str(ckpt), "--verify")
    assert res.exit_code == 4
    assert fname in res.stderr and "failed verification" in res.stderr
    assert "mismatch" in res.stdout  # the integrity table is still shown for triage


def test_damaged_without_verify_shows_integrity_and_warns_but_exits_0(ckpt: Path) -> None:
    flip_byte(ckpt / "model.safetensors")
    res = run(str(ckpt))
    assert res.exit_code == 0
    assert "integrity: FAILED" in res.stdout and "mismatch" in res.stdout
    assert "warning" in res.stderr and "model.safetensors" in res.stderr
    assert "run-abc" in res.stdout  # the manifest sections still render


def test_json_verify_on_damage_prints_the_document_and_exits_4(ckpt: Path) -> None:
    (ckpt / "rng.safetensors").unlink()
    res = run(str(ckpt), "--json", "--verify")
    assert res.exit_code == 4
    doc = json.loads(res.stdout)
    assert doc["integrity"]["ok"] is False
    assert {f["file"]: f["status"] for f in doc["integrity"]["files"]}["rng.safetensors"] == "missing"
    assert "rng.safetensors" in res.stderr


def test_unreadable_manifest_still_shows_integrity(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text("{not json")
    res = run(str(ckpt))
    assert res.exit_code == 0
    assert "not valid JSON" in res.stdout and "unexpected" in res.stdout
    assert run(str(ckpt), "--verify").exit_code == 4
    doc = json.loads(run(str(ckpt), "--json").stdout)
    assert doc["identity"]["run_id"] is None and doc["integrity"]["manifest"] == "invalid"


def test_schema_version_mismatch_verify_exits_4(ckpt: Path) -> None:
    doc = json.loads((ckpt / "manifest.json").read_text())
    doc["schema_version"] = 99
    doc["manifest_sha256"] = ck.manifest_digest(doc)
    (ckpt / "manifest.json").write_text(json.dumps(doc))
    res = run(str(ckpt), "--verify")
    assert res.exit_code == 4 and "schema_version 99 is not supported" in res.stderr


def test_minimal_payload_renders_dashes(tmp_path: Path) -> None:
    path = ck.write_checkpoint(tmp_path, "c1", tensors(), {"run_id": "bare"}, keep_last=1)
    res = run(str(path), "--verify")
    assert res.exit_code == 0, res.output
    assert "bare" in res.stdout and "slots" in res.stdout
    doc = json.loads(run(str(path), "--json").stdout)
    assert doc["seeds"] is None and doc["metrics"] is None and doc["optimizer"]["groups"] is None


def test_not_a_checkpoint_exits_4(tmp_path: Path) -> None:
    res = run(str(tmp_path / "missing"))
    assert res.exit_code == 4 and "no such file" in res.stderr


# --------------------------------------------------------------------------------------------------- pickle


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


@pytest.mark.parametrize("verify", [False, True])
def test_pt_file_as_path_exits_4_and_runs_nothing(tmp_path: Path, verify: bool) -> None:
    marker = tmp_path / "marker"
    pt = tmp_path / "model.pt"
    malicious_torch_save(marker, pt)
    res = run(str(pt), *(["--verify"] if verify else []))
    assert res.exit_code == 4
    assert "model.pt" in res.stderr and "never loads pickle" in res.stderr
    assert not marker.exists()


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("where", ["in-place", "in-place-resealed", "extra"])
def test_pickle_inside_checkpoint_exits_4_even_without_verify(ckpt: Path, tmp_path: Path, where: str,
                                                              verify: bool) -> None:
    marker = tmp_path / "marker"
    if where == "extra":
        malicious_torch_save(marker, ckpt / "optimizer.pt")
        fname = "optimizer.pt"
    else:
        fname = "model.safetensors"
        malicious_torch_save(marker, ckpt / fname)
        if where == "in-place-resealed":
            blob = (ckpt / fname).read_bytes()
            doc = json.loads((ckpt / "manifest.json").read_text())
            doc["files"][fname] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
            doc["manifest_sha256"] = ck.manifest_digest(doc)
            (ckpt / "manifest.json").write_text(json.dumps(doc))
    res = run(str(ckpt), *(["--verify"] if verify else []))
    assert res.exit_code == 4
    assert "unsafe" in res.stderr and fname in res.stderr
    assert not marker.exists()
