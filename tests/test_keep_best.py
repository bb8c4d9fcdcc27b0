"""checkpoint.keep_best (issue 27): a `best` pointer names the checkpoint with the best primary metric, which
pruning never removes while it is best; `esper export RUN` exports it; a damaged pointer prunes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GROWING, checkpoint_dirs, esper, events, manifest, metrics, out, train

from esper.core.checkpoint import BEST, CheckpointPruneError, write_checkpoint
from esper.core.checkpoint.locate import read_pointer

JOB = [*GROWING, "trainer.epochs=6", "checkpoint.keep_last=1", "checkpoint.keep_best=true"]


def _best_epoch(run: Path, key: str = "val_accuracy") -> int:
    rows = metrics(run)
    best = max(r[key] for r in rows)
    return next(r["epoch"] for r in rows if r[key] == best)  # ties: the earlier epoch stays best


def test_best_names_the_best_epoch_and_survives_keep_last(tmp_path: Path) -> None:
    run = tmp_path / "r"
    result = train(run, *JOB)
    assert result.exit_code == 0, out(result)
    root = run / "checkpoints"
    best = read_pointer(root, BEST)
    assert best is not None
    assert manifest(root / best)["epoch"] == _best_epoch(run)
    kept = checkpoint_dirs(run)
    assert set(kept) == {best, read_pointer(root)}  # keep_last = 1 pruned everything else
    moves = [e["attributes"]["epoch"] for e in events(run, "checkpoint.best")]
    assert moves[-1] == _best_epoch(run) and moves == sorted(moves) and moves[0] == 1


def test_export_of_a_run_takes_its_best_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert train(run, *JOB).exit_code == 0
    result = esper("export", str(run), "-o", str(tmp_path / "net"), "--live")
    assert result.exit_code == 0, out(result)
    doc = json.loads((tmp_path / "net" / "export.json").read_text())
    assert doc["epoch"] == _best_epoch(run)
    assert Path(doc["checkpoint"]).name == read_pointer(run / "checkpoints", BEST)


def test_without_keep_best_there_is_no_pointer(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert train(run, *GROWING, "trainer.epochs=2").exit_code == 0
    assert not (run / "checkpoints" / BEST).exists()


@pytest.mark.parametrize("content", [b"../escape\n", b"\xff\xfe", b"latest\n"])
def test_a_damaged_best_pointer_prunes_nothing_and_says_so(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "checkpoints"
    t = {"model": {"w": torch.zeros(2)}}
    for i in range(3):
        write_checkpoint(root, f"epoch-{i:04d}", t, {"epoch": i}, keep_last=5)
    (root / BEST).write_bytes(content)
    with pytest.raises(CheckpointPruneError, match="nothing pruned"):
        write_checkpoint(root, "epoch-0003", t, {"epoch": 3}, keep_last=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [f"epoch-{i:04d}" for i in range(4)]
    assert read_pointer(root) == "epoch-0003"  # the new checkpoint is committed all the same
