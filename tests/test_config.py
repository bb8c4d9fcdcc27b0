"""The typed config: shipped file, a readable error per bad-input class, --set overrides, resolution."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from esper.app.session import changed_keys
from esper.core import config as cfg
from esper.core.errors import ConfigError, ExitCode

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "esper.toml"


def _write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path | None = None, sets: list[str] | None = None, env: dict[str, str] | None = None) -> str:
    """Load and return the ConfigError message; fail if loading succeeds or the error maps to another code."""
    with pytest.raises(ConfigError) as info:
        cfg.load(path, sets or [], env={} if env is None else env)
    assert info.value.exit_code == ExitCode.CONFIG == 3
    return str(info.value)


def _schema_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the schema, descending into sub-models and lists of sub-models."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"  # the key as written (checkpoint.async is async_ in Python)
        ann = field.annotation
        if get_origin(ann) is list and get_args(ann) and isinstance(get_args(ann)[0], type) \
                and issubclass(get_args(ann)[0], BaseModel):
            out.append(path)
            out += _schema_paths(get_args(ann)[0], path + "[].")
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _schema_paths(ann, path + ".")
        else:
            out.append(path)
    return out


def _has(doc: Any, path: str) -> bool:
    node = doc
    for part in path.split("."):
        if part.endswith("[]"):
            node = node.get(part[:-2]) if isinstance(node, dict) else None
            if not isinstance(node, list) or not node:
                return False
            node = node[0]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


# --- defaults and the shipped file ---------------------------------------------------------------------


def test_defaults_validate() -> None:
    c = cfg.EsperConfig()
    assert cfg.from_dict(c.to_dict()) == c
    assert c.trainer.epochs == 24 and c.data.task == "digits"


# The shipped run (MNIST-1D on the small cnn host, growing conv seeds) differs from the built-in defaults in exactly
# these keys; each says so in its comment, so the file cannot silently drift from the schema.
SHIPPED_RUN = {
    "run.threads", "data.task", "data.batch_size", "host.factory", "seeds.blueprints", "seeds.slots",
    "seeds.blend.mode", "controller.plateau_window", "controller.plateau_min_delta", "trainer.epochs", "trainer.lr",
    "trainer.optimizer", "trainer.weight_decay", "trainer.cosine_t_max", "trainer.min_lr",
}


def _shipped_lines() -> dict[str, str]:
    """dotted key -> its line in the shipped file (a [[table]]'s keys as ``table.key``, last entry wins)."""
    lines: dict[str, str] = {}
    section = ""
    for line in SHIPPED.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]")
        elif "=" in stripped and not stripped.startswith("#"):
            lines.setdefault(f"{section}.{stripped.split('=', 1)[0].strip()}", line)
    return lines


def test_shipped_file_validates_and_differs_from_defaults_only_where_it_says() -> None:
    resolved = cfg.load(SHIPPED, env={})
    assert resolved.path == SHIPPED
    shipped = resolved.config
    assert changed_keys(cfg.EsperConfig().to_dict(), shipped.to_dict()) == sorted(SHIPPED_RUN)
    lines = _shipped_lines()
    for key in SHIPPED_RUN - {"seeds.slots"}:
        assert "(built-in: " in lines[key].split("#", 1)[1], f"{key}: {lines[key]!r} does not name its default"
    assert "(built-in slots: hidden1, hidden2)" in lines["seeds.slots.layer"]
    for key, line in lines.items():
        if "(built-in" in line and key != "seeds.slots.layer":
            assert key in SHIPPED_RUN, f"{key} claims a built-in default it does not differ from: {line!r}"
    assert shipped.data.task == "mnist1d" and shipped.host.factory == "cnn"
    assert [(s.name, s.layer) for s in shipped.seeds.slots] == [("s1", "conv1"), ("s2", "conv2")]


def test_shipped_file_has_every_schema_key() -> None:
    doc = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    text = SHIPPED.read_text(encoding="utf-8")
    paths = _schema_paths(cfg.EsperConfig)
    assert "trainer.profiler.dir" in paths and "seeds.slots[].layer" in paths  # the walk itself descends
    missing = []
    for path in paths:
        if path == "faults" or path.startswith("faults[]."):
            continue  # the default is no faults: documented as a commented [[faults]] example below
        if not _has(doc, path):
            missing.append(path)
    assert missing == []
    assert "# [[faults]]" in text and "# name =" in text and "# at =" in text


