"""Scale out on torch.distributed (issue 16): the sharded sampler, the data-parallel reductions in real gloo
process groups, and real `esper train --nproc 2` / torchrun runs of a tiny synthetic job (2 ranks, CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    BASE_TOML,
    ESPER,
    GROWING,
    checkpoint_dirs,
    events,
    free_port,
    latest,
    make_config,
    metrics_without_wall_clock,
    rank_env,
    sets,
    summary,
    tensors,
    verify,
    wait_for,
)

from esper.cli.launch import worker_argv
from esper.core.data.loader import EpochBatches, epoch_order
from esper.core.dist import DataParallel, World, check_config
from esper.core.dist.world import resolve_backend
from esper.core.errors import ConfigError, ExitCode
from esper.core.tolaria.signals import StopRequest

# ----------------------------------------------------------------------------------------- no processes


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_make_the_same_global_batches_for_any_world_size(ranks: int, drop_last: bool) -> None:
    n, bs = 70, 8  # 8 full batches and a short one of 6
    shards = [list(EpochBatches(n, bs, drop_last, 7, 3, start=1, skip=frozenset({4}), shard=(r, ranks)))
              for r in range(ranks)]
    glued = [sum((s[k] for s in shards), []) for k in range(len(shards[0]))]
    assert glued == list(EpochBatches(n, bs, drop_last, 7, 3, start=1, skip=frozenset({4})))
    order = epoch_order(n, 7, 3).tolist()
    assert glued[0] == order[bs:2 * bs]  # batch 1 (start=1) is the same samples, whatever the world
    assert all(len(s[0]) == bs // ranks for s in shards)


@pytest.mark.parametrize("ranks", [2, 3])
def test_validation_shards_cover_the_validation_set_once(ranks: int) -> None:
    from esper.core.data import build_task, val_batches

    cfg = make_config('data.task="synthetic"', "data.eval_batch_size=7")
    task = build_task(cfg)
    whole = torch.cat([y for _, y in val_batches(task, cfg.data)])
    shards = [torch.cat([y for _, y in val_batches(task, cfg.data, shard=(r, ranks))]) for r in range(ranks)]
    assert torch.equal(torch.cat(shards), whole)  # contiguous shares, in order, none twice
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_a_last_batch_smaller_than_the_world_is_refused() -> None:
    # 17 samples, batches of 8, no drop: the last batch holds one sample for 2 ranks
    with pytest.raises(ConfigError, match="fewer than the 2 ranks"):
        list(EpochBatches(17, 8, False, 1, 1, shard=(1, 2)))


def test_batch_size_must_divide_by_the_world_size() -> None:
    check_config(make_config("data.batch_size=64"), 4)
    with pytest.raises(ConfigError, match="does not divide by the world size 3") as err:
        check_config(make_config("data.batch_size=64"), 3)
    assert err.value.key == "data.batch_size"


def test_backend_resolution() -> None:
    cfg = make_config()
    assert resolve_backend(cfg.dist, "cpu") == "gloo"
    assert resolve_backend(cfg.dist, "cuda") == "nccl"
    with pytest.raises(ConfigError, match="needs run.device = 'cuda'"):
        resolve_backend(make_config("dist.backend=nccl").dist, "cpu")


def test_dist_keys_are_checked_and_not_part_of_what_is_trained() -> None:
    with pytest.raises(ConfigError):
        make_config("dist.backend=mpi")
    with pytest.raises(ConfigError):
        make_config("dist.timeout_s=0")
    assert make_config("dist.timeout_s=5").config_hash() == make_config().config_hash()


def test_the_launcher_forwards_everything_but_its_own_options() -> None:
    argv = ["--config", "x.toml", "train", "--nproc", "2", "--max-restarts=1", "--quiet", "--set", "a=1"]
    assert worker_argv(argv) == ["--config", "x.toml", "train", "--quiet", "--set", "a=1"]


def test_a_world_of_one_changes_nothing() -> None:
    halts: list[Any] = []
    par = DataParallel(lambda *a: halts.append(a), World())
    loss = torch.tensor(0.123456789, dtype=torch.float32)
    p = torch.nn.Parameter(torch.ones(3))
    assert par.batch(loss, 5, {"accuracy": 0.25}, [("w", p)]) == (float(loss), 5, {"accuracy": 0.25})
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    par.grads([("w", p)])
    par.check_epoch(1, [], [("w", p)])
    assert p.grad.tolist() == [1.0, 2.0, 3.0] and halts == []


def test_the_outbox_keeps_warnings_and_worse_up_to_its_limit() -> None:
    from esper.core.dist.forward import ForwardedEvent, Outbox
    from esper.core.records.telemetry import Emitter

    emitter = Emitter(None, "r1", make_config().telemetry)  # in memory
    box = Outbox(rank=1, limit=2)
    emitter.subscribe(box)
    emitter.emit("tolaria", "epoch.completed", "INFO")
    emitter.emit("tolaria", "fault.injected", "WARNING", fault="x")
    emitter.emit("tolaria", "run.failed", "CRITICAL", message="m")
    emitter.emit("tolaria", "checkpoint.failed", "ERROR")
    sent, dropped = box.drain()
    assert [(r["name"], r["level"]) for r in sent] == [("fault.injected", "WARNING"), ("run.failed", "CRITICAL")]
    assert dropped == 1 and box.drain() == ([], 0)
    attrs = ForwardedEvent.from_dict(sent[0]).to_attributes()
    assert attrs["rank"] == 1 and attrs["attributes"] == {"fault": "x"} and "level" not in attrs


# ------------------------------------------------------------------------------- real gloo process groups


def _collectives(rank: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    halts: list[tuple[str, str, dict[str, Any]]] = []
    par = DataParallel(lambda cause, detail, attrs: halts.append((cause, detail, attrs)), World(rank, 2, rank, "gloo"))
    res: dict[str, Any] = {}
    # rank 0: 3 samples at mean loss 1.0 and accuracy 1; rank 1: 1 sample at 5.0 and accuracy 0 -> the global
    # batch's means are 2.0 and 0.75 over 4; rank 1's stop request travels in the same collective
    stop = StopRequest()
    if rank == 1:
        stop.signal = 15
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(1))
    u = torch.nn.Parameter(torch.zeros(1))  # trained, but only rank 0's shard reaches it
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    named = [("p", p), ("q", q), ("u", u), ("frozen", frozen)]
    res["batch"] = par.batch(torch.tensor(1.0 if rank == 0 else 5.0), 3 if rank == 0 else 1,
                             {"accuracy": 1.0 if rank == 0 else 0.0}, named, stop)
    res["stopped"] = stop.requested
    # the gradient of the global mean: weights 3/4 and 1/4; the seeds' figures ride along
    p.grad = torch.tensor([4.0, 8.0]) if rank == 0 else torch.tensor([8.0, 0.0])
    q.grad = torch.tensor([1.0 if rank == 0 else -3.0])
    u.grad = torch.tensor([8.0]) if rank == 0 else None
    res["measured"] = par.grads(named, [2.0 if rank == 0 else 6.0])
    res["grads"] = [p.grad.tolist(), q.grad.tolist(), u.grad.tolist(), frozen.grad]
    res["sums"] = par.sums([1.0 + rank, 0.5])  # a sharded validation's totals
    # one rank's NaN is every rank's
    res["nan"] = par.batch(torch.tensor(float("nan") if rank == 1 else 1.0), 2, {}, named)[0]
    # a rank that registers other parameters: HALT naming it, on every rank, and no gradient summed
    extra = [("r", torch.nn.Parameter(torch.zeros(1)))] if rank == 1 else []
    for _, t in extra:
        t.grad = torch.zeros(1)
    par.batch(torch.tensor(1.0), 2, {}, [*named, *extra])
    before = p.grad.clone()
    par.grads([*named, *extra])
    res["untouched"] = torch.equal(p.grad, before)
    # a rank whose weights differ at an epoch's end
    with torch.no_grad():
        p.add_(rank)
    par.check_epoch(4, [{"slot": "s1", "stage": "TRAINING", "alpha": 0.5, "utc": str(rank)}], [("p", p), ("q", q)])
    # rank 0's buffers on every rank (DDP's broadcast_buffers), every dtype of them
    bn = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.fill_(float(rank + 1))
        bn.num_batches_tracked.fill_(10 * rank + 3)
    par.buffers(bn)
    res["buffers"] = [bn.running_mean.tolist(), int(bn.num_batches_tracked)]
    # buffers that differ at an epoch's end are a divergence of their own
    par.check_epoch(5, [], [("p", p)], [("bn.running_var", torch.full((2,), float(rank)))])
    res["halts"] = [(c, a["ranks"], a["what"]) for c, _, a in halts]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(res))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_reductions_and_checks_across_two_gloo_ranks(tmp_path: Path) -> None:
    mp.spawn(_collectives, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["batch"] == [2.0, 4, {"accuracy": 0.75}]
        assert r["stopped"] is True  # rank 1's stop request reached rank 0
        # 3/4 * rank 0's + 1/4 * rank 1's; a gradient rank 1 lacks counts as zero there; a frozen one has none
        assert r["grads"] == [[5.0, 6.0], [0.0], [6.0], None]
        assert r["measured"] == [3.0]
        assert r["sums"] == [3.0, 1.0]
        assert r["untouched"] is True
        assert math.isnan(r["nan"])
        # the extra parameter is caught before any gradient is summed; the weights at the epoch's end (the
        # slot's timestamp is not part of the fingerprint)
        assert r["buffers"] == [[1.0, 1.0], 3]
        assert r["halts"] == [["rank_divergence", [1], "parameters"], ["rank_divergence", [1], ["weights"]],
                              ["rank_divergence", [1], ["buffers", "weights"]]]


# ------------------------------------------------------------------------------ real runs of the real CLI


JOB = [*GROWING, "trainer.epochs=3"]


def _esper(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ESPER), "--config", str(BASE_TOML), *args], capture_output=True, text=True,
                          env=rank_env(), timeout=timeout)


def _torchrun(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "esper",
           "--config", str(BASE_TOML), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=rank_env(), timeout=timeout)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job trained on 2 ranks through `esper train --nproc 2`, with a fault that only warns (no live seed to
    fail at 1:0), so every rank has WARNING events of its own to forward."""
    run = tmp_path_factory.mktemp("dist") / "two"
    done = _esper("train", "--nproc", "2", "--quiet", "--run-dir", str(run), "--fault", "seed_forward_error@1:0",
                  *sets(*JOB))
    assert done.returncode == 0, done.stdout + done.stderr
    return run


