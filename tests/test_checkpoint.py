"""Checkpoint storage: format (C-1), atomic writes + pruning (C-2), verified, pickle-free loads (C-3)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import safetensors.torch
import torch
from conftest import flip_byte, malicious_pickle, malicious_torch_save, rewrite_manifest

from esper.core import checkpoint as ck
from esper.core.errors import CheckpointError, ExitCode
from esper.core.records.runlock import RunLock

REPO = Path(__file__).resolve().parents[1]


def make_tensors(scale: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(int(scale * 10))
    w = torch.randn(4, 3, generator=g) * scale
    return {
        "model": {
            "fc.weight": w,
            "fc.weight_t": w.t(),  # aliased, non-contiguous view of the same storage
            "head.weight": w,  # tied weight: the very same tensor twice
            "bias": torch.randn(3, generator=g, requires_grad=True),
            "emb": torch.randn(5, 2, generator=g).to(torch.bfloat16),
        },
        "optimizer": {"state.0.exp_avg": torch.randn(4, 3, generator=g), "state.0.step": torch.tensor(7)},
        "rng": {"torch_cpu": torch.get_rng_state(), "numpy": torch.arange(256, dtype=torch.uint8)},
    }


def make_payload(epoch: int = 1) -> dict[str, Any]:
    return {"run_id": "run-1", "epoch": epoch, "global_step": epoch * 10, "saved_at": "2025-01-01T00:00:00Z",
            "metrics": {"val_loss": 0.5}, "reason": "periodic"}


def write(root: Path, epoch: int, keep_last: int = 3, **kw: Any) -> Path:
    return ck.write_checkpoint(root, f"epoch-{epoch:04d}", make_tensors(epoch), make_payload(epoch),
                               keep_last=keep_last, **kw)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# --------------------------------------------------------------------------------------------------- format


def test_round_trip_preserves_values_dtypes_and_payload(tmp_path: Path) -> None:
    src = make_tensors(2.0)
    path = ck.write_checkpoint(tmp_path, "epoch-0002", src, make_payload(2), keep_last=3)
    loaded = ck.load_checkpoint(path)
    assert set(loaded.tensors) == {"model", "optimizer", "rng"}
    for stem, group in src.items():
        assert set(loaded.tensors[stem]) == set(group)
        for key, t in group.items():
            got = loaded.tensors[stem][key]
            assert got.dtype == t.dtype, (stem, key)
            assert torch.equal(got, t.detach()), (stem, key)
            assert got.is_contiguous()
    assert loaded.tensors["rng"]["torch_cpu"].dtype == torch.uint8
    assert loaded.tensors["optimizer"]["state.0.step"].dtype == torch.int64
    assert loaded.tensors["model"]["emb"].dtype == torch.bfloat16
    assert loaded.payload == make_payload(2)
    assert loaded.manifest.schema_version == ck.SCHEMA_VERSION == 1


def test_layout_manifest_hashes_and_summary(tmp_path: Path) -> None:
    path = write(tmp_path, 1)
    assert names(tmp_path) == ["epoch-0001", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "epoch-0001"
    assert names(path) == ["manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    doc = json.loads((path / "manifest.json").read_text())
    for fname, entry in doc["files"].items():
        blob = (path / fname).read_bytes()
        assert entry == {"algorithm": "blake3", "digest": blake3.blake3(blob).hexdigest(), "bytes": len(blob)}
    model = doc["tensors"]["model.safetensors"]
    assert model["count"] == 5
    assert model["parameters"] == 12 + 12 + 12 + 3 + 10
    assert model["bytes"] == 4 * (12 + 12 + 12 + 3) + 2 * 10
    assert model["dtypes"] == {"float32": 4, "bfloat16": 1}
    assert doc["tensors"]["rng.safetensors"]["dtypes"] == {"uint8": 2}
    assert doc["run_id"] == "run-1" and doc["epoch"] == 1


def test_files_are_plain_safetensors_readable_by_the_library(tmp_path: Path) -> None:
    path = write(tmp_path, 1)
    direct = safetensors.torch.load_file(path / "optimizer.safetensors")
    assert torch.equal(direct["state.0.exp_avg"], make_tensors(1)["optimizer"]["state.0.exp_avg"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "../escape"}, ValueError, "checkpoint name"),
        ({"name": ".hidden"}, ValueError, "checkpoint name"),
        ({"name": "latest"}, ValueError, "reserved"),
        ({"payload": {"files": {}}}, ValueError, "structural"),
        ({"payload": {"metrics": {"loss": float("nan")}}}, ValueError, "strict JSON"),
        ({"payload": {"when": object()}}, ValueError, "strict JSON"),
        ({"tensors": {"model": {"w": [1.0]}}}, TypeError, "torch.Tensor"),
        ({"tensors": {"a/b": {"w": torch.ones(1)}}}, ValueError, "stem"),
        ({"tensors": {}}, ValueError, "at least one"),
        ({"keep_last": 0}, ValueError, "keep_last"),
    ],
)
def test_caller_bugs_are_rejected_before_touching_disk(tmp_path: Path, kwargs: dict[str, Any],
                                                       error: type[Exception], match: str) -> None:
    args: dict[str, Any] = {"name": "epoch-0001", "tensors": make_tensors(), "payload": make_payload(),
                            "keep_last": 2, **kwargs}
    root = tmp_path / "ckpts"
    with pytest.raises(error, match=match):
        ck.write_checkpoint(root, args["name"], args["tensors"], args["payload"], keep_last=args["keep_last"])
    assert not root.exists()


# --------------------------------------------------------------------------------------------------- atomic


def test_failed_write_leaves_previous_latest_intact_and_no_temp_dir(tmp_path: Path) -> None:
    write(tmp_path, 1)

    def crash(tmpdir: Path) -> None:
        assert tmpdir.name.startswith(".tmp-epoch-0002-") and (tmpdir / "manifest.json").is_file()
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        write(tmp_path, 2, before_commit=crash)
    assert names(tmp_path) == ["epoch-0001", "latest"]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch-0001"
    assert ck.verify_checkpoint(tmp_path).ok
    assert ck.load_checkpoint(tmp_path).manifest.epoch == 1


def test_os_error_becomes_checkpoint_write_error(tmp_path: Path) -> None:
    write(tmp_path, 1)

    def disk_full(tmpdir: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ck.CheckpointWriteError, match="No space left") as info:
        write(tmp_path, 2, before_commit=disk_full)
    assert isinstance(info.value, CheckpointError) and info.value.exit_code == ExitCode.CHECKPOINT
    assert names(tmp_path) == ["epoch-0001", "latest"]
    assert ck.load_checkpoint(tmp_path).manifest.epoch == 1


def test_real_io_failure_is_a_write_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ck.CheckpointWriteError, match="writing checkpoint"):
        write(not_a_dir, 1)


def test_bytes_changed_after_hashing_are_refused_by_the_verified_load(tmp_path: Path) -> None:
    # Issue 15: no read-back after a write (a page-cache read proves nothing about the disk); bytes that change
    # between hashing and use are found by the verified load, which refuses them naming the file.
    write(tmp_path, 1, keep_last=2)

    def corrupt_after_write(tmpdir: Path) -> None:
        assert (tmp_path / "epoch-0001" / "manifest.json").is_file()
        flip_byte(tmpdir / "model.safetensors", -1)

    path = write(tmp_path, 2, keep_last=2, before_commit=corrupt_after_write)
    report = ck.verify_checkpoint(path)
    assert not report.ok and any(p.startswith("model.safetensors: mismatch") for p in report.problems)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*digest"):
        ck.load_checkpoint(path)
    assert ck.load_checkpoint(tmp_path / "epoch-0001").manifest.epoch == 1


def test_keep_last_prunes_oldest_and_only_after_pointer_moved(tmp_path: Path) -> None:
    for epoch in range(1, 6):
        write(tmp_path, epoch, keep_last=2)
    assert names(tmp_path) == ["epoch-0004", "epoch-0005", "latest"]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch-0005"
    seen: list[list[str]] = []
    write(tmp_path, 6, keep_last=1, before_commit=lambda _tmp: seen.append(names(tmp_path)))
    assert [n for n in seen[0] if not n.startswith(".")] == ["epoch-0004", "epoch-0005", "latest"]
    assert names(tmp_path) == ["epoch-0006", "latest"]


def test_pruning_leaves_foreign_directories_alone(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    for epoch in range(1, 4):
        write(tmp_path, epoch, keep_last=1)
    assert names(tmp_path) == ["epoch-0003", "latest", "notes"]


def test_stale_temp_dirs_are_ignored_by_readers_and_removed_only_under_the_run_lock(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    write(root, 1)
    stale = root / ".tmp-epoch-0002-999999-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ck.latest_checkpoint(root) == root / "epoch-0001"
    assert ck.resolve_checkpoint(root) == root / "epoch-0001"
    # Without the run dir's writer lock the temp may be another live writer's: pruning leaves it alone.
    write(root, 2)
    assert names(root) == [stale.name, "epoch-0001", "epoch-0002", "latest"]
    # Holding the lock, no other writer can be alive here: the temp is a dead writer's and goes.
    with RunLock(tmp_path):
        write(root, 3)
    assert names(root) == ["epoch-0001", "epoch-0002", "epoch-0003", "latest"]


def test_orphan_committed_dir_is_replaced_but_latest_never_overwritten(tmp_path: Path) -> None:
    write(tmp_path, 1)
    write(tmp_path, 2)
    # A writer died after renaming epoch-0002 into place but before moving the pointer.
    (tmp_path / "latest").write_text("epoch-0001\n")
    flip_byte(tmp_path / "epoch-0002" / "model.safetensors", -1)
    write(tmp_path, 2)
    assert ck.verify_checkpoint(tmp_path / "epoch-0002").ok
    with pytest.raises(ck.CheckpointWriteError, match="refusing to overwrite"):
        write(tmp_path, 2)
    assert ck.verify_checkpoint(tmp_path).ok


def test_sigkill_inside_a_write_leaves_latest_loadable(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from pathlib import Path
        from esper.core.checkpoint import write_checkpoint
        root = Path({str(tmp_path / 'checkpoints')!r})
        t = {{"model": {{"w": torch.ones(3)}}}}
        write_checkpoint(root, "epoch-0001", t, {{"epoch": 1}}, keep_last=1)
        write_checkpoint(root, "epoch-0002", {{"model": {{"w": torch.zeros(3)}}}}, {{"epoch": 2}}, keep_last=1,
                         before_commit=lambda d: os.kill(os.getpid(), signal.SIGKILL))
        sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    root = tmp_path / "checkpoints"
    assert any(n.startswith(".tmp-epoch-0002-") for n in names(root))
    loaded = ck.load_checkpoint(root)
    assert loaded.manifest.epoch == 1 and torch.equal(loaded.tensors["model"]["w"], torch.ones(3))
    # The next writer of the run dir (it holds the lock, so the killed writer is known dead) clears its temp.
    with RunLock(tmp_path):
        write(root, 3, keep_last=1)
    assert names(root) == ["epoch-0003", "latest"]


# --------------------------------------------------------------------------------------------------- resolve


def test_resolve_accepts_dir_run_dir_checkpoints_dir_and_manifest(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    path = write(root, 1)
    write(root, 2)
    latest = root / "epoch-0002"
    assert ck.resolve_checkpoint(path) == path
    assert ck.resolve_checkpoint(path / "manifest.json") == path
    assert ck.resolve_checkpoint(root) == latest
    assert ck.resolve_checkpoint(tmp_path / "run") == latest


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "nope", "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a checkpoint"),
        (lambda p: (p / "checkpoints").mkdir() or p, "no verified checkpoint yet"),
        (lambda p: (p / "latest").write_text("../../etc\n") and p, "valid checkpoint name"),
        (lambda p: (p / "latest").write_text("epoch-0042\n") and p, "does not exist"),
        (lambda p: (p / "w.pt").write_bytes(b"\x80\x04junk") and p / "w.pt", r"never loads pickle"),
    ],
)
def test_resolve_rejects_what_is_not_a_checkpoint(tmp_path: Path, setup: Callable[[Path], Path],
                                                  match: str) -> None:
    target = setup(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        ck.resolve_checkpoint(target)
    assert info.value.exit_code == ExitCode.CHECKPOINT
    assert str(target.name) in str(info.value) or "latest" in str(info.value)


def test_latest_checkpoint_is_none_without_pointer(tmp_path: Path) -> None:
    assert ck.latest_checkpoint(tmp_path) is None
    write(tmp_path, 1)
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch-0001"


# --------------------------------------------------------------------------------------------------- corruption


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-5])


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # id: (damage, file named in the error, words in the error)
    "flip-model-data": (lambda c: flip_byte(c / "model.safetensors", -1), "model.safetensors", "blake3 digest"),
    "flip-model-header": (lambda c: flip_byte(c / "model.safetensors", 12), "model.safetensors", "safetensors"),
    "flip-optimizer": (lambda c: flip_byte(c / "optimizer.safetensors", -2), "optimizer.safetensors", "blake3 digest"),
    "flip-rng": (lambda c: flip_byte(c / "rng.safetensors", -3), "rng.safetensors", "blake3 digest"),
    "flip-manifest-digit": (
        lambda c: (c / "manifest.json").write_text(
            (c / "manifest.json").read_text().replace('"global_step": 10', '"global_step": 18')),
        "manifest.json", "manifest_sha256"),
    "flip-manifest-syntax": (lambda c: flip_byte(c / "manifest.json", 0), "manifest.json", "not valid JSON"),
    "truncate-model": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors", "safetensors"),
    "truncate-manifest": (lambda c: _truncate(c / "manifest.json"), "manifest.json", "JSON"),
    "delete-rng": (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors", "missing"),
    "delete-manifest": (lambda c: (c / "manifest.json").unlink(), "manifest.json", "missing"),
    "extra-file": (lambda c: (c / "notes.txt").write_text("hi"), "notes.txt", "not listed"),
    "schema-version-2": (lambda c: rewrite_manifest(c, lambda d: d.update(schema_version=2)),
                         "manifest.json", "schema_version 2 is not supported"),
    "schema-version-str": (lambda c: rewrite_manifest(c, lambda d: d.update(schema_version="1")),
                           "manifest.json", "not supported"),
    "no-schema-version": (lambda c: rewrite_manifest(c, lambda d: d.pop("schema_version")),
                          "manifest.json", "missing key 'schema_version'"),
    "no-files": (lambda c: rewrite_manifest(c, lambda d: d.pop("files")), "manifest.json", "missing key 'files'"),
    "no-tensors": (lambda c: rewrite_manifest(c, lambda d: d.pop("tensors")), "manifest.json", "'tensors'"),
    "no-seal": (lambda c: rewrite_manifest(c, lambda d: d.pop("manifest_sha256"), rehash=False),
                "manifest.json", "manifest_sha256"),
    "manifest-list": (lambda c: (c / "manifest.json").write_text("[1, 2]"), "manifest.json", "JSON object"),
    "wrong-sha": (lambda c: rewrite_manifest(c, lambda d: d["files"]["rng.safetensors"].update(digest="0" * 64)),
                  "rng.safetensors", "digest"),
    "wrong-size": (lambda c: rewrite_manifest(c, lambda d: d["files"]["rng.safetensors"].update(bytes=3)),
                   "rng.safetensors", "size"),
    "unlisted-file": (lambda c: rewrite_manifest(c, lambda d: (d["files"].pop("rng.safetensors"),
                                                               d["tensors"].pop("rng.safetensors"))),
                      "rng.safetensors", "not listed"),
    "path-escape": (lambda c: rewrite_manifest(c, lambda d: (
        d["files"].update({"../x.safetensors": d["files"]["rng.safetensors"]}),
        d["tensors"].update({"../x.safetensors": {}}))), "../x.safetensors", "invalid file name"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_is_rejected_naming_the_file(tmp_path: Path, case: str) -> None:
    damage, fname, words = CORRUPTIONS[case]
    path = write(tmp_path, 1)
    assert ck.verify_checkpoint(path).ok
    damage(path)
    report = ck.verify_checkpoint(path)
    assert not report.ok
    assert any(p.startswith(fname + ":") and words in p for p in report.problems), report.problems
    with pytest.raises(CheckpointError) as info:
        ck.load_checkpoint(path)
    assert info.value.exit_code == ExitCode.CHECKPOINT
    assert fname in str(info.value) and words in str(info.value)


def test_verify_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, 1)
    flip_byte(path / "model.safetensors", -1)
    (path / "rng.safetensors").unlink()
    statuses = {f.name: f.status for f in ck.verify_checkpoint(path).files}
    assert statuses == {"model.safetensors": "mismatch", "optimizer.safetensors": "ok", "rng.safetensors": "missing"}


def test_valid_file_starting_with_pickle_opcode_byte_is_not_called_a_pickle(tmp_path: Path) -> None:
    # A safetensors file starts with its header length (u64 LE); when that is 128 the first byte is 0x80,
    # the pickle PROTO opcode. Only a file that is *not* valid safetensors may be called a pickle.
    for n in range(1, 200):
        blob = safetensors.torch.save({"k" * n: torch.ones(1)})
        if blob[0] == 0x80:
            break
    else:
        pytest.fail("no key length gives a 128-byte header")
    path = ck.write_checkpoint(tmp_path, "c", {"model": {"k" * n: torch.ones(1)}}, {}, keep_last=1)
    assert (path / "model.safetensors").read_bytes()[0] == 0x80
    assert ck.verify_checkpoint(path).ok
    assert torch.equal(ck.load_checkpoint(path).tensors["model"]["k" * n], torch.ones(1))


# --------------------------------------------------------------------------------------------------- pickle safety


def test_the_malicious_payload_really_executes_when_unpickled(tmp_path: Path) -> None:
    # Control: proves the marker tests below can fail. The only unpickling in the suite, on our own bytes.
    marker = tmp_path / "control-marker"
    pickle.loads(malicious_pickle(marker))
    assert marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling entry point called during the test fails it."""

    def boom(*_a: Any, **_k: Any) -> None:
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)


