"""Long-document streaming translation: the document is consecutive pairs up to its length, each sentence is
translated once read in one shared cache, bounded methods hold their KV bytes flat while the full cache
grows, the rows, the command and its bad input."""

from __future__ import annotations

import json

import pytest

import kvlab.cli.evals as cli_evals
import kvlab.cli.main as cli_main
from kvlab.errors import KvlabError
from kvlab.evals import document as doc_eval
from kvlab.evals.waitk import BatchStream, GroupStream
from test_eval_helpers import ByteTokenizer, ChatByteTokenizer

#: 12 pairs; with the byte tokenizer each has 9 source tokens (" ab", " cd", " a0") + 5 reference bytes
PAIRS = [{"en": f"ab cd {chr(97 + i)}{i % 10}", "fr": f"xy {chr(97 + i)}{i % 10}"} for i in range(12)]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(PAIRS))
    return str(path)


class Logged:
    """A stream that logs every read and write (in order) before passing it on."""

    def __init__(self, inner):
        self.inner, self.log = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, ids):
        self.log.append(("read", list(ids)))
        return self.inner.read(ids)

    def write(self, ids):
        self.log.append(("write", list(ids)))
        return self.inner.write(ids)

    def next_logits(self):
        return self.inner.next_logits()

    def end_word(self, more_source):
        self.inner.end_word(more_source)


def test_document_is_consecutive_pairs_up_to_its_length(data):
    tok = ByteTokenizer()
    per_pair = len(" ab cd a0") + len("xy a0")  # 9 source bytes (words with their spaces) + 5
    doc = doc_eval.build_document(tok, doc_eval.Params(tokens=30, data=data))
    assert doc.pairs == [(p["en"], p["fr"]) for p in PAIRS[:3]]  # 28 < 30 <= 42
    assert doc.offsets == [0, per_pair, 2 * per_pair] and doc.tokens == 3 * per_pair
    assert doc_eval.build_document(tok, doc_eval.Params(tokens=28, data=data)).tokens == 28  # reached exactly
    with pytest.raises(KvlabError, match=r"has only 168 tokens in 12 pairs"):
        doc_eval.build_document(tok, doc_eval.Params(tokens=1000, data=data))


@pytest.mark.parametrize("positions, k", [("batch", 0), ("group", 0), ("batch", 2), ("group", 2)])
def test_each_sentence_is_translated_once_read_in_one_stream(tiny_llama, data, positions, k):
    tok = ChatByteTokenizer()
    params = doc_eval.Params(tokens=40, k=k, positions=positions, data=data, max_word_tokens=1)
    doc, pieces = doc_eval.build_document(tok, params), doc_eval.Pieces(tok, params)
    inner = GroupStream(tiny_llama, "full") if positions == "group" else BatchStream(tiny_llama, "full")
    stream = Logged(inner)
    outs, trace = doc_eval.run_document(stream, tok, doc, pieces, k, set(), max_word_tokens=1)
    assert len(outs) == len(doc.pairs) == 3 and all(o.tokens for o in outs)
    # the reads are exactly the document's sentences, in order, each with its separator
    expected = [t for i, (src, _) in enumerate(doc.pairs) for t in pieces(i, src)[0] + sum(pieces(i, src)[1], [])]
    assert [t for kind, ids in stream.log if kind == "read" for t in ids] == expected
    reads = [n for n, (kind, _) in enumerate(stream.log) if kind == "read"]
    words = [len(pieces(i, src)[1]) for i, (src, _) in enumerate(doc.pairs)]
    for out, n in zip(outs, words):  # sentence-level: every word written with the whole sentence read
        assert out.delays[0] == (n if k == 0 else min(k, n)) and max(out.delays) == n
    if k == 0:  # one read per sentence, then its writes
        assert len(reads) == len(doc.pairs)
        assert all(stream.log[r + 1][0] == "write" for r in reads)
    assert [t[0] for t in trace] == sorted(t[0] for t in trace)  # one stream: tokens seen only grow
    assert len({t[1] for t in trace}) == len(trace)  # the full cache grows sentence by sentence


def test_batch_conversation_and_group_documents():
    tok = ChatByteTokenizer()
    assert doc_eval.turn_text(tok, "en") == "</u><u>"
    assert doc_eval.turn_text(ByteTokenizer(), "de") == "\n\nGerman:"
    batch = doc_eval.Pieces(tok, doc_eval.Params(positions="batch"))
    group = doc_eval.Pieces(tok, doc_eval.Params(positions="group"))
    assert batch(1, "hi there") == (list(b"</u><u>"), [list(b" hi"), list(b" there")], list(b"</u><a>"))
    assert group(1, "hi there") == ([], [list(b"\nhi"), list(b" there")], list(b"\n"))  # a line of each part
    assert group(0, "hi") == batch(0, "hi")


