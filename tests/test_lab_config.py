"""Experiment configs: YAML -> typed grid, validated before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import kvlab.cli.main as cli_main
import lab_fakes
from kvlab.errors import KvlabError
from kvlab.lab import worker
from kvlab.lab.config import Cell, load_config, parse_config
from kvlab.methods import names as method_names

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = {"name": "t", "models": ["smollm2-135m"], "methods": ["full", "streaming:sinks=4,window=60"],
        "evals": {"fake": {"tokens": [64, 128]}}}


@pytest.fixture(autouse=True)
def fake_eval():
    with lab_fakes.registered():
        yield


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.lab", "kvlab.cli.doctor"))
    return cli_main.main(argv)


def test_grid_expands_as_a_product_with_seeds():
    cfg = parse_config({**BASE, "models": ["smollm2-135m", "qwen2.5-0.5b"], "seeds": [0, 1],
                        "methods": ["full", {"name": "h2o", "budget": [32, 64], "recent": 16}]})
    cells = cfg.cells()
    assert len(cells) == 2 * 3 * 2 * 2  # models x methods x tokens x seeds
    assert len({c.id for c in cells}) == len(cells)
    assert {c.method.split(",")[0] for c in cells} == {"full", "h2o:budget=32", "h2o:budget=64"}
    assert all("recent=16" in c.method for c in cells if c.method != "full")  # the registry's full spec
    assert {c.params["seed"] for c in cells} == {0, 1}
    assert all(c.params["data"] == "synthetic" for c in cells)  # defaults filled in: the resolved config


def test_cell_id_is_the_hash_of_the_resolved_config():
    a = parse_config({**BASE, "methods": ["streaming:window=60,sinks=4"]}).cells()
    b = parse_config({**BASE, "methods": ["streaming:sinks=4,window=60"],
                      "evals": {"fake": {"tokens": [64, 128], "data": "synthetic"}}}).cells()
    assert [c.id for c in a] == [c.id for c in b]  # same cells spelled differently share ids
    assert Cell.from_config(a[0].config()).id == a[0].id
    c = parse_config({**BASE, "evals": {"fake": {"tokens": [64, 128], "data": "other"}}}).cells()
    assert not {x.id for x in a} & {x.id for x in c}


def test_model_placeholder_in_method_specs(monkeypatch):
    seen = []
    import kvlab.lab.config as config

    monkeypatch.setattr(config, "canonical_method", lambda spec: seen.append(spec) or spec)
    parse_config({**BASE, "models": ["smollm2-135m", "org/Model-1"], "methods": ["x:profile=p/{model}.json"]})
    assert "x:profile=p/smollm2-135m.json" in seen and "x:profile=p/org--Model-1.json" in seen


@pytest.mark.parametrize("raw, needle", [
    ({**BASE, "methdos": ["full"]}, "unknown key 'methdos' (did you mean 'methods'?)"),
    ({**BASE, "evals": {"fake": {"tokns": [64]}}}, "'tokns' (did you mean 'tokens'?)"),
    ({**BASE, "evals": {"ppll": {}}}, "unknown evaluation 'ppll' (did you mean 'ppl'?)"),
    ({**BASE, "methods": ["streaming:sinkz=4"]}, "no setting 'sinkz' (did you mean 'sinks'?)"),
    ({**BASE, "methods": ["streeming"]}, "unknown method 'streeming' (did you mean 'streaming'?)"),
    ({**BASE, "models": ["smollm2-135"]}, "unknown model 'smollm2-135' (did you mean 'smollm2-135m'?)"),
    ({**BASE, "evals": {"fake": {"tokens": [0]}}}, "tokens must be positive"),
    ({**BASE, "evals": {"fake": {"seed": 1}}}, "set seeds at the top level"),
    ({**BASE, "seeds": ["a"]}, "'seeds' must be a non-empty list of integers"),
    ({**BASE, "dtype": "float8"}, "unknown dtype 'float8'"),
    ({k: v for k, v in BASE.items() if k != "models"}, "missing key 'models'"),
])
def test_bad_configs_name_the_problem(raw, needle):
    with pytest.raises(KvlabError) as err:
        parse_config(raw)
    assert needle in str(err.value)


def test_misspelt_key_fails_on_the_command_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(worker, "default_loader", lab_fakes.no_load)
    path = write(tmp_path, {**BASE, "out": str(tmp_path / "run"), "modles": ["smollm2-135m"]})
    assert run_cli(["run", str(path)], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'modles' (did you mean 'models'?)" in err
    assert str(path) in err and not (tmp_path / "run").exists()


def test_not_yaml_and_missing_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\n")
    with pytest.raises(KvlabError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(KvlabError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dry_run_lists_cells_without_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(worker, "default_loader", lab_fakes.no_load)
    path = write(tmp_path, {**BASE, "out": str(tmp_path / "run")})
    assert run_cli(["run", str(path), "--dry-run"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.count("todo ") == 4 and "4 cells, 0 done" in out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    raw = yaml.safe_load(path.read_text())
    methods = [m if isinstance(m, str) else m["name"] for m in raw["methods"]]
    missing = {m.split(":")[0] for m in methods} - set(method_names())
    if missing:
        pytest.skip(f"methods not registered yet: {', '.join(sorted(missing))}")
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.cells()
    if path.stem != "quick":
        assert "smollm2-135m" in path.read_text()  # says how to switch to the embedded models
