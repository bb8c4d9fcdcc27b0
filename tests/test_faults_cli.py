"""`esper faults list`: the E-1 catalogue as a table or one JSON document."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from esper.cli.faults import app
from esper.core.config.faults import CATALOGUE

SPEC_FAULTS = ["nan_loss", "inf_grad", "loss_spike", "seed_forward_error", "controller_timeout", "controller_crash",
               "illegal_command", "slow_step", "checkpoint_write_error", "checkpoint_corrupt", "dataloader_error",
               "sigterm", "rank_crash"]  # rank_crash: issue 16 (torch.distributed)
runner = CliRunner()


def test_json_lists_every_fault_with_its_outcome() -> None:
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    faults = doc["faults"]
    assert [f["name"] for f in faults] == SPEC_FAULTS
    for f in faults:
        assert set(f) == {"name", "description", "level", "action", "final_state", "exit_code"}
        assert f == CATALOGUE[f["name"]].to_dict()
    sigterm = next(f for f in faults if f["name"] == "sigterm")
    assert (sigterm["final_state"], sigterm["exit_code"]) == ("STOPPED", 143)
    crash = next(f for f in faults if f["name"] == "rank_crash")
    assert "--nproc >= 2" in crash["description"] and crash["final_state"] == "COMPLETED"


def test_table_shows_every_fault_whole() -> None:
    result = runner.invoke(app, ["list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    for spec in CATALOGUE.values():
        assert spec.name in result.stdout  # names are never elided at 80 columns
        assert spec.level in result.stdout
    assert "fault catalogue" in result.stdout
    assert "STOPPED" in result.stdout and "143" in result.stdout
