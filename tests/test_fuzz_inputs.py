"""Fuzzing the readers of outside text (issue 12 §9): Hypothesis generates hostile configs, manifests, JSONL lines
and runbooks; every command answers with a documented exit code and never a traceback, every reader with its
typed error or a reported skip."""

from __future__ import annotations

import contextlib
import json
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import tomli_w
from conftest import SYNTHETIC, out, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from esper.app.runbook import RunbookError, load_runbook
from esper.cli.main import app
from esper.core.checkpoint import load_checkpoint, manifest_digest
from esper.core.config import EsperConfig
from esper.core.errors import CheckpointError, ExitCode
from esper.core.io import jsonl
from esper.core.records.event_log import read_events

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = sorted(EsperConfig.model_fields)
KEYS = sorted({name for section in EsperConfig.model_fields.values()
               if isinstance(section.annotation, type) and hasattr(section.annotation, "model_fields")
               for name in section.annotation.model_fields})  # type: ignore[union-attr]

# Values a hostile file holds: huge and negative numbers, NaN/inf, odd text, code references to modules that
# do not exist (never a real callable: a validate imports what it names), paths, nesting.
_scalar = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=20),
    st.sampled_from(["no_such_module_fz:make", "math:no_such_fz", "mlp", "", "../../etc/passwd", "/tmp/x", "cuda",
                     "9223372036854775807", "1e400"]),
)
_ident = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=10)
hostile = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_ident, inner, max_size=4), max_leaves=12)


def _bomb(depth: int, kind: str) -> str:
    return {"list": "[" * depth + "]" * depth, "table": "{a = " * depth + "1" + "}" * depth,
            "digits": "1" + "0" * depth}[kind]


bombs = st.builds(_bomb, st.integers(100, 20_000), st.sampled_from(["list", "table", "digits"]))


def no_traceback(result: Result, codes: set[int]) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code in codes, out(result)
    assert "Traceback" not in result.output


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


# ---------------------------------------------------------------------------------------------- configs


config_docs = st.dictionaries(st.sampled_from(SECTIONS) | _ident,
                              st.dictionaries(st.sampled_from(KEYS) | _ident, hostile, max_size=4), max_size=4)


@st.composite
def config_texts(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["doc", "bomb", "bytes"]))
    if kind == "doc":
        return tomli_w.dumps(draw(config_docs)).encode()
    if kind == "bomb":
        return f"[{draw(st.sampled_from(SECTIONS))}]\n{draw(st.sampled_from(KEYS))} = {draw(bombs)}\n".encode()
    return draw(st.binary(max_size=300))


@FUZZ
@given(data=st.data())
def test_hostile_configs_are_valid_or_exit_3(data: st.DataObject) -> None:
    body = data.draw(config_texts())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_bytes(body)
        result = invoke("--config", str(path), "config", "validate", "--json")
    no_traceback(result, {ExitCode.OK, ExitCode.CONFIG})
    doc = json.loads(result.stdout)  # --json: a result or the one error document
    assert result.exit_code == 0 or doc["exit_code"] == ExitCode.CONFIG


# -------------------------------------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fuzzbase") / "run"
    r = train(run, *SYNTHETIC, "run.threads=1", "trainer.epochs=1")
    assert r.exit_code == 0, out(r)
    return run


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