def _pickle_in_place(ckpt: Path, marker: Path, *, reseal: bool, zip_format: bool) -> None:
    target = ckpt / "model.safetensors"
    if zip_format:
        malicious_torch_save(marker, target)
    else:
        target.write_bytes(malicious_pickle(marker))
    if reseal:  # attacker also fixes the manifest so the hash matches: only the format check stands
        blob = target.read_bytes()
        rewrite_manifest(ckpt, lambda d: d["files"]["model.safetensors"].update(
            sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob)))


@pytest.mark.usefixtures("no_unpickling")
@pytest.mark.parametrize("reseal", [False, True])
@pytest.mark.parametrize("zip_format", [False, True])
def test_pickle_in_place_of_tensor_file_is_rejected_without_running(tmp_path: Path, reseal: bool,
                                                                    zip_format: bool) -> None:
    marker = tmp_path / "marker"
    path = write(tmp_path / "ckpts", 1)
    _pickle_in_place(path, marker, reseal=reseal, zip_format=zip_format)
    report = ck.verify_checkpoint(path)
    assert report.unsafe and not report.ok
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unsafe: is a pickle") as info:
        ck.load_checkpoint(path)
    assert info.value.exit_code == ExitCode.CHECKPOINT
    assert not marker.exists()


@pytest.mark.usefixtures("no_unpickling")
def test_pickle_as_extra_file_or_as_the_path_is_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = write(tmp_path / "ckpts", 1)
    malicious_torch_save(marker, path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: unsafe"):
        ck.load_checkpoint(path)
    pt = tmp_path / "weights.pt"
    malicious_torch_save(marker, pt)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not a checkpoint"):
        ck.load_checkpoint(pt)
    with pytest.raises(CheckpointError, match=r"weights\.pt"):
        ck.verify_checkpoint(pt)
    assert not marker.exists()


def test_write_failure_cleanup_error_is_reported_not_swallowed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, 1)
    real_rmtree = shutil.rmtree

    def failing_rmtree(path: Any, *a: Any, **k: Any) -> None:
        if Path(path).name.startswith(".tmp-epoch-0002"):
            raise OSError(errno.EBUSY, "busy")
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)

    def disk_full(_tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ck.CheckpointWriteError) as info:
        write(tmp_path, 2, before_commit=disk_full)
    assert any("also failed to remove" in n for n in getattr(info.value, "__notes__", []))
    assert os.path.isdir(tmp_path / "epoch-0001")


def test_pruning_never_removes_the_new_latest_even_when_its_name_sorts_first(tmp_path: Path) -> None:
    write(tmp_path, 9, keep_last=1)
    write(tmp_path, 2, keep_last=1)  # e.g. after a rollback to an earlier epoch
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "epoch-0002"
    assert ck.load_checkpoint(tmp_path).manifest.epoch == 2
    assert names(tmp_path) == ["epoch-0002", "epoch-0009", "latest"]