def test_shipped_file_comments_every_key() -> None:
    for n, line in enumerate(SHIPPED.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", "[")):
            assert "#" in stripped.split("=", 1)[1], f"esper.toml line {n} has no comment: {line!r}"


def test_contract_keys_exist() -> None:
    paths = set(_schema_paths(cfg.EsperConfig))
    contract = {
        "run.seed", "run.output_dir", "data.task", "data.batch_size", "seeds.enabled", "trainer.epochs",
        "trainer.lr", "trainer.lr_policy", "controller.timeout_ms", "checkpoint.every_epochs",
        "checkpoint.keep_last", "rollback.fast_sla_ms", "rollback.full_sla_ms", "emergency.recovery_epochs",
        "faults", "faults[].name", "faults[].at",
    }
    assert contract <= paths


# --- each bad-input class ------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "[run]\nseed = 1\n[trainer\nepochs = 3\n")
    msg = _error(path)
    assert str(path) in msg and "TOML syntax error" in msg
    assert "line 3" in msg and "column" in msg


def test_not_utf8_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[run]\noutput_dir = \"caf\xe9\"\n")
    msg = _error(path)
    assert str(path) in msg and "UTF-8" in msg


def test_unknown_key_names_path_and_suggests(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainer]\nepoch = 3\n"))
    assert "trainer.epoch: unknown key" in msg
    assert "did you mean 'trainer.epochs'?" in msg


def test_unknown_section_suggests(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainr]\nepochs = 3\n"))
    assert "trainr: unknown key" in msg and "did you mean 'trainer'?" in msg


def test_unknown_key_inside_list_item(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[[seeds.slots]]\nname = "a"\nlyer = "hidden1"\n'))
    assert "seeds.slots.0.lyer: unknown key" in msg and "did you mean 'seeds.slots.0.layer'?" in msg


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainer]\nzzzzqqq = 3\n"))
    assert "trainer.zzzzqqq: unknown key" in msg and "did you mean" not in msg


def test_wrong_type_names_path_value_constraint(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[trainer]\nepochs = "ten"\n'))
    assert "trainer.epochs" in msg and "'ten'" in msg and "valid integer" in msg


def test_strict_types_reject_coercible_values(tmp_path: Path) -> None:
    # lax pydantic would turn 1 into True; the schema is strict
    msg = _error(_write(tmp_path, "[seeds]\nenabled = 1\n"))
    assert "seeds.enabled" in msg and "valid boolean" in msg and "(got 1)" in msg


def test_out_of_range_names_path_value_bound(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainer]\nepochs = 0\n"))
    assert "trainer.epochs" in msg and "greater than or equal to 1" in msg and "(got 0)" in msg


def test_bad_literal_lists_choices(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[trainer]\nlr_policy = "sawtooth"\n'))
    assert "trainer.lr_policy" in msg and "'cosine'" in msg and "'sawtooth'" in msg


@pytest.mark.parametrize(
    "item", ["trainer.lr=inf", "trainer.lr=nan", "controller.fossilize_min_improvement=nan"]
)
def test_non_finite_floats_rejected(item: str) -> None:
    with pytest.raises(ConfigError, match=item.split("=")[0] + ": Input should be a finite number"):
        cfg.from_dict({}, [item])


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainer]\nepochs = 0\nlr = -1.0\n"))
    assert "trainer.epochs" in msg and "trainer.lr" in msg


@pytest.mark.parametrize(
    "item",
    ["trainer.epochs", "=3", "trainer..epochs=3", "trainer.epochs!=3", "9lives=1", "trainer.epochs=[1,",
     "trainer.epochs=", "trainer.epochs.x=1"],
)
def test_malformed_set_names_the_item(item: str) -> None:
    msg = _error(SHIPPED, [item])
    assert "malformed --set" in msg and repr(item) in msg


def test_missing_file_names_path_tried(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    msg = _error(path)
    assert f"config file not found: {path}" in msg


def test_unknown_fault_suggests(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[[faults]]\nname = "nan_los"\nat = "2:3"\n'))
    assert "faults.0.name" in msg and "unknown fault 'nan_los'" in msg and "did you mean 'nan_loss'?" in msg


@pytest.mark.parametrize("at", ["x", "0:1", "2:", "-1", "1:2:3"])
def test_bad_fault_at(tmp_path: Path, at: str) -> None:
    msg = _error(_write(tmp_path, f'[[faults]]\nname = "nan_loss"\nat = "{at}"\n'))
    assert "faults.0.at" in msg and repr(at) in msg


def test_fault_without_at_is_missing_key(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[[faults]]\nname = "nan_loss"\n'))
    assert "faults.0.at: required key is missing" in msg


def test_good_faults_parse(tmp_path: Path) -> None:
    c = cfg.load(_write(tmp_path, '[[faults]]\nname = "nan_loss"\nat = "2:3"\n[[faults]]\nname = "sigterm"\n'
                                  'at = "4"\n'), env={}).config
    assert [(f.name, f.at) for f in c.faults] == [("nan_loss", "2:3"), ("sigterm", "4")]


def test_profiler_enabled_without_dir(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "[trainer.profiler]\nenabled = true\n"))
    assert "trainer.profiler" in msg and "requires dir" in msg
    ok = cfg.load(_write(tmp_path, '[trainer.profiler]\nenabled = true\ndir = "prof"\n', "ok.toml"), env={})
    assert ok.config.trainer.profiler.dir == "prof"


def test_channel_blend_without_alpha(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[seeds.blend]\nmode = "channel"\n'))
    assert "seeds" in msg and "channel_alpha" in msg
    good = '[seeds.blend]\nmode = "channel"\nchannel_alpha = [0.5, 1.0]\n'
    ok = cfg.load(_write(tmp_path, good, "ok.toml"), env={})
    assert ok.config.seeds.blend.channel_alpha == [0.5, 1.0]


def test_duplicate_slot_names(tmp_path: Path) -> None:
    text = '[[seeds.slots]]\nname = "a"\nlayer = "hidden1"\n[[seeds.slots]]\nname = "a"\nlayer = "hidden2"\n'
    assert "slot names must be unique" in _error(_write(tmp_path, text))


def test_bad_task_name(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, '[data]\ntask = "mnist"\n'))
    assert "data.task" in msg and "'mnist'" in msg and "module:function" in msg


# --- --set overrides -----------------------------------------------------------------------------------


def test_set_overrides_nested_and_toml_values() -> None:
    c = cfg.load(SHIPPED, [
        "seeds.blend.steps=5", "host.hidden=[8, 4]", "trainer.lr=0.01", "seeds.enabled=false",
        'data.task="synthetic"', 'seeds.user_blueprints={tiny = "mypkg.bp:make"}',
        'faults=[{name = "nan_loss", at = "2:1"}]', "trainer.profiler.enabled=true",
        "trainer.profiler.dir=prof",
    ], env={}).config
    assert c.seeds.blend.steps == 5 and c.host.hidden == [8, 4] and c.trainer.lr == 0.01
    assert c.seeds.enabled is False and c.data.task == "synthetic"
    assert c.seeds.user_blueprints == {"tiny": "mypkg.bp:make"}
    assert [(f.name, f.at) for f in c.faults] == [("nan_loss", "2:1")]
    assert c.trainer.profiler.enabled is True and c.trainer.profiler.dir == "prof"


def test_set_bare_word_is_a_string() -> None:
    assert cfg.parse_override("data.task=synthetic") == (["data", "task"], "synthetic")
    assert cfg.parse_override("data.task=mypkg.tasks:make") == (["data", "task"], "mypkg.tasks:make")
    assert cfg.parse_override("trainer.epochs=3") == (["trainer", "epochs"], 3)
    assert cfg.parse_override("trainer.epochs='3'") == (["trainer", "epochs"], "3")
    assert cfg.load(SHIPPED, ["data.task=synthetic"], env={}).config.data.task == "synthetic"


def test_set_bare_word_for_int_key_is_wrong_type() -> None:
    msg = _error(SHIPPED, ["trainer.epochs=ten"])
    assert "trainer.epochs" in msg and "'ten'" in msg


def test_set_quoted_string_for_int_key_names_trainer_epochs() -> None:
    msg = _error(SHIPPED, ['trainer.epochs="ten"'])
    assert "trainer.epochs: Input should be a valid integer (got 'ten')" in msg


def test_later_set_wins() -> None:
    c = cfg.load(SHIPPED, ["trainer.epochs=3", "trainer.epochs=5"], env={}).config
    assert c.trainer.epochs == 5


def test_set_unknown_key_is_reported_with_suggestion() -> None:
    msg = _error(SHIPPED, ["trainer.epoch=3"])
    assert "trainer.epoch: unknown key" in msg and "'trainer.epochs'" in msg


def test_set_recorded_in_resolved_config() -> None:
    resolved = cfg.load(SHIPPED, ["trainer.epochs=3"], env={})
    assert resolved.overrides == ("trainer.epochs=3",)


def test_config_hash_ignores_layout_but_not_values(tmp_path: Path) -> None:
    a = cfg.load(_write(tmp_path, "[trainer]\nepochs = 3\nlr = 0.5\n", "a.toml"), env={}).config
    b = cfg.load(_write(tmp_path, "[trainer]\nlr = 0.5\n# comment\nepochs = 3\n", "b.toml"), env={}).config
    c = cfg.load(_write(tmp_path, "[trainer]\nlr = 0.5\nepochs = 4\n", "c.toml"), env={}).config
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_toml_round_trip() -> None:
    c = cfg.load(SHIPPED, ["host.hidden=[8]", 'faults=[{name = "slow_step", at = "1"}]'], env={}).config
    assert cfg.from_toml_text(c.to_toml()) == c


# --- resolution order ----------------------------------------------------------------------------------


@pytest.fixture
def three_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cfg.ENV_VAR, raising=False)
    return {
        "cwd": _write(tmp_path, "[trainer]\nepochs = 1\n", "esper.toml"),
        "env": _write(tmp_path, "[trainer]\nepochs = 2\n", "env.toml"),
        "explicit": _write(tmp_path, "[trainer]\nepochs = 3\n", "explicit.toml"),
    }


def test_resolution_default_is_cwd_esper_toml(three_configs: dict[str, Path]) -> None:
    resolved = cfg.load()
    assert resolved.config.trainer.epochs == 1 and resolved.path == Path("esper.toml")


def test_resolution_env_beats_cwd(three_configs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cfg.ENV_VAR, str(three_configs["env"]))
    assert cfg.load().config.trainer.epochs == 2


def test_resolution_explicit_beats_env(
    three_configs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cfg.ENV_VAR, str(three_configs["env"]))
    assert cfg.load(three_configs["explicit"]).config.trainer.epochs == 3


def test_env_pointing_at_missing_file_does_not_fall_back(
    three_configs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "gone.toml"
    monkeypatch.setenv(cfg.ENV_VAR, str(missing))
    with pytest.raises(ConfigError, match="config file not found") as info:
        cfg.load()
    assert str(missing) in str(info.value)


def test_no_config_anywhere_is_the_built_in_defaults_but_a_named_file_must_exist(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27: `esper runs` or `esper train --set ...` without ./esper.toml ran into "config file not found"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cfg.ENV_VAR, raising=False)
    resolved = cfg.load(None, ["trainer.epochs=2"])
    assert resolved.path is None and "built-in defaults" in resolved.source
    assert resolved.config == cfg.from_dict({"trainer": {"epochs": 2}})
    with pytest.raises(ConfigError, match=r"config file not found: esper\.toml"):
        cfg.load(Path("esper.toml"))  # named: never the defaults in its place


def test_resolve_path_with_explicit_env_mapping() -> None:
    assert cfg.resolve_path(None, {}) == Path("esper.toml")
    assert cfg.resolve_path(None, {cfg.ENV_VAR: "/x.toml"}) == Path("/x.toml")
    assert cfg.resolve_path(Path("/y.toml"), {cfg.ENV_VAR: "/x.toml"}) == Path("/y.toml")


def test_an_unreadable_config_is_exit_3_whichever_way_it_was_named(tmp_path: Path) -> None:
    """Issue 26: --config used to be refused by the CLI framework (exit 2) while $ESPER_CONFIG got exit 3."""
    import os
    import shutil
    import subprocess
    import sys

    path = tmp_path / "esper.toml"
    shutil.copy(Path(__file__).resolve().parents[1] / "esper.toml", path)
    path.chmod(0)
    esper = str(Path(sys.executable).parent / "esper")

    # root reads anything: run as another user would (util-linux's setpriv, as CI runs as root)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    tmp_path.chmod(0o755)
    env = {**os.environ, "MPLCONFIGDIR": "/tmp"}
    for args, extra in (([esper, "--config", str(path), "config", "show"], {}),
                        ([esper, "config", "show"], {"ESPER_CONFIG": str(path)})):
        done = subprocess.run([*nobody, *args], capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert done.returncode == ExitCode.CONFIG, done.stderr
        assert f"cannot read {path}: Permission denied" in done.stderr and "Traceback" not in done.stderr


def test_a_toml_nested_past_the_parsers_recursion_limit_names_its_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text('[run]\nseed = 3  # "[[[[" in a comment and a string do not count\nname = "[[[["\n\n'
                    "[trainer]\nbetas = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"nested deeper than 64 levels at line 6 \(key 'betas'\)"):
        cfg.load(path)
