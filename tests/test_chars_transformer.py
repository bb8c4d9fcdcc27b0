"""The transformer host, the chars task and the tokens blueprints (issue 14, Deliver 1-3), and the example
config in its CI short form: it trains, grows a transformer block seed to FOSSILIZED and reports bits/char."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import REPO, UNHURRIED, make_config, metrics, out, summary
from typer.testing import CliRunner

from esper.cli.main import app
from esper.core.config import from_dict
from esper.core.data import build_task
from esper.core.data.chars import bits_per_char, lm_loss, next_char_accuracy
from esper.core.errors import ExitCode
from esper.core.kasmina.blueprints import BUILTIN, BlueprintRegistry, param_count
from esper.core.kasmina.kinds import SlotShape
from esper.core.model.host import build_host, resumes_from
from esper.core.model.transformer import TransformerHost

FIXTURE = REPO / "fixtures" / "configs" / "chars-transformer.toml"
# The fixture's job, small: a 16-wide host on 32-character windows, and a controller that germinates at once
# and moves the seed through every stage in 6 epochs (the thresholds of the lifecycle itself are the fixture's).
SHORT = ["data.block_size=32", "data.batch_size=64", "host.d_model=16", "host.n_heads=2", "trainer.epochs=6",
         "trainer.warmup_steps=10", "controller.warmup_epochs=0", "controller.plateau_min_delta=1.0",
         "seeds.min_training_epochs=1", "seeds.g2_min_improvement=0.0", "seeds.blend.steps=10", *UNHURRIED]


def fixture_config(*overrides: str):  # noqa: ANN201 -- an EsperConfig
    return from_dict(tomllib.loads(FIXTURE.read_text()), list(overrides))


def test_the_chars_task_is_a_deterministic_split_of_pydoc_topics() -> None:
    a, b = build_task(make_config('data.task="chars"', "run.seed=1")), build_task(make_config(
        'data.task="chars"', "run.seed=2"))
    assert a.n_outputs == 103 and a.input_shape == (64,)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)  # the run seed does not move it
    x, y = a.train.x, a.train.y
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one
    assert torch.equal(x[1:, 0], y[:-1, -1])  # non-overlapping consecutive windows
    assert 0.08 < len(a.val) / (len(a.train) + len(a.val)) < 0.12
    assert a.describe() == {"name": "chars", "primary_metric": "val_bpc", "direction": "min",
                            "metrics": ["val_loss", "val_bpc", "val_accuracy"]}
    short = build_task(make_config('data.task="chars"', "data.block_size=16"))
    assert short.input_shape == (16,) and len(short.train) > 3 * len(a.train)


def test_the_loss_and_metrics_read_logits_per_token() -> None:
    logits = torch.zeros(2, 3, 5)
    logits[..., 1] = 10.0
    target = torch.tensor([[1, 1, 1], [1, 0, 1]])
    assert float(next_char_accuracy(logits, target)) == pytest.approx(5 / 6)
    assert float(bits_per_char(logits, target)) == pytest.approx(float(lm_loss(logits, target)) / math.log(2))
    uniform = torch.zeros(1, 4, 8)
    assert float(bits_per_char(uniform, torch.zeros(1, 4, dtype=torch.int64))) == pytest.approx(3.0)
    assert lm_loss(logits.bfloat16(), target).dtype == torch.float32


def test_the_transformer_host_has_the_designed_size_and_a_checked_forward_from() -> None:
    cfg = fixture_config()
    task = build_task(cfg)
    host = build_host(cfg, task.input_shape, task.n_outputs)
    assert isinstance(host, TransformerHost)
    assert param_count(host) == 60_800  # 1 block, d_model 64, 4 heads, tied head
    assert host.head.weight is host.tok_emb.weight
    x = task.example_x()
    assert host(x).shape == (2, 64, 103)
    assert resumes_from(host, "block1", x) and not resumes_from(host, "ln_f", x)
    with pytest.raises(ValueError, match="longer than the block size"):
        host(torch.zeros(1, 65, dtype=torch.int64))


def test_the_transformer_refuses_a_task_without_token_ids(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["--config", str(FIXTURE), "train", "--quiet", "--run-dir", str(tmp_path / "r"),
                                 "--set", 'data.task="digits_images"'])
    assert r.exit_code == ExitCode.CONFIG and "token ids [N, T]" in out(r) and "[N, 1, 8, 8]" in out(r)
    bad = CliRunner().invoke(app, ["--config", str(FIXTURE), "config", "validate", "--set", "host.n_heads=5"])
    assert bad.exit_code == ExitCode.CONFIG and "n_heads (5) must divide d_model (64)" in out(bad)


@pytest.mark.parametrize("name", ["block", "attention"])
def test_token_blueprints_start_as_the_identity_are_causal_and_have_exact_bounds(name: str) -> None:
    shape = SlotShape("tokens", (12, 32))
    registry = BlueprintRegistry(make_config(f'seeds.blueprints=["{name}"]').seeds)
    seed = registry.build(name, shape, 0)
    assert BUILTIN[name].bounds(shape) == (param_count(seed), param_count(seed))
    x = torch.randn(3, 12, 32)
    assert torch.equal(seed(x), x)  # zero-initialised output projections
    for p in seed.parameters():  # a trained seed: causal still
        torch.nn.init.normal_(p, 0.0, 0.3)
    later = x.clone()
    later[:, 7:] = torch.randn(3, 5, 32)
    assert torch.allclose(seed(x)[:, :7], seed(later)[:, :7], atol=1e-6)
    assert not torch.allclose(seed(x)[:, 7:], seed(later)[:, 7:])
    assert BUILTIN[name].refusal(SlotShape("features", (32,)))  # positions to mix: tokens only


@pytest.mark.slow
def test_the_example_config_grows_and_fossilizes_a_block_seed_and_reports_bits_per_char(tmp_path: Path) -> None:
    run = tmp_path / "run"
    flags = [a for item in SHORT for a in ("--set", item)]
    r = CliRunner().invoke(app, ["--config", str(FIXTURE), "train", "--quiet", "--run-dir", str(run), *flags])
    assert r.exit_code == 0, out(r)
    s = summary(run)
    assert s["task"]["primary_metric"] == "val_bpc" and s["task"]["direction"] == "min"
    assert set(s["final"]) == {"val_loss", "val_bpc", "val_accuracy", "params"}
    assert s["final"]["val_bpc"] == pytest.approx(s["final"]["val_loss"] / math.log(2))
    (seed,) = s["seeds"]
    assert (seed["slot"], seed["layer"], seed["blueprint"], seed["stage"]) == ("s1", "block1", "block", "FOSSILIZED")
    rows = metrics(run)
    assert rows[-1]["val_bpc"] < rows[0]["val_bpc"]
    assert rows[-1]["params"] > rows[0]["params"]  # the fossilized block is part of the network now
    assert "val_bpc=" in out(r)
