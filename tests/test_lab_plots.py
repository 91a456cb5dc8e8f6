"""Figures from rows only: every figure the rows support, the others skipped with a reason."""

from __future__ import annotations

import pytest
from PIL import Image

import kvlab.cli.main as cli_main
import lab_fakes
from kvlab.heads.scores import CLASSES
from kvlab.heads.store import HeadProfile
from kvlab.lab.plots import FIGURES, plot_all
from kvlab.lab.store import Store

SMOL = "smollm2-135m"


def quick_rows():
    return [lab_fakes.ppl_row(SMOL, m, t) for m in ("full", "streaming:sinks=4,window=252") for t in (512, 1024)]


def test_every_figure_the_rows_support(tmp_path):
    messages = []
    result = plot_all(lab_fakes.paper_rows(), tmp_path, echo=messages.append, dpi=30, formats=("png",))
    no_documents = "no ok rows of the 'translate_document' evaluation (kvlab translate --document)"
    no_ruler = "no ok rows of the 'ruler' evaluation (kvlab ruler)"
    assert set(result.written) == set(FIGURES) - {"head_class_map", "implementation_comparison", "translation_vs_length",
                                                  "ruler_heatmap"}
    assert result.skipped == {"head_class_map": "no row's method names a head profile (profile=FILE)",
                              "implementation_comparison": "no rows of the 'compare_kvpress' evaluation",
                              "translation_vs_length": no_documents, "ruler_heatmap": no_ruler}
    assert messages == [f"skipped translation_vs_length: {no_documents}", f"skipped ruler_heatmap: {no_ruler}",
                        "skipped head_class_map: no row's method names a head profile (profile=FILE)",
                        "skipped implementation_comparison: no rows of the 'compare_kvpress' evaluation"]
    for name, paths in result.written.items():
        assert paths == [tmp_path / f"{name}.png"]
        with Image.open(paths[0]) as img:
            assert img.width > 100 and img.height > 100
    assert not list(tmp_path.glob(".*"))


def test_missing_data_is_skipped_not_faked(tmp_path):
    messages = []
    result = plot_all(quick_rows(), tmp_path, echo=messages.append, dpi=30, formats=("png",))
    assert set(result.written) == {"main_comparison", "results_summary", "memory_vs_length"}
    assert set(result.skipped) == {"ablation_window_size", "ablation_n_sink", "quality_vs_budget", "needle_heatmap",
                                   "head_class_map", "implementation_comparison", "translation_vs_length",
                                   "ruler_heatmap"}
    assert result.skipped["quality_vs_budget"] == "no method has a 'budget' setting"
    assert "no ok 'needle' rows" in result.skipped["needle_heatmap"]
    assert len(messages) == 8 and not (tmp_path / "needle_heatmap.png").exists()


def test_ruler_heatmap_from_the_rows_as_kvlab_ruler_tabulates_them(tmp_path):
    from kvlab.evals.ruler_report import scores

    def row(method, task, score):
        config = {"model": "qwen2.5-0.5b", "method": method, "eval": "ruler",
                  "params": {"task": task, "length": 4096, "samples": 2, "data": "pydoc", "question_aware": False}}
        return {"id": f"{method}-{task}", "status": "ok", "eval": "ruler", "config": config,
                "metrics": {"score": score}, "higher_is_better": {"score": True}}

    rows = [row(m, t, s) for m, ss in (("full", (1.0, 0.5)), ("streaming:sinks=4,window=1020", (0.0, 0.25)))
            for t, s in zip(("niah_single_1", "vt"), ss)]
    result = plot_all(rows, tmp_path, echo=lambda _m: None, only=["ruler_heatmap"], dpi=30, formats=("png",))
    assert result.written == {"ruler_heatmap": [tmp_path / "ruler_heatmap.png"]}
    tasks, columns, out = scores(rows)
    assert columns == ["full", "streaming:sinks=4,window=1020"] and out[("mean", "full")] == 0.75


def test_a_single_setting_is_not_an_ablation(tmp_path):
    rows = [lab_fakes.ppl_row(SMOL, "streaming:sinks=4,window=252", t) for t in (512, 1024)]
    rows += [lab_fakes.ppl_row("qwen2.5-0.5b", "streaming:sinks=4,window=128", 512)]  # other model: not a sweep
    result = plot_all(rows, tmp_path, echo=lambda _m: None, only=["ablation_window_size"], dpi=30, formats=("png",))
    assert "ablation_window_size" in result.skipped


def test_head_class_map_from_the_profile_a_row_names(tmp_path):
    layers, heads = 4, 2
    classes = [[CLASSES[(layer + h) % len(CLASSES)] for h in range(heads)] for layer in range(layers)]
    grid = [[0.5] * heads for _ in range(layers)]
    profile = HeadProfile(model=SMOL, fingerprint="x", num_layers=layers, num_kv_heads=heads, num_attention_heads=6,
                          settings={}, scores={"retrieval": grid, "induction": grid, "locality": grid}, classes=classes)
    path = profile.save(tmp_path / "profile.json")
    rows = [lab_fakes.ppl_row(SMOL, f"head-aware:budget=64,profile={path}", 512)]
    result = plot_all(rows, tmp_path / "figs", echo=lambda _m: None, only=["head_class_map"], dpi=30, formats=("png",))
    assert list(result.written) == ["head_class_map"]
    missing = [lab_fakes.ppl_row(SMOL, f"head-aware:budget=64,profile={tmp_path / 'gone.json'}", 512)]
    result = plot_all(missing, tmp_path / "figs2", echo=lambda _m: None, only=["head_class_map"])
    assert "missing or unreadable" in result.skipped["head_class_map"]


def test_plot_command_writes_png_at_300_dpi_and_pdf(tmp_path, monkeypatch, capsys):
    store = Store(tmp_path / "run")
    for row in quick_rows()[:2]:
        store.put(row)
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.lab",))
    assert cli_main.main(["plot", str(store.root)]) == 0
    figures = store.root / "figures"
    with Image.open(figures / "main_comparison.png") as img:
        assert img.info["dpi"] == pytest.approx((300, 300), abs=1)
    assert (figures / "main_comparison.pdf").read_bytes().startswith(b"%PDF")
    captured = capsys.readouterr()
    assert "wrote main_comparison" in captured.out and "skipped needle_heatmap" in captured.err
    assert cli_main.main(["plot", str(tmp_path / "nothing")]) == 2
