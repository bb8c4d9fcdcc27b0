"""The README's worked example (a user CNN on digits as images, seeds grown into its conv layers) runs as written,
and the shipped config grows a conv seed on digits as images with the built-in cnn host (issue 13, Done when)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ESPER, REPO, SHIPPED, events

EXAMPLES = REPO / "fixtures" / "examples"
README = REPO / "README.md"


def fossilized_conv_seeds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in doc["seeds"] if s["stage"] == "FOSSILIZED" and s["blueprint"] == "conv_block"]


def test_the_readme_shows_the_example_files_verbatim() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", text, flags=re.DOTALL)
    for name in ("user_cnn.py", "user_cnn.toml"):
        assert (EXAMPLES / name).read_text(encoding="utf-8") in blocks, f"README does not show {name} as it is"
    assert "cd fixtures/examples && ../../.venv/bin/esper train --config user_cnn.toml" in text


@pytest.mark.slow
def test_the_worked_example_runs_as_written_and_fossilizes_a_conv_seed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # the README's command, from the example's directory (the plug-in module is imported from there)
    proc = subprocess.run([str(ESPER), "train", "--config", "user_cnn.toml", "--json", "--run-dir", str(run)],
                          cwd=EXAMPLES, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["status"], doc["task"]["name"]) == ("COMPLETED", "digits_images")
    assert fossilized_conv_seeds(doc), [(s["slot"], s["stage"]) for s in doc["seeds"]]
    shapes = {e["attributes"]["slot"]: e["attributes"]["attributes"]["slot_shape"]
              for e in events(run, "gate.result") if e["attributes"]["gate"] == "G0"}
    assert shapes["s1"] == "channels2d [N, 8, 8, 8]"
    assert doc["final"]["val_accuracy"] > 0.9  # digits is easy: a broken host or seed would not get here


@pytest.mark.slow
def test_the_shipped_config_grows_a_conv_seed_on_digit_images(tmp_path: Path) -> None:
    """`esper train --set data.task=digits_images --set host.factory=cnn` (the shipped MNIST-1D run's cnn host and
    conv seeds, on digits as images), cut to 13 epochs: s1 fossilizes by then at run.seed 42."""
    run = tmp_path / "run"
    proc = subprocess.run([str(ESPER), "--config", str(SHIPPED), "train", "--json", "--run-dir", str(run),
                           "--set", "data.task=digits_images", "--set", "host.factory=cnn",
                           "--set", "trainer.epochs=13"], capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "COMPLETED"
    assert [s["slot"] for s in fossilized_conv_seeds(doc)] == ["s1"]
    g0 = next(e for e in events(run, "gate.result") if e["attributes"]["gate"] == "G0")
    assert g0["attributes"]["attributes"]["slot_shape"] == "channels2d [N, 6, 3, 3]"
