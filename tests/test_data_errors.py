"""Issue 26 (and 27): errors from the user's code are named as such. An error raised by the user's dataset is a
data error, never a full disk: a transient one gets the catalogue's dataloader recovery (rollback, retry) whatever
its type; a persistent one ends the run (bounded) with the dataset named, not with 'the disk refused the write'.
An exception in the user's host names its file and line and where the traceback is kept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import UNHURRIED, events, out, summary, train

from esper.core.errors import ExitCode

JOB = ["data.task='plugins_fixture:{}'", "data.batch_size=8", "trainer.epochs=3", *UNHURRIED]


def _job(factory: str) -> list[str]:
    return [JOB[0].format(factory), *JOB[1:]]


@pytest.mark.parametrize(("factory", "kind"), [("flaky_eio_once", "OSError"),
                                               ("flaky_runtime_once", "RuntimeError")])
def test_a_dataset_that_fails_once_is_rolled_back_and_the_run_completes(tmp_path: Path, factory: str,
                                                                         kind: str) -> None:
    run = tmp_path / "run"
    r = train(run, *_job(factory))
    assert r.exit_code == 0, out(r)
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["epochs_completed"] == 3
    [done] = events(run, "rollback.completed")
    assert done["attributes"]["cause"] == "dataloader_error" and done["attributes"]["tier"] == "fast"
    assert re.search(rf"the training data raised {kind} reading batch \d+ of epoch 1: ", done["attributes"]["reason"])
    assert "disk" not in done["attributes"]["reason"] and not events(run, "batch.skipped")  # the retry read it


def test_a_dataset_that_always_fails_ends_the_run_naming_the_data_not_the_disk(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *_job("flaky_always"))
    assert r.exit_code == ExitCode.HALTED and "Traceback" not in r.output, out(r)
    s = summary(run)
    assert s["status"] == "HALTED" and s["exit_code"] == r.exit_code
    assert len(events(run, "rollback.completed")) == 3  # bounded: emergency.max_consecutive_rollbacks (2), then HALT
    assert "the training data raised RuntimeError" in r.output and "disk refused" not in r.output


def test_a_dataset_that_fails_while_esper_counts_its_classes_is_a_config_error_naming_it(tmp_path: Path) -> None:
    r = train(tmp_path / "run", *_job("flaky_unnamed"))
    assert r.exit_code == ExitCode.CONFIG and "Traceback" not in r.output, out(r)
    assert "the dataset raised OSError while Esper read its labels" in r.stderr.replace("\n", " ")


def test_an_exception_in_the_users_host_names_the_line_and_where_the_traceback_is(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, "host.factory='plugins_fixture:raising_host'", "seeds.slots=[{name='s1', layer='hidden1'}]",
              "trainer.epochs=3", *UNHURRIED)
    assert r.exit_code == ExitCode.INTERNAL, out(r)
    where = summary(run)["failure"]["raised_at"]
    assert (where["origin"], where["function"], Path(where["file"]).name) == ("user", "forward", "plugins_fixture.py")
    assert f"raised in your code: {where['file']}:{where['line']} in forward" in r.stdout
    assert f"the traceback: {run / 'summary.json'} (failure.traceback)" in r.stdout
    assert "ValueError: shape mismatch in my custom layer" in summary(run)["failure"]["traceback"]
