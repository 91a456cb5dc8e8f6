"""Retrieval over several filler texts: ``kvlab needle --filler a,b`` runs each filler as its own cells and
reports each filler, their mean and the worst one; bench_retrieval's table does the same."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import kvlab.cli.evals as cli_evals
import kvlab.cli.main as cli_main
from kvlab.evals.needle import filler_table
from test_eval_helpers import FILLER, ByteTokenizer

REPO = Path(__file__).resolve().parent.parent


def _row(method: str, data: str, length: int, depth: float, acc: float) -> dict:
    return {"status": "ok", "config": {"method": method, "params": {"data": data, "length": length, "depth": depth,
                                                                     "question_aware": False, "variant": "passkey"}},
            "metrics": {"accuracy": acc}}


def test_filler_table_gives_each_filler_the_mean_and_the_worst():
    rows = [_row("full", "pydoc", 2000, d, 1.0) for d in (0, 50)] + \
           [_row("full", "pg19", 2000, 0, 1.0), _row("full", "pg19", 2000, 50, 0.0)] + \
           [_row("full", "wikitext-2", 2000, d, 0.5) for d in (0, 50)]
    table = filler_table(rows).splitlines()
    assert table[0] == "| method | length | pydoc | pg19 | wikitext-2 | mean | worst |"
    assert table[2] == "| full | 2000 | 1.00 | 0.50 | 0.50 | 0.67 | 0.50 (pg19) |"


def test_needle_command_runs_every_filler(monkeypatch, tmp_path, capsys, tiny_llama):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.evals",))
    monkeypatch.setattr(cli_evals, "load_model", lambda args: (tiny_llama, ByteTokenizer()))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(FILLER)
    b.write_text(FILLER.upper())
    out = tmp_path / "n"
    assert cli_main.main(["needle", "--lengths", "300,400", "--depths", "0,50,100", "--samples", "2",
                          "--filler", f"{a},{b}", "--max-new-tokens", "2", "--out", str(out)]) == 0
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert len(rows) == 12 and {r["config"]["params"]["data"] for r in rows} == {str(a), str(b)}
    assert all(r["metrics"]["samples"] == 2 for r in rows)
    printed = capsys.readouterr().out
    assert f"| method | length | {a} | {b} | mean | worst |" in printed and f"needle accuracy: full [passkey] on {a}" in printed


def test_a_missing_filler_fails_before_any_row(monkeypatch, tmp_path, capsys, tiny_llama):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.evals",))
    monkeypatch.setattr(cli_evals, "load_model", lambda args: (tiny_llama, ByteTokenizer()))
    a = tmp_path / "a.txt"
    a.write_text(FILLER)
    out = tmp_path / "n"
    assert cli_main.main(["needle", "--lengths", "300", "--filler", f"{a},nope.txt", "--out", str(out)]) == 2
    assert "data 'nope.txt' is neither a file" in capsys.readouterr().err and not out.exists()


def test_bench_retrieval_table_reports_fillers_mean_and_worst():
    spec = importlib.util.spec_from_file_location("bench_retrieval", REPO / "bench" / "bench_retrieval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"name": "h2o", "fraction": 0.25, "length": 2000, "filler": f, "correct": c, "kv_bytes_peak": 30,
             "kv_bytes_full": 100} for f, c in (("pydoc", 1), ("pydoc", 1), ("pg19", 0), ("pg19", 1))]
    table = bench.table(rows)
    assert "| method | KV kept | KV peak (measured) | pydoc | pg19 | mean | worst | of full's mean | samples |" in table
    assert "| h2o | 25% | 30.0% | 1.00 | 0.50 | 0.75 | 0.50 (pg19) | n/a | 4 |" in table