@FUZZ
@given(data=st.data())
def test_hostile_manifests_verify_or_exit_4(base_run: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        shutil.copytree(_checkpoint(base_run), ckpt)
        manifest = ckpt / "manifest.json"
        doc = json.loads(manifest.read_text())
        kind = data.draw(st.sampled_from(["field", "field", "bomb", "bytes"]))
        if kind == "field":
            key = data.draw(st.sampled_from(sorted(doc)) | _ident)
            doc[key] = data.draw(hostile)
            if data.draw(st.booleans()):  # a deliberate attacker re-seals the edit
                with contextlib.suppress(ValueError):  # NaN/inf: no strict-JSON digest exists
                    doc["manifest_sha256"] = manifest_digest(doc)
            manifest.write_text(json.dumps(doc))
        elif kind == "bomb":
            key = data.draw(st.sampled_from(sorted(doc)))
            text = json.dumps({**doc, key: "@@"}).replace('"@@"', data.draw(bombs).replace("a = ", '"a": '))
            manifest.write_text(text)
        else:
            manifest.write_bytes(data.draw(st.binary(max_size=400)))
        result = invoke("inspect-checkpoint", str(ckpt), "--verify", "--json")
        no_traceback(result, {ExitCode.OK, ExitCode.CHECKPOINT})
        json.loads(result.stdout)
        if result.exit_code == ExitCode.OK:  # the loader agrees with verify
            load_checkpoint(ckpt)
        else:
            with pytest.raises(CheckpointError):
                load_checkpoint(ckpt)


# -------------------------------------------------------------------------------------------- JSONL lines


@st.composite
def jsonl_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["record", "record", "bomb", "bytes"]))
    if kind == "record":
        keys = st.sampled_from(["seq", "utc", "run_id", "event", "source", "level", "attributes", "epoch",
                                "val_loss", "outcome", "command_id", "slot"]) | _ident
        return json.dumps(draw(st.dictionaries(keys, hostile, max_size=8))).encode()
    if kind == "bomb":
        return draw(bombs).replace("a = ", '"a": ').encode()
    return draw(st.binary(max_size=200)).replace(b"\n", b" ")


@FUZZ
@given(data=st.data())
def test_hostile_jsonl_lines_are_skipped_and_reported(base_run: Path, data: st.DataObject) -> None:
    lines = data.draw(st.lists(jsonl_lines(), min_size=1, max_size=6))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base_run, run)
        blob = b"\n".join(lines) + data.draw(st.sampled_from([b"\n", b""]))
        for name in ("events.jsonl", "metrics.jsonl", "field_reports.jsonl"):
            with open(run / name, "ab") as fh:
                fh.write(blob)
            jsonl.read(run / name)  # never raises for content
        read_events(run / "events.jsonl")
        result = invoke("reports", str(run), "--json")
        no_traceback(result, {ExitCode.OK})
        json.loads(result.stdout)


# ---------------------------------------------------------------------------------------------- runbooks


_step_keys = st.sampled_from(["name", "run", "exit_code", "timeout_s", "expect"]) | _ident
_step_values = st.one_of(hostile, st.sampled_from(["esper lifecycle seed", "esper {nope}", "rm -rf /", "esper '"]),
                         st.floats(), st.sampled_from([0, -1, 10**30]))
runbook_docs = st.fixed_dictionaries(
    {"name": hostile, "step": st.lists(st.dictionaries(_step_keys, _step_values, max_size=6), max_size=3)},
    optional={"vars": st.dictionaries(_ident, hostile, max_size=3), "description": hostile})


@FUZZ
@given(data=st.data())
def test_hostile_runbooks_load_or_exit_3(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["doc", "doc", "bomb", "bytes"]))
    if kind == "doc":
        body = tomli_w.dumps(data.draw(runbook_docs)).encode()
    elif kind == "bomb":
        body = f'name = "x"\n[[step]]\nname = "a"\nrun = "esper x"\ntimeout_s = {data.draw(bombs)}\n'.encode()
    else:
        body = data.draw(st.binary(max_size=300))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_bytes(body)
        try:
            rb = load_runbook(path)
        except RunbookError as exc:
            assert exc.exit_code == ExitCode.CONFIG
            result = invoke("runbook", "run", str(path), "--json")
            no_traceback(result, {ExitCode.CONFIG})
            assert json.loads(result.stdout)["exit_code"] == ExitCode.CONFIG
        else:  # it loaded: every step is an esper command with a finite, bounded timeout
            assert all(0 < s.timeout_s <= 7 * 86_400 and s.args is not None for s in rb.steps)

