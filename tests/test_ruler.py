"""RULER generated locally: deterministic samples at the requested length, answers in the context, RULER's
scoring, the command end to end on a tiny model, its bad input, and the lab config."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import kvlab.cli.main as cli_main
import kvlab.cli.ruler as cli_ruler
from kvlab.errors import KvlabError
from kvlab.evals import ruler, ruler_report
from kvlab.evals.ruler_tasks import TASKS
from test_eval_helpers import FILLER, ByteTokenizer, ChatByteTokenizer

REPO = Path(__file__).resolve().parent.parent
LENGTH = 2500  # bytes (= tokens of the byte tokenizer)


def test_there_are_rulers_eleven_synthetic_tasks():
    assert list(TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    assert ruler.expand_tasks(["niah", "vt", "niah_single_1"]) == [*TASKS][:8] + ["vt"]


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_deterministic_fit_the_length_and_hold_their_answers(task):
    tok = ChatByteTokenizer()
    a = ruler.make_samples(tok, task, LENGTH, 2, seed=0, text=FILLER)
    assert a == ruler.make_samples(tok, task, LENGTH, 2, seed=0, text=FILLER)
    assert a[0].answers != a[1].answers  # two samples differ
    assert ruler.make_samples(tok, task, LENGTH, 1, seed=1, text=FILLER)[0].answers != a[0].answers
    for s in a:
        assert s.tokens == len(tok.encode(s.context)) + len(tok.encode(s.question))
        assert LENGTH - 130 < s.tokens <= LENGTH  # within one haystack unit (a uuid needle: ~120 bytes)
        assert s.answers and all(x in s.context for x in s.answers)
        assert s.context.startswith("<u>") and s.question.endswith("<a>" + s.question.split("<a>")[-1])


def test_needles_keys_and_queries_follow_the_task_table():
    tok = ByteTokenizer()

    def one(task):
        return ruler.make_samples(tok, task, LENGTH, 1, seed=0, text=FILLER)[0]

    needles = re.compile(r"magic (?:numbers|uuids) for ([\w-]+) is: ([\w-]+)\.")
    s = one("niah_multikey_1")
    assert len(needles.findall(s.context)) == 4 and len(s.answers) == 1
    s = one("niah_multivalue")
    found = needles.findall(s.context)
    assert len(found) == 4 and len({k for k, _ in found}) == 1 and sorted(s.answers) == sorted(v for _, v in found)
    s = one("niah_multiquery")
    assert len(s.answers) == 4 and s.question.split("?")[0].count(", ") == 3 and "What are all" in s.question
    s = one("niah_multikey_3")  # a haystack of uuid needles; only the asked key's value is the answer
    found = needles.findall(s.context)
    assert len(found) == s.units + 1 and all(re.fullmatch(r"[0-9a-f-]{36}", v) for _, v in found)
    assert [v for k, v in found if k in s.question] == list(s.answers)
    s = one("niah_single_1")
    assert "A special magic number is hidden" in s.context and "The grass is green." in s.context


def test_variable_tracking_chain_is_in_order_after_a_worked_example():
    s = ruler.make_samples(ByteTokenizer(), "vt", LENGTH, 1, seed=0)[0]
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    body = s.context[s.context.rindex("Memorize and track"):]  # the sample, after the example
    names = list(s.answers)
    assert len(names) == 5 and f"VAR {names[0]} = {value}" in body
    positions = [body.index(f"VAR {names[i + 1]} = VAR {names[i]}") for i in range(4)]
    assert positions == sorted(positions) and positions[0] > body.index(f"VAR {names[0]} = {value}")
    assert s.context.count("Memorize and track") == 2


def test_common_and_frequent_words_counts():
    tok = ByteTokenizer()
    s = ruler.make_samples(tok, "cwe", 9000, 1, seed=0)[0]  # 4096 or more: RULER's 30 and 3 repeats
    listed = s.context[s.context.rindex("Memorize the ones"):]
    counts = Counter(re.findall(r"\d+\. ([\w-]+)", listed))
    assert {counts[w] for w in s.answers} == {30}
    assert set(counts.values()) == {30, 3} and len(counts) == s.units
    s = ruler.make_samples(tok, "fwe", 3000, 1, seed=0)[0]
    counts = Counter(s.context.split("coded words. ", 1)[1].split())
    top = [w for w, _ in counts.most_common(4)]
    assert top[0] == "..." and top[1:] == list(s.answers)


def test_score_is_rulers_recall_of_the_expected_strings():
    assert ruler.score(" 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.score("1234567", ["1234567", "7654321"]) == 0.5
    assert ruler.score("The words are: APPLE, pear", ["apple", "Pear", "plum", "fig"]) == 0.5
    assert ruler.score("", ["x"]) == 0.0
    assert ruler.score("no\x00match\x1f", ["match"]) == 1.0


def test_too_short_and_unknown_tasks_are_errors():
    with pytest.raises(KvlabError, match="too short for vt"):
        ruler.make_samples(ByteTokenizer(), "vt", 300)
    with pytest.raises(KvlabError, match=r"unknown task 'niah_single4' \(did you mean 'niah_single_"):
        ruler.Params(task="niah_single4")
    with pytest.raises(KvlabError, match="samples must be at least 1"):
        ruler.Params(samples=0)


@pytest.fixture
def kvlab_cli(monkeypatch, tiny_qwen2):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.ruler",))
    monkeypatch.setattr(cli_ruler, "load_model", lambda args: (tiny_qwen2, ChatByteTokenizer()))
    return lambda *argv: cli_main.main([str(a) for a in argv])


def test_command_writes_rows_table_and_heatmap(kvlab_cli, tmp_path, capsys):
    out = tmp_path / "r"
    filler = tmp_path / "filler.txt"
    filler.write_text(FILLER)
    # the tiny model has 1024 positions: 1000 prompt tokens and 4 new ones
    assert kvlab_cli("ruler", "--method", "full;streaming:sinks=4,window=252",
                     "--tasks", "niah_single_2,niah_multikey_2,fwe",
                     "--lengths", "1000", "--samples", "2", "--filler", filler, "--max-new-tokens", "4",
                     "--no-progress", "--out", out) == 0
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    assert len(rows) == 6 and {r["eval"] for r in rows} == {"ruler"}
    for r in rows:
        m = r["metrics"]
        assert 0.0 <= m["score"] <= 1.0 and len(m["scores"]) == 2 and r["higher_is_better"]["score"] is True
        assert m["prompt_tokens"] <= 1000
    kv = {r["config"]["method"]: r["metrics"]["kv_bytes_peak"] for r in rows if r["config"]["params"]["task"] == "fwe"}
    assert kv["streaming:sinks=4,window=252"] < kv["full"]
    table = capsys.readouterr().out
    assert "| niah_single_2 |" in table and "**mean**" in table
    order = {m: i for i, m in enumerate(["full", "streaming:sinks=4,window=252"])}
    rows.sort(key=lambda r: order[r["config"]["method"]])  # the command's order: methods, then tasks
    assert (out / "ruler.md").read_text().strip() in table and set(ruler_report.table(rows).splitlines()) == \
        set((out / "ruler.md").read_text().strip().splitlines())
    assert (out / "ruler.png").stat().st_size > 5_000
    first = {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")}
    assert kvlab_cli("ruler", "--method", "full", "--tasks", "fwe", "--lengths", "1000", "--samples", "2",
                     "--filler", filler, "--max-new-tokens", "4", "--no-progress", "--out", out) == 0  # kept, not rerun
    assert {p.name: p.stat().st_mtime_ns for p in (out / "rows").glob("*.json")} == first


def test_question_aware_prefill(tiny_qwen2):
    params = ruler.Params(task="niah_single_1", length=600, samples=1, question_aware=True, max_new_tokens=2)
    m = ruler.evaluate(tiny_qwen2, ChatByteTokenizer(), "h2o:budget=128,recent=32", params)
    assert m["score"] in (0.0, 1.0) and m["kv_bytes_peak"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah_single4"], "unknown task 'niah_single4' (did you mean 'niah_single_"),
    (["--tasks", "vt", "--method", "strem:window=4"], "unknown method 'strem'"),
    (["--tasks", "niah_single_2", "--filler", "no/such/file.txt"], "data 'no/such/file.txt' is neither a file"),
    (["--tasks", "vt", "--lengths", "300"], "too short for vt"),
    (["--lengths", "4k"], "--lengths '4k' must be int"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(kvlab_cli, tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    assert kvlab_cli("ruler", *argv, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_lab_config_runs_one_cell_per_task_and_reports_the_score():
    from kvlab.lab.config import load_config
    from kvlab.lab.frame import rows_frame

    config = load_config(REPO / "configs" / "ruler.yaml")
    cells = config.cells()
    assert {c.eval for c in cells} == {"ruler"} and {c.params["task"] for c in cells} == set(TASKS)
    row = {"eval": "ruler", "status": "ok", "config": cells[0].config(), "metrics": {"score": 0.5},
           "higher_is_better": ruler.HIGHER_IS_BETTER}
    frame = rows_frame([row])
    assert frame["quality_metric"].iloc[0] == "score" and frame["quality"].iloc[0] == 0.5


@pytest.mark.real
def test_qwen_prompts_fit_4096_tokens_and_it_finds_a_needle(qwen):
    model, tok = qwen
    for task in TASKS:
        for s in ruler.make_samples(tok, task, 4096, 1, seed=0):
            assert 4096 - 64 < s.tokens <= 4096, (task, s.tokens)
            assert all(a in s.context for a in s.answers)
    params = ruler.Params(task="niah_single_1", length=700, samples=1)
    assert ruler.evaluate(model, tok, "full", params)["score"] == 1.0


def test_table_means_are_over_the_tasks_every_method_has():
    def row(method, task, score):
        return {"eval": "ruler", "status": "ok", "metrics": {"score": score},
                "config": {"method": method, "params": {"task": task, "length": 4096, "data": "pydoc",
                                                        "question_aware": False}}}

    rows = [row("full", t, 1.0) for t in ("niah_single_1", "niah_single_2", "vt")] + \
           [row("h2o", "niah_single_2", 0.5), row("h2o", "vt", 0.0)]
    lines = ruler_report.table(rows).splitlines()
    assert lines[0] == "| task | full | h2o |" and "| niah_single_1 | 1.00 | n/a |" in lines
    assert "| **mean (2 tasks)** | 1.00 | 0.25 |" in lines and not any("niah mean" in x for x in lines)
