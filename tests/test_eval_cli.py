"""The four evaluation commands end to end on a tiny model (rows, table, figure) and their bad input."""

from __future__ import annotations

import json

import pytest

import kvlab.cli.evals as cli_evals
import kvlab.cli.main as cli_main
from test_eval_helpers import FILLER, ByteTokenizer


@pytest.fixture
def kvlab_cli(monkeypatch, tiny_llama):
    """``main(argv)`` with only the evaluation commands, loading the tiny Llama and a byte tokenizer."""
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.evals",))
    loads = []

    def fake_load(args):
        loads.append(args.model)
        return tiny_llama, ByteTokenizer()

    monkeypatch.setattr(cli_evals, "load_model", fake_load)
    return lambda *argv: cli_main.main([str(a) for a in argv]), loads


def _rows(folder):
    return [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]


def test_memory_command_rows_table_figure(kvlab_cli, tmp_path, capsys):
    run, _ = kvlab_cli
    out = tmp_path / "mem"
    assert run("memory", "--methods", "full;streaming:sinks=4,window=124", "--lengths", "300,1100", "--chunk-size", "100",
               "--out", out) == 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["eval"] for r in rows} == {"memory"}
    na = [r for r in rows if r["metrics"]["kv_bytes_peak"] is None]
    assert [(r["config"]["method"], r["config"]["params"]["tokens"]) for r in na] == [("full", 1100)]
    assert na[0]["notes"].startswith("not applicable")
    assert (out / "memory.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "n/a" in table and "streaming:sinks=4,window=124" in table


def test_needle_command_grid(kvlab_cli, tmp_path, capsys):
    run, _ = kvlab_cli
    data = tmp_path / "filler.txt"
    data.write_text(FILLER)
    out = tmp_path / "needle"
    assert run("needle", "--lengths", "300,500", "--depths", "0,100", "--data", data, "--max-new-tokens", "2",
               "--question-aware", "--out", out) == 0
    rows = _rows(out)
    assert len(rows) == 8
    assert {(r["config"]["params"]["length"], r["config"]["params"]["depth"], r["config"]["params"]["question_aware"])
            for r in rows} == {(n, d, qa) for n in (300, 500) for d in (0.0, 100.0) for qa in (False, True)}
    assert (out / "needle.png").is_file()
    assert "needle accuracy: full (question-aware)" in capsys.readouterr().out


def test_latency_command_adds_streaming_caches(kvlab_cli, tmp_path, capsys):
    run, _ = kvlab_cli
    data = tmp_path / "t.txt"
    data.write_text(FILLER)
    out = tmp_path / "lat"
    assert run("latency", "--cache-sizes", "32,64", "--sinks", "4", "--tokens", "160", "--prefill", "16", "--warmup", "4",
               "--runs", "1", "--probe-every", "40", "--probe-steps", "4", "--chunk-size", "16", "--data", data,
               "--out", out) == 0
    assert {r["config"]["method"] for r in _rows(out)} == {"full", "streaming:sinks=4,window=28",
                                                           "streaming:sinks=4,window=60"}
    assert (out / "latency.png").is_file()


def test_translate_command(kvlab_cli, tmp_path, capsys):
    run, _ = kvlab_cli
    src, tgt = tmp_path / "s.en", tmp_path / "s.fr"
    src.write_text("a b c d\ngood day\n")
    tgt.write_text("le chat\nbonjour\n")
    out = tmp_path / "tr"
    assert run("translate", "--data", f"{src},{tgt}", "--k", "1,3", "--positions", "batch,group", "--phi", "0,50",
               "--max-word-tokens", "1", "--out", out) == 0
    rows = _rows(out)
    cells = {(r["config"]["params"]["mode"], r["config"]["params"]["positions"], r["config"]["params"]["k"],
              r["config"]["params"]["phi"]) for r in rows}
    assert cells == {("offline", "batch", 0, 0), ("waitk", "batch", 1, 0), ("waitk", "batch", 3, 0),
                     ("waitk", "group", 1, 0), ("waitk", "group", 3, 0), ("waitk", "group", 1, 50),
                     ("waitk", "group", 3, 50)}
    assert (out / "translate.png").is_file()
    assert "BLEU" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["needle", "--depths", "0,101"], "depths must be between 0 and 100"),
    (["needle", "--lengths", "900000", "--depths", "50"], "tokens; length 900000 needs"),
    (["memory", "--lengths", "10000000"], "has only"),
    (["translate", "--k", "0,3"], "k must be at least 1"),
    (["latency", "--cache-sizes", "8", "--sinks", "8"], "below the cache size"),
    (["memory", "--method", "streaming:sink=4"], "has no setting 'sink'"),
])
def test_bad_input_is_one_line_and_exit_2(kvlab_cli, tmp_path, capsys, argv, message):
    run, _ = kvlab_cli
    assert run(*argv, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_translation_files_of_different_lengths_fail_before_the_model_loads(kvlab_cli, tmp_path, capsys):
    run, loads = kvlab_cli
    src, tgt = tmp_path / "s.en", tmp_path / "s.fr"
    src.write_text("one\ntwo\nthree\n")
    tgt.write_text("un\n")
    assert run("translate", "--data", f"{src},{tgt}", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "has 3 lines" in err and "has 1" in err and err.count("\n") == 1
    assert loads == [] and not (tmp_path / "x").exists()


@pytest.mark.parametrize("values, specs", [
    (["full,streaming:sinks=4,window=1020"], ["full", "streaming:sinks=4,window=1020"]),
    (["full;streaming:sinks=4,window=1020"], ["full", "streaming:sinks=4,window=1020"]),
    (["h2o:budget=8,recent=2", "full"], ["h2o:budget=8,recent=2", "full"]),
    (["streaming:sinks=0,window=9,h2o:budget=5,recent=1,full"],
     ["streaming:sinks=0,window=9", "h2o:budget=5,recent=1", "full"]),
])
def test_method_lists_split_on_semicolons_and_commas(values, specs):
    assert cli_evals.split_specs(values) == specs
