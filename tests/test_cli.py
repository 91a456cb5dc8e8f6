"""The command line: bad input is one line and exit 2 with nothing written; real runs write full results."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvlab.cli.main import main


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["ppl", "--method", "stream"], "did you mean 'streaming'"),
    (["ppl", "--method", "streaming:sink=4"], "did you mean 'sinks'"),
    (["ppl", "--method", "streaming:window=0"], "window must be a positive integer"),
    (["ppl", "--method", "h2o:budget=64,recent=128"], "cannot exceed budget"),
    (["ppl", "--data", "/nonexistent/file.txt"], "neither a file nor"),
    (["ppl", "--model", "smollm-135m"], "did you mean 'smollm2-135m'"),
    (["ppl", "--chunk-size", "0"], "chunk_size must be at least 1"),
    (["ppl", "--tokens", "1"], "tokens must be at least 2"),
    (["generate", "--prompt", "   "], "prompt is empty"),
    (["demo", "--budget", "2"], "--budget must be at least 8"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, message):
    out_file = tmp_path / "r.json"
    code, out, err = _run(capsys, *argv, *(["--output", str(out_file)] if argv[0] == "ppl" else []))
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out_file.exists()


def test_cuda_absent_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = _run(capsys, "ppl", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_unknown_command_and_flag_are_usage_errors(capsys):
    code, _, err = _run(capsys, "pppl")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "ppl", "--tokenz", "5")
    assert code == 2 and "unrecognized arguments" in err


@pytest.mark.real
def test_ppl_compare_writes_the_comparison_block(smollm2, capsys, tmp_path):
    out_file = tmp_path / "r.json"
    code, out, err = _run(capsys, "ppl", "--method", "streaming:sinks=4,window=28", "--tokens", "96", "--chunk-size", "16",
                          "--compare", "full", "--output", str(out_file))
    assert code == 0, err
    result = json.loads(out_file.read_text())
    for key in ("model", "method", "data", "tokens", "ppl", "nll", "runtime_s", "tokens_per_s", "kv_bytes_peak",
                "kv_bytes_full", "compression_ratio", "versions", "git_hash"):
        assert key in result, key
    assert set(result["metrics"]) == {"speedup", "compression_ratio", "ppl_increase_percent"}
    assert result["baseline"]["method"] == "full" and result["streaming"]["method"].startswith("streaming")
    # budget + one chunk, + the 4 sinks' original keys (keys only: 2 tokens' worth of keys and values)
    assert result["kv_bytes_peak"] == pytest.approx(result["kv_bytes_full"] * (32 + 16 + 2) / 96, rel=0.02)
    assert result["tokens"] == 96


@pytest.mark.real
def test_generate_streams_from_stdin(smollm2):
    proc = subprocess.run([sys.executable, "-m", "kvlab.cli.main", "generate", "--prompt", "-", "--max-new-tokens", "8",
                           "--method", "streaming:sinks=4,window=16"], input="Name three colours.", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "KV cache" in proc.stderr


@pytest.fixture
def tiny_cli(monkeypatch, tiny_llama, tmp_path):
    """``main`` loading the tiny Llama and a byte tokenizer, and a text file to score."""
    import kvlab.cli.demo as cli_demo
    import kvlab.cli.ppl as cli_ppl
    from test_eval_helpers import FILLER, ByteTokenizer

    for module in (cli_ppl, cli_demo):
        monkeypatch.setattr(module, "load_model", lambda args: (tiny_llama, ByteTokenizer()))
    data = tmp_path / "text.txt"
    data.write_text(FILLER)
    return data


def test_ppl_several_methods_one_table_rows_and_figure(tiny_cli, tmp_path, capsys):
    out, out_file = tmp_path / "ppl", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "ppl", "--method", "streaming:sinks=4,window=28;h2o:budget=32,recent=8",
                             "--method", "full", "--data", str(tiny_cli), "--tokens", "96", "--compare", "full",
                             "--out", str(out), "--output", str(out_file), "--no-progress")
    assert code == 0, err
    table = [line.split()[0] for line in stdout.splitlines()[1:5]]
    assert table == ["full", "streaming:sinks=4,window=28", "h2o:budget=32,recent=8", "full"]
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert sorted(r["config"]["method"] for r in rows) == ["full", "h2o:budget=32,recent=8",
                                                          "streaming:sinks=4,window=28"]  # one row per cell
    assert all(r["eval"] == "ppl" and r["config"]["params"]["tokens"] == 96 for r in rows)
    assert (out / "ppl.png").stat().st_size > 10_000
    result = json.loads(out_file.read_text())
    assert [m["method"] for m in result["methods"]] == ["streaming:sinks=4,window=28", "h2o:budget=32,recent=8",
                                                        "full"]
    assert all(set(m["metrics"]) == {"speedup", "compression_ratio", "ppl_increase_percent"}
               for m in result["methods"]) and result["git_hash"]


def test_demo_takes_methods(tiny_cli, tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = _run(capsys, "demo", "--method", "full;streaming:sinks=4,window=28", "--data", str(tiny_cli),
                             "--tokens", "64", "--out", str(out), "--no-progress")
    assert code == 0, err
    assert len(list((out / "rows").glob("*.json"))) == 2 and (out / "demo.png").is_file()
    assert "streaming:sinks=4,window=28" in stdout and "budget" not in stdout


def test_ppl_bars_label_methods_by_name_else_spec_without_the_shared_profile(tmp_path):
    from kvlab.cli.bars import labels, ppl_bars

    assert labels(["full", "h2o:budget=8", "streaming:window=4"]) == ["full", "h2o", "streaming"]
    assert labels(["head-aware:budget=8,profile=/x/p.json", "head-aware:profile=p.json,budget=8,spread=even"]) == \
        ["head-aware:budget=8", "head-aware:budget=8,spread=even"]
    many = [f"h2o:budget={b}" for b in range(8, 16)]  # more than four: one row per method
    metrics = [{"ppl": 10.0 + i, "kv_bytes_peak": 2**20 * i, "tokens_per_s": 50.0} for i in range(len(many))]
    path = ppl_bars(many, metrics, "t", tmp_path / "many.png")
    assert path.stat().st_size > 10_000