@pytest.mark.slow
def test_two_ranks_hold_the_same_lifecycle_and_weights_after_every_epoch(two: Path) -> None:
    rows0, rows1 = metrics_without_wall_clock(two), metrics_without_wall_clock(two / "rank-1")
    assert len(rows0) == 3 and rows0 == rows1  # every figure, seed stages and command counts included
    assert sum(r["commands"]["accepted"] for r in rows0) >= 1  # the controller grew seeds: a lifecycle to agree on
    rank1 = [e for e in events(two / "rank-1") if e["event"] in ("command.accepted", "seed.transition")]
    rank0 = [e for e in events(two) if e["event"] in ("command.accepted", "seed.transition")]
    assert [(e["event"], e["epoch"], e["step"]) for e in rank1] == [(e["event"], e["epoch"], e["step"]) for e in rank0]
    assert not (two / "rank-1" / "checkpoints").exists()  # rank 0 alone writes checkpoints
    assert (two / "checkpoints" / "latest").read_text().strip() == "epoch-0003"
    s0 = json.loads((two / "summary.json").read_text())
    s1 = json.loads((two / "rank-1" / "summary.json").read_text())
    assert s0["status"] == s1["status"] == "COMPLETED" and s0["final"] == s1["final"]
    # rank 0's summary finds rank 1's own files
    assert (s0["world"]["world_size"], s0["world"]["rank"], s1["world"]["rank"]) == (2, 0, 1)
    [listed] = s0["world"]["ranks"]
    assert listed["rank"] == 1 and listed["dir"] == "rank-1"
    assert {"events.jsonl", "metrics.jsonl"} <= set(listed["files"])


