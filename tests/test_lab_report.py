"""Report tables (csv, json, latex, md) and the success criteria, from rows only."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import kvlab.cli.main as cli_main
import lab_fakes
from kvlab.lab.criteria import FAIL, NO_DATA, PASS, check
from kvlab.lab.frame import rows_frame
from kvlab.lab.report import build_tables
from kvlab.lab.store import Store

SMOL = "smollm2-135m"
STREAM, H2O = "streaming:sinks=4,window=1020", "h2o:budget=1024,recent=256"


def run_folder(tmp_path, rows):
    store = Store(tmp_path / "run")
    for row in rows:
        store.put(row)
    return store.root


def cli(argv, monkeypatch):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.lab", "kvlab.cli.doctor"))
    return cli_main.main(argv)


def test_each_cell_is_compared_with_the_full_cache_of_its_group():
    rows = [lab_fakes.ppl_row(SMOL, m, t) for m in ("full", STREAM) for t in (2000, 4000)]
    rows.append(lab_fakes.ppl_row("qwen2.5-0.5b", STREAM, 2000))  # no full row in its group
    df = rows_frame(rows).set_index(["model", "spec", "param.tokens"])
    cell = df.loc[(SMOL, STREAM, 4000)]
    full = df.loc[(SMOL, "full", 4000)]
    assert cell["mem_reduction_pct"] == pytest.approx(100 * (1 - 1024 / 4000))
    assert cell["quality_change_pct"] == pytest.approx(100 * (cell["quality"] / full["quality"] - 1))
    assert cell["quality_loss_pct"] == pytest.approx(cell["quality_change_pct"])  # ppl: lower is better
    assert cell["speedup"] == pytest.approx(full["runtime_s"] / cell["runtime_s"])
    alone = df.loc[("qwen2.5-0.5b", STREAM, 2000)]
    assert alone["mem_reduction_pct"] == pytest.approx(100 * (1 - 1024 / 2000))  # from its own kv_bytes_full
    assert math.isnan(alone["quality_change_pct"]) and math.isnan(alone["speedup"])


def test_quality_loss_follows_higher_is_better():
    rows = [lab_fakes.row("needle", SMOL, m, {"length": 512}, {"accuracy": a}, hib={"accuracy": True})
            for m, a in (("full", 0.8), (STREAM, 0.6))]
    cell = rows_frame(rows).set_index("spec").loc[STREAM]
    assert cell["quality_change_pct"] == pytest.approx(-25.0) and cell["quality_loss_pct"] == pytest.approx(25.0)


def test_tables_per_phase():
    tables = {t.name: t for t in build_tables(rows_frame(lab_fakes.paper_rows()))}
    assert {"ppl_summary", "ppl_method_x_tokens", "ppl_h2o_x_budget", "ppl_streaming_x_window",
            "ppl_streaming_x_sinks", "needle_summary", "needle_method_x_length", "needle_method_x_depth"} <= set(tables)
    window = tables["ppl_streaming_x_window"]
    assert list(window.data.columns.get_level_values(1).unique()) == [128, 256, 512, 1020, 4096]
    assert window.caption == "data=pg19"  # constant settings move to the caption
    assert list(window.data.index.names) == ["model", "tokens", "sinks"]  # the ones that vary stay
    summary = tables["ppl_summary"].data
    assert summary.iloc[0]["method"] == "full"  # the reference first in its group
    assert {"ppl", "KV MiB", "memory reduction %", "quality change %", "speed-up"} <= set(summary.columns)


def test_report_writes_every_format(tmp_path, monkeypatch, capsys):
    rows = lab_fakes.paper_rows() + [lab_fakes.row("ppl", SMOL, "quant:bits=4", {"tokens": 5}, {}, error="Boom: x")]
    root = run_folder(tmp_path, rows)
    assert cli(["report", str(root), "--format", "csv,json,latex,md", "--quiet"], monkeypatch) == 0
    out = root / "report"
    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == len(rows) and {"mem_reduction_pct", "quality_change_pct", "speedup"} <= set(csv.columns)
    data = json.loads((out / "report.json").read_text())
    assert data["rows"] == len(rows) and data["failed"] == 1
    names = [t["name"] for t in data["tables"]]
    assert "ppl_method_x_tokens" in names and names[-1] == "failed"
    assert data["tables"][-1]["records"][0]["error"] == "Boom: x"
    tex = (out / "report.tex").read_text()
    assert tex.count("\\begin{table}") == len(names) and "\\toprule" in tex and "\\midrule" in tex
    assert "memory reduction \\%" in tex and "\\label{tab:ppl_streaming_x_window}" in tex
    md = (out / "report.md").read_text()
    assert "## ppl: method x tokens" in md and "|---|" in md
    assert not list(out.glob(".*"))  # no temporary files left


def test_criteria_on_a_paper_scale_run(tmp_path, monkeypatch, capsys):
    root = run_folder(tmp_path, lab_fakes.paper_rows())
    assert cli(["report", str(root), "--format", "json", "--criteria", "--quiet"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert ("[PASS] KV memory reduced >= 40% at 10000+ tokens: best 98.7% (streaming:sinks=4,window=128, "
            "smollm2-135m, ppl, 10000 tokens)") in printed
    assert "[PASS] quality loss < 5%" in printed and "streaming:sinks=4,window=4096: worst loss +4.72%" in printed
    assert "[PASS] 20000+ tokens supported: 9 ok cell(s)" in printed
    assert "[PASS] 3 model families run: 3 families (gemma, llama, qwen)" in printed
    assert "[PASS] an ablation present: h2o budget (ppl): 256, 512, 2048;" in printed
    assert "streaming window (ppl): 128, 256, 512, 1020, 4096" in printed
    saved = json.loads((root / "report" / "report.json").read_text())["criteria"]
    assert [c["status"] for c in saved] == [PASS, PASS, PASS, PASS, PASS]


def test_quality_criterion_takes_the_best_methods_worst_cell():
    rows = [lab_fakes.ppl_row(SMOL, m, t) for m in ("full", STREAM, H2O) for t in (2000, 10000)]
    quality = check(rows_frame(rows))[1]
    assert quality.status == FAIL and "worst loss +7.18% over 2 cell(s)" in quality.detail  # 10000 tokens lose 7%
    quality = check(rows_frame([r for r in rows if r["config"]["params"]["tokens"] == 2000]))[1]
    assert quality.status == PASS and "worst loss +3.90% over 1 cell(s)" in quality.detail


def test_criteria_without_the_data_say_no_data_not_pass():
    quick = [lab_fakes.ppl_row(SMOL, m, t) for m in ("full", "streaming:sinks=4,window=252") for t in (512, 1024)]
    statuses = [c.status for c in check(rows_frame(quick))]
    assert statuses == [NO_DATA, FAIL, NO_DATA, FAIL, FAIL]  # 1024 tokens, 25% kept: 6% worse
    only_full = [lab_fakes.ppl_row(SMOL, "full", 20000)]
    assert [c.status for c in check(rows_frame(only_full))] == [NO_DATA, NO_DATA, PASS, FAIL, FAIL]


def test_a_failed_long_cell_fails_the_long_context_criterion():
    rows = [lab_fakes.row("ppl", SMOL, "full", {"tokens": 20000}, {}, error="OutOfMemoryError: CUDA"),
            lab_fakes.ppl_row(SMOL, "full", 4000)]
    long_context = check(rows_frame(rows))[2]
    assert long_context.status == FAIL and "OutOfMemoryError" in long_context.detail


@pytest.mark.parametrize("argv, needle", [
    (["report", "{root}", "--format", "csv,xlsx"], "unknown report format 'xlsx'"),
    (["report", "{empty}"], "not a run folder"),
])
def test_report_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, needle):
    root = run_folder(tmp_path, [lab_fakes.ppl_row(SMOL, "full", 512)])
    argv = [a.format(root=root, empty=tmp_path / "nothing") for a in argv]
    assert cli(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (root / "report").exists()


def test_speed_up_uses_the_evaluations_own_timing_where_it_has_one():
    rows = [lab_fakes.row("latency", SMOL, m, {"tokens": 5000}, {"decode_ms_median": ms, "runtime_s": 9.0})
            for m, ms in (("full", 20.0), (STREAM, 8.0))]
    assert rows_frame(rows).set_index("spec").loc[STREAM, "speedup"] == pytest.approx(2.5)