@pytest.mark.parametrize("positions, bounded", [("batch", ("streaming:sinks=2,window=30", "h2o:budget=32,recent=8")),
                                                ("group", ("streaming:sinks=2,window=30",))])
def test_bounded_methods_hold_kv_bytes_flat_while_the_full_cache_grows(tiny_llama, data, positions, bounded):
    tok = ByteTokenizer()
    rows = {(m, n): doc_eval.evaluate(tiny_llama, tok, m, doc_eval.Params(tokens=n, positions=positions, data=data,
                                                                          max_word_tokens=1))
            for m in ("full", *bounded) for n in (50, 110)}
    full_short, full_long = rows[("full", 50)], rows[("full", 110)]
    assert full_long["kv_bytes_peak"] > 1.3 * full_short["kv_bytes_peak"]
    assert full_short["kv_bytes_peak"] == full_short["kv_bytes_full"]  # the computed full cache is the real one
    for m in bounded:
        short, long = rows[(m, 50)], rows[(m, 110)]
        assert long["kv_bytes_peak"] == short["kv_bytes_peak"] < full_short["kv_bytes_peak"]
        assert long["kv_bytes_full"] > short["kv_bytes_full"] and long["mem_reduction_pct"] > short["mem_reduction_pct"]
        held = [b for _, b in long["kv_bytes_trace"]]
        assert max(held[len(held) // 2:]) <= long["kv_bytes_peak"]
    for m in rows.values():
        for key in ("bleu", "chrf", "bleu_last_quarter", "al", "laal", "kv_bytes_peak", "kv_bytes_full",
                    "tokens_per_s", "sentences", "stream_tokens"):
            assert m[key] is not None, key
        assert len(m["hypotheses"]) == m["sentences"] and m["stream_tokens"] > m["doc_tokens"] // 2


def test_full_cache_past_the_model_positions_is_not_applicable(tiny_llama, data, monkeypatch):
    monkeypatch.setattr(tiny_llama.config, "max_position_embeddings", 50)
    tok = ByteTokenizer()
    m = doc_eval.evaluate(tiny_llama, tok, "full", doc_eval.Params(tokens=60, data=data, max_word_tokens=1))
    assert m["bleu"] is None and m["kv_bytes_peak"] is None and m["kv_bytes_full"] > 0
    assert "not applicable" in m["note"]


def test_params_refuse_bad_values():
    with pytest.raises(KvlabError, match="document length"):
        doc_eval.Params(tokens=0)
    with pytest.raises(KvlabError, match="k must be 0"):
        doc_eval.Params(k=-1)
    with pytest.raises(KvlabError, match="unknown positions"):
        doc_eval.Params(positions="interleaved")
    assert doc_eval.Params(positions="batch", phi=9).phi == 0


@pytest.fixture
def kvlab_cli(monkeypatch, tiny_llama):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.evals",))
    loads = []

    def fake_load(args):
        loads.append(args.model)
        return tiny_llama, ByteTokenizer()

    monkeypatch.setattr(cli_evals, "load_model", fake_load)
    return lambda *argv: cli_main.main([str(a) for a in argv]), loads


def test_document_command_rows_report_and_plot(kvlab_cli, data, tmp_path, capsys):
    from kvlab.lab.plots import plot_all
    from kvlab.lab.report import build_tables
    from kvlab.lab.frame import rows_frame

    run, _ = kvlab_cli
    out = tmp_path / "doc"
    assert run("translate", "--document", "--stream-tokens", "30,60", "--data", data, "--method", "full",
               "--method", "streaming:sinks=2,window=30", "--max-word-tokens", "1", "--no-progress", "--out", out) == 0
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    assert {(r["eval"], r["config"]["method"], r["config"]["params"]["tokens"]) for r in rows} == {
        ("translate_document", m, n) for m in ("full", "streaming:sinks=2,window=30") for n in (30, 60)}
    assert (out / "translate_document.png").is_file()
    assert "BLEU" in capsys.readouterr().out
    df = rows_frame(rows)
    assert df["quality_metric"].eq("bleu").all() and df["mem_reduction_pct"].notna().all()
    assert any(t.name == "translate_document_summary" for t in build_tables(df))
    written = plot_all(rows, tmp_path / "fig", echo=lambda _: None, dpi=50, formats=("png",)).written
    assert "translation_vs_length" in written and "memory_vs_length" in written


@pytest.mark.parametrize("argv, message", [
    (["--stream-tokens", "2000"], "add --document"),
    (["--document", "--stream-tokens", "0"], "document length"),
    (["--document", "--stream-tokens", "abc"], "--stream-tokens"),
    (["--document", "--k", "-1"], "k must be 0"),
    (["--document", "--stream-tokens", "100000"], "has only"),
])
def test_bad_input_is_one_line_and_exit_2(kvlab_cli, data, tmp_path, capsys, argv, message):
    run, _ = kvlab_cli
    assert run("translate", "--data", data, *argv, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