@pytest.mark.slow
def test_other_ranks_warnings_reach_the_runs_own_events(two: Path) -> None:
    own = [e for e in events(two / "rank-1") if e["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert {e["event"] for e in own} >= {"fault.injected", "fault.not_applicable"}
    forwarded = events(two, "rank.forwarded")
    assert [(f["attributes"]["rank"], f["attributes"]["name"], f["attributes"]["seq"], f["level"]) for f in forwarded] \
        == [(1, e["event"], e["seq"], e["level"]) for e in own]
    first = forwarded[0]["attributes"]
    assert (first["origin"], first["epoch"], first["step"], first["attributes"]["fault"]) == \
        ("tolaria", 1, 0, "seed_forward_error")
    assert forwarded[0]["epoch"] == 1  # written by rank 0 at the end of the epoch it happened in
    assert not events(two, "rank.forward_dropped")
    # the views read the run as before: rank 1's copies are not rank 0's events
    from esper.app.views.status import Run

    assert len(Run.load(two).history.sessions) == 1


@pytest.mark.slow
def test_two_ranks_match_one_process_for_the_same_global_batch(two: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    done = _esper("train", "--quiet", "--run-dir", str(one), *sets(*JOB))
    assert done.returncode == 0, done.stdout + done.stderr
    rows1, rows2 = metrics_without_wall_clock(one), metrics_without_wall_clock(two)
    for a, b in zip(rows1, rows2, strict=True):
        assert (a["seeds_by_stage"], a["params"], a["commands"]) == (b["seeds_by_stage"], b["params"], b["commands"])
        for k in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k  # float32 sums in another order
    w1, w2 = tensors(one / "checkpoints" / "epoch-0003", "model"), tensors(two / "checkpoints" / "epoch-0003", "model")
    assert sorted(w1) == sorted(w2)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w1)
    # and a checkpoint of the 1-process run resumes at 2 ranks (1 -> 2) to the same lifecycle
    r12 = tmp_path / "r12"
    done = _torchrun("train", "--quiet", "--resume", str(one / "checkpoints" / "epoch-0002"), "--run-dir", str(r12),
                     *sets(*JOB))
    assert done.returncode == 0, done.stdout + done.stderr
    last1, last12 = rows1[-1], metrics_without_wall_clock(r12)[-1]
    assert (last12["seeds_by_stage"], last12["params"]) == (last1["seeds_by_stage"], last1["params"])
    assert last12["val_loss"] == pytest.approx(last1["val_loss"], rel=1e-4)
    assert metrics_without_wall_clock(r12 / "rank-1")[-1] == last12


@pytest.mark.slow
def test_batchnorm_statistics_stay_in_step_across_ranks(tmp_path: Path) -> None:
    """A BatchNorm host on 2 ranks: each rank's forward moves its statistics from its own shard, rank 0's are
    broadcast before every step and at the epoch's end, and the buffers are part of the rank fingerprint (without
    the broadcast this run HALTs with rank_divergence naming buffers)."""
    run = tmp_path / "bn"
    bn = ["data.task=mnist1d", "data.batch_size=400", "host.factory=cnn", "host.channels=[4, 4]",
          "host.kernels=[5, 3]", "host.norm='batch'", "seeds.blueprints=['conv_block']", "seeds.blend.mode='residual'",
          "seeds.slots=[{name='s1', layer='conv1'}]"]
    done = _esper("train", "--nproc", "2", "--quiet", "--run-dir", str(run), *sets(*GROWING, *bn, "trainer.epochs=3"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not events(run, "rank.divergence")
    assert metrics_without_wall_clock(run) == metrics_without_wall_clock(run / "rank-1")
    model = tensors(run / "checkpoints" / "epoch-0003", "model")
    # one count per step of the global batch, rank 0's (its seed's own passes and probes left no trace)
    assert int(model["host.conv1.1.num_batches_tracked"]) == metrics_without_wall_clock(run)[-1]["global_step"]


@pytest.mark.slow
def test_a_gate_that_measures_decides_alike_on_every_rank_and_as_one_process(tmp_path: Path) -> None:
    """Issue 26: G2 judges a seed's own loss. Each rank measures it on its shard; judged per rank, rank 0 passed
    G2 and rank 1 culled the seed at epoch 15 of this run (HALT, rank divergence). The losses now travel in the
    gradient all-reduce, so every rank judges the global batch's figure: COMPLETED, with the lifecycle that one
    process goes through."""
    job = ['data.task="synthetic"', "trainer.epochs=17"]
    two, one = tmp_path / "two", tmp_path / "one"
    done = _esper("train", "--nproc", "2", "--quiet", "--run-dir", str(two), *sets(*job))
    assert done.returncode == 0, done.stdout + done.stderr
    assert not events(two, "rank.divergence")
    assert _esper("train", "--quiet", "--run-dir", str(one), *sets(*job)).returncode == 0

    def lifecycle(run: Path) -> list[tuple[str, str, int]]:
        return [(e["attributes"]["slot"], e["attributes"]["transition"]["dest"], e["epoch"])
                for e in events(run, "seed.transition")]

    assert lifecycle(two) == lifecycle(one) and any(d == "BLENDING" for _, d, _ in lifecycle(two))
    g2 = [e["attributes"] for e in events(two, "gate.result") if e["attributes"]["gate"] == "G2"]
    assert g2 and g2 == [e["attributes"] for e in events(two / "rank-1", "gate.result")
                         if e["attributes"]["gate"] == "G2"]


@pytest.mark.slow
def test_resume_at_two_ranks_is_bit_identical_and_at_one_keeps_the_lifecycle(two: Path, tmp_path: Path) -> None:
    start = two / "checkpoints" / "epoch-0002"
    r22, r21 = tmp_path / "r22", tmp_path / "r21"
    done = _torchrun("train", "--quiet", "--resume", str(start), "--run-dir", str(r22), *sets(*JOB))
    assert done.returncode == 0, done.stdout + done.stderr
    final = tensors(two / "checkpoints" / "epoch-0003", "model")
    again = tensors(r22 / "checkpoints" / "epoch-0003", "model")
    assert sorted(final) == sorted(again) and all(torch.equal(final[k], again[k]) for k in final)
    done = _esper("train", "--quiet", "--resume", str(start), "--run-dir", str(r21), *sets(*JOB))
    assert done.returncode == 0, done.stdout + done.stderr
    last2, last1 = metrics_without_wall_clock(two)[-1], metrics_without_wall_clock(r21)[-1]
    assert (last1["seeds_by_stage"], last1["params"]) == (last2["seeds_by_stage"], last2["params"])
    assert last1["val_loss"] == pytest.approx(last2["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_rank_that_diverges_halts_every_rank(tmp_path: Path) -> None:
    """... and a HALT is not restarted: with --max-restarts the elastic agent starts the group again (torch has no
    per-exit-code policy), and the restarted attempt sees the run HALTED and ends with 6 without touching it."""
    run = tmp_path / "skewed"
    done = _esper("train", "--nproc", "2", "--max-restarts", "1", "--quiet", "--run-dir", str(run),
                  *sets(*JOB, "host.factory=plugins_fixture:rank_skewed_host", "trainer.epochs=2"))
    assert done.returncode == 6, done.stdout + done.stderr  # HALTED, rank 0's exit code
    assert "HALTED before this restart (attempt 1): a HALT is not restarted" in done.stderr
    log = events(run)
    assert [e["event"] for e in log if e["event"] in ("run.started", "run.resuming", "run.restarted")] == \
        ["run.started"]
    assert [e["event"] for e in log[-2:]] == ["run.finished", "telemetry.closed"]  # nothing after the HALT
    assert log[-2]["attributes"]["status"] == "HALTED"
    for where in (run, run / "rank-1"):
        (div,) = events(where, "rank.divergence")
        assert div["level"] == "CRITICAL" and div["epoch"] == 1
        assert div["attributes"]["ranks"] == [1] and div["attributes"]["what"] == ["weights"]
        assert json.loads((where / "summary.json").read_text())["status"] == "HALTED"
    assert (run / "checkpoints" / "latest").read_text().strip() == "epoch-0000-emergency"


@pytest.mark.slow
def test_a_rank_that_fails_alone_ends_the_group_at_once(tmp_path: Path) -> None:
    """Rank 1's own error (its host's forward raises at its 9th training step) ends the group promptly with exit
    1: rank 1 leaves the group instead of waiting at the closing barrier, so rank 0's next collective fails
    (RankLost) instead of blocking until dist.timeout_s. The timeout here is far past the test's own."""
    run = tmp_path / "lone"
    done = _esper("train", "--nproc", "2", "--quiet", "--run-dir", str(run),
                  *sets(*JOB, "host.factory=plugins_fixture:rank_failing_host", "dist.timeout_s=3600"), timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    (own,) = events(run / "rank-1", "run.failed")
    assert own["level"] == "CRITICAL" and "fails on rank 1 only" in own["attributes"]["message"]
    (lost,) = events(run, "run.failed")
    assert lost["level"] == "CRITICAL" and lost["attributes"]["type"] == "RankLost"
    assert "another rank left the group" in lost["attributes"]["message"]
    assert (own["epoch"], own["step"]) == (lost["epoch"], lost["step"])  # the same step: nobody trained on


def test_max_restarts_needs_a_run_directory() -> None:
    from conftest import esper as esper_cli

    r = esper_cli("train", "--nproc", "2", "--max-restarts", "1", "--quiet")
    assert r.exit_code == 2 and "--max-restarts needs --run-dir" in r.output


def test_rank_crash_needs_more_than_one_rank(tmp_path: Path) -> None:
    from conftest import esper as esper_cli

    r = esper_cli("train", "--quiet", "--run-dir", str(tmp_path / "one"), "--fault", "rank_crash@1:0")
    assert r.exit_code == 2 and "the rank_crash fault needs 2 ranks or more" in r.output
    assert not (tmp_path / "one").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "group"), [(signal.SIGTERM, ExitCode.SIGTERM, False),
                                                    (signal.SIGINT, ExitCode.SIGINT, True)])
def test_a_signal_to_the_launcher_stops_every_rank_and_keeps_the_exit_code(tmp_path: Path, sig: int, code: int,
                                                                           group: bool) -> None:
    """Issue 26: SIGTERM to `esper train --nproc 2` (or Ctrl-C to its process group) stops the ranks at one step
    with their stop checkpoint, and the launcher exits 143 / 130 -- not 1 with torch's SignalException -- leaving
    no torchelastic_* directory in $TMPDIR."""
    run, tmp, log = tmp_path / "run", tmp_path / "tmp", tmp_path / "log"
    tmp.mkdir()
    cmd = [str(ESPER), "--config", str(BASE_TOML), "train", "--nproc", "2", "--quiet", "--run-dir", str(run),
           *sets(*JOB, "trainer.epochs=100000")]
    with open(log, "wb") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**rank_env(), "TMPDIR": str(tmp)},
                                 start_new_session=True)
    try:
        wait_for(lambda: (run / "checkpoints").is_dir() and len(checkpoint_dirs(run)) >= 2, child, log,
                 "two checkpoints")
        if group:
            os.killpg(child.pid, sig)
        else:
            child.send_signal(sig)
        assert child.wait(timeout=120) == code, log.read_text()
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "SignalException" not in text, text
    s = summary(run)
    assert s["status"] == "STOPPED" and s["exit_code"] == code
    assert verify(latest(run)).exit_code == 0
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("torchelastic_")]


@pytest.mark.slow
def test_accumulated_windows_on_two_ranks_match_one_process(tmp_path: Path) -> None:
    """trainer.accumulate_steps under torchrun: each rank accumulates its shards and the window is reduced once;
    the steps, the lifecycle and the weights are the one-process run's (float sums in another order)."""
    job = [*JOB, "trainer.accumulate_steps=4", "trainer.ema=0.9"]
    one, two_ranks = tmp_path / "one", tmp_path / "two"
    done = _esper("train", "--quiet", "--run-dir", str(one), *sets(*job))
    assert done.returncode == 0, done.stdout + done.stderr
    done = _esper("train", "--nproc", "2", "--quiet", "--run-dir", str(two_ranks), *sets(*job))
    assert done.returncode == 0, done.stdout + done.stderr
    rows1, rows2 = metrics_without_wall_clock(one), metrics_without_wall_clock(two_ranks)
    assert [r["global_step"] for r in rows1] == [r["global_step"] for r in rows2] == [2, 4, 6]
    for a, b in zip(rows1, rows2, strict=True):
        assert (a["seeds_by_stage"], a["params"]) == (b["seeds_by_stage"], b["params"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-5)
    for stem in ("model", "ema"):
        w1, w2 = tensors(latest(one), stem), tensors(latest(two_ranks), stem)
        assert sorted(w1) == sorted(w2)
        assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w1), stem
