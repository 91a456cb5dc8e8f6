"""``kvlab compare kvpress``: kvlab's side on kvpress's samples (tiny models), the rows of both sides (a fake
kvpress worker), the targets, bad input, and a small real comparison on SmolLM2 (marked ``real``)."""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import pytest
import torch

import kvlab.cli.compare as cli_compare
import kvlab.cli.main as cli_main
from kvlab.cache import make_cache
from kvlab.compare import kvpress as kp
from kvlab.compare import side_by_side as sbs
from kvlab.errors import KvlabError
from kvlab.lab import kvpress_figure as figure
from kvlab.lab.frame import rows_frame
from kvlab.lab.plots import plot_all
from kvlab.methods import build
from kvlab.stream import feed
from profiles import round_robin_profile

REPO_ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = REPO_ROOT / ".kvpress-venv"
PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny Llama: 2 layers x (keys + values) x 2 kv heads x head_dim 16 x float32


class CharTokenizer:
    """One token per character (code point mod 256), no chat template; callable like a HF tokenizer."""

    chat_template = None
    bos_token = "^"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(int(i)) for i in ids)

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False):
        return types.SimpleNamespace(input_ids=torch.tensor([self.encode(text)]))


@pytest.fixture
def model(tiny_llama, tmp_path):
    """A private copy of the tiny Llama that claims a local folder (the fake worker never opens it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    m = copy.deepcopy(tiny_llama)
    m.config._name_or_path = str(folder)
    return m


def _random_ppl(n: int, ctx: int, cont: int) -> list[kp.PplSample]:
    g = torch.Generator().manual_seed(0)
    return [kp.PplSample(torch.randint(0, 256, (ctx,), generator=g).tolist(),
                         torch.randint(0, 256, (cont,), generator=g).tolist()) for _ in range(n)]


# --- arithmetic ---------------------------------------------------------------------------------------------

def test_kept_tokens_is_kvpress_arithmetic():
    assert sbs.kept_tokens(0.25, 1002) == 751   # int, as kvpress's compute_n_kept (round would give 752)
    assert sbs.kept_tokens(0.5, 1001) == 500 and sbs.kept_tokens(0.0, 77) == 77
    assert sbs.kept_tokens(0.9, 1000) == 99     # the same float expression: 1000 * 0.1 = 99.999...
    assert sbs.kept_tokens(0.75, 3) == 1        # never empty
    with pytest.raises(KvlabError, match=r"must be in \[0, 1\)"):
        sbs.kept_tokens(1.0, 100)


def test_method_specs_keep_the_same_tokens(tmp_path):
    assert sbs.method_spec("streaming", 750) == "streaming:sinks=4,window=746"
    assert sbs.method_spec("h2o", 750) == "h2o:budget=750,recent=187"
    assert sbs.method_spec("haq", 64, "p.json") == "haq:budget=64,profile=p.json,bits=8/4/2"
    for name in ("streaming", "h2o"):
        assert build(sbs.method_spec(name, 333)).capacity() == 333
    with pytest.raises(KvlabError, match="needs a head profile: give --profile"):
        sbs.method_spec("head-aware", 100)
    with pytest.raises(KvlabError, match="unknown kvlab method .* 'h20'.*did you mean 'h2o'"):
        sbs.method_spec("h20", 100)
    with pytest.raises(KvlabError, match="leave no window"):
        sbs.method_spec("streaming", 4)


def test_grade_is_the_workers_rule():
    assert sbs.grade(" 12345.", "12345") == (True, True)
    assert sbs.grade("The key is 12345", "12345") == (True, False)
    assert sbs.grade("112345", "12345") == (False, False)


# --- kvlab's side on the tiny model -------------------------------------------------------------------------

def test_qa_keeps_kvpress_token_count_and_holds_only_that(model):
    tok = CharTokenizer()
    samples = kp.passkey_samples(tok, 2, 200)
    res = sbs.run_kvlab(model, tok, "qa", samples, ["streaming", "h2o", "full"], [0.5], chunk_size=64,
                        max_new_tokens=3)
    assert [(r["press"], r["ratio"], r["error"]) for r in res] == [("streaming", 0.5, None), ("h2o", 0.5, None),
                                                                   ("full", 0.0, None)]
    for r in res:
        for s, sample, spec in zip(r["samples"], samples, r["specs"]):
            n = len(sample.context_ids)
            kept = n if r["press"] == "full" else n // 2
            assert s["context_tokens"] == n and s["kept_tokens"] == kept
            sinks = 4 * PER_TOKEN // 2 if r["press"] == "streaming" else 0  # exact originals of the re-indexed sinks
            assert s["cache_bytes"] == kept * PER_TOKEN + sinks  # kvlab frees what it evicts
            assert s["generated_tokens"] == 3 and s["decode_steps"] == 2 and s["prefill_s"] > 0
        assert r["metrics"]["samples"] == 2 and 0.0 <= r["metrics"]["accuracy"] <= 1.0
    assert res[0]["specs"] == [f"streaming:sinks=4,window={len(s.context_ids) // 2 - 4}" for s in samples]


def test_qa_with_the_full_cache_decodes_like_the_plain_model(model):
    tok = CharTokenizer()
    sample = kp.passkey_samples(tok, 1, 150)[0]
    rec = sbs.qa_sample(model, tok, "full", sample, chunk_size=40, max_new_tokens=4)
    ids = torch.tensor([sample.context_ids + sample.question_ids])
    out = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert rec["generated_text"] == tok.decode(out)


def test_ppl_compresses_once_then_only_grows(model):
    cache = make_cache(model, "h2o:budget=20,recent=5")
    feed(model, cache, torch.arange(50)[None], 50)
    sbs.compress_now(cache)
    assert cache.kept_tokens() == [[20, 20], [20, 20]]
    sbs.unbound(cache)
    feed(model, cache, torch.arange(10)[None], 10)
    feed(model, cache, torch.arange(3)[None], 3)
    assert cache.kept_tokens() == [[33, 33], [33, 33]]  # nothing evicted after the compression
    assert cache.nbytes() == 33 * PER_TOKEN


def test_ppl_without_eviction_is_the_plain_models_nll(model):
    (sample,) = _random_ppl(1, 60, 12)
    ids = torch.tensor([sample.context_ids + sample.continuation_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 59:-1].float()
    want = float(torch.nn.functional.cross_entropy(logits, ids[0, 60:], reduction="sum"))
    for spec in ("full", sbs.method_spec("streaming", sbs.kept_tokens(0.0, 60))):
        rec = sbs.ppl_sample(model, spec, sample)
        assert rec["nll_sum"] == pytest.approx(want, rel=1e-4) and rec["scored_tokens"] == 12
    evicted = sbs.ppl_sample(model, sbs.method_spec("streaming", 30), sample)
    assert evicted["kept_tokens"] == 30 and evicted["nll_sum"] != pytest.approx(want, rel=1e-4)


def test_head_aware_runs_at_the_kept_budget_and_small_budgets_fail_alone(model, tmp_path):
    profile = round_robin_profile(model, tmp_path)
    samples = _random_ppl(1, 200, 8)
    res = sbs.run_kvlab(model, CharTokenizer(), "ppl", samples, ["head-aware", "streaming"], [0.5, 0.9],
                        profile=profile)
    by = {(r["press"], r["ratio"]): r for r in res}
    kept = by[("head-aware", 0.5)]["samples"][0]["kept_tokens"]
    assert 99 <= kept <= 100  # class budgets round down by less than a token per head
    assert "lower sinks/recent" in by[("head-aware", 0.9)]["error"]  # 20 tokens cannot hold every head's minimum
    assert by[("head-aware", 0.9)]["metrics"] == {} and by[("streaming", 0.9)]["error"] is None


# --- both sides, rows and targets -----------------------------------------------------------------------------

def test_comparison_rows_layout(model, fake):
    cmp = sbs.Comparison(task="passkey", ratios=(0.25, 0.5), presses=("StreamingLLMPress", "AdaKVPress"),
                         methods=("streaming", "h2o"), full=True, samples=2, context_tokens=120, chunk_size=50,
                         max_new_tokens=2)
    rows = sbs.run_comparison(model, CharTokenizer(), cmp, model_name="tiny", echo=lambda _: None)
    keys = [(r["config"]["implementation"], r["config"]["method"], r["config"]["ratio"]) for r in rows]
    assert keys == [("kvpress", "none", 0.0), ("kvpress", "StreamingLLMPress", 0.25),
                    ("kvpress", "StreamingLLMPress", 0.5), ("kvpress", "AdaKVPress", 0.25),
                    ("kvpress", "AdaKVPress", 0.5),
                    ("kvlab", "streaming", 0.25), ("kvlab", "streaming", 0.5), ("kvlab", "h2o", 0.25),
                    ("kvlab", "h2o", 0.5), ("kvlab", "full", 0.0)]
    assert len({r["id"] for r in rows}) == len(rows) and {r["eval"] for r in rows} == {"compare_kvpress"}
    sent = json.loads(fake.request.read_text())
    assert sent["presses"] == ["none", "StreamingLLMPress", "AdaKVPress"] and sent["ratios"] == [0.25, 0.5]
    lengths = [len(s["context_ids"]) for s in sent["samples"]]
    for r in rows:
        c = r["config"]
        assert r["status"] == "ok" and c["model"] == "tiny" and c["task"] == "passkey" and c["samples"] == 2
        assert c["context_tokens"] == 120 and c["params"]["implementation"] == c["implementation"]
        assert c["params"]["ratio"] == c["ratio"] and c["params"]["chunk_size"] == 50
        assert c["kept_tokens"] == pytest.approx(sum(int(n * (1 - c["ratio"])) for n in lengths) / 2)
        assert r["metrics"]["kv_bytes"] == r["metrics"]["cache_bytes"] and r["metrics"]["workload_s"] > 0
    kvlab_rows = [r for r in rows if r["config"]["implementation"] == "kvlab"]
    for r in kvlab_rows:  # the kvlab side kept exactly what kvpress's worker says it kept on the same ids
        assert r["metrics"]["kept_tokens"] == pytest.approx(r["config"]["kept_tokens"])
        assert len(r["config"]["specs"]) == 2 and r["notes"].startswith("kvlab: context fed 50 tokens per pass")
    notes = {r["config"]["method"]: r["notes"] for r in kvlab_rows}
    assert notes["streaming"].endswith("kept positions re-indexed")
    assert notes["full"].endswith("kept positions original, as kvpress")
    assert rows[0]["versions"]["kvpress"] == "9.9"


def _result(impl, method, ratio, *, quality, prefill, decode_s, cache_bytes, task="qa"):
    sample = {"context_tokens": 100, "prefill_s": prefill, "decode_s": decode_s, "question_s": 0.0}
    metrics = {"cache_bytes": cache_bytes, "effective_cache_bytes": cache_bytes / 2, "prefill_s": prefill,
               "kept_tokens": 50, "peak_rss_bytes": 2**30}
    metrics.update({"accuracy": quality, "decode_tok_s": 10 / decode_s} if task == "qa" else {"ppl": quality})
    return {"implementation": impl, "press": method, "ratio": ratio, "task": task, "error": None, "metrics": metrics,
            "samples": [sample], "specs": ["x"]}


def _frame(results, task="passkey"):
    return rows_frame(sbs.to_rows(results, {"model": "m"}, {"task": task, "samples": 1, "context_tokens": 100}))


def test_targets_speed_ratios_and_memory_at_adakv_accuracy():
    results = [
        _result("kvpress", "StreamingLLMPress", 0.5, quality=1.0, prefill=1.5, decode_s=0.5, cache_bytes=500),
        _result("kvlab", "streaming", 0.5, quality=1.0, prefill=0.5, decode_s=0.5, cache_bytes=500),
        _result("kvpress", "ObservedAttentionPress", 0.5, quality=1.0, prefill=1.0, decode_s=1.0, cache_bytes=500),
        _result("kvlab", "h2o", 0.5, quality=1.0, prefill=3.0, decode_s=1.0, cache_bytes=500),
        _result("kvpress", "AdaKVPress(SnapKVPress)", 0.5, quality=0.5, prefill=1, decode_s=1, cache_bytes=1000),
        _result("kvlab", "head-aware", 0.25, quality=1.0, prefill=1, decode_s=1, cache_bytes=750),
        _result("kvlab", "head-aware", 0.5, quality=0.5, prefill=1, decode_s=1, cache_bytes=480),
        _result("kvlab", "head-aware", 0.75, quality=0.0, prefill=1, decode_s=1, cache_bytes=250),
    ]
    found = {t["target"].split(" ")[1]: t for t in figure.targets(_frame(results))}
    assert found["streaming"]["value"] == pytest.approx(2.0) and found["streaming"]["met"]
    assert "prefill x3.00" in found["streaming"]["detail"] and "decode x1.00" in found["streaming"]["detail"]
    assert found["h2o"]["value"] == pytest.approx(0.5) and not found["h2o"]["met"]
    memory = found["head-aware"]
    assert memory["value"] == pytest.approx(0.48) and memory["met"]  # 250 B is cheaper, but at accuracy 0
    assert "head-aware at ratio 0.5" in memory["detail"]
    text = "\n".join(figure.targets_text(figure.targets(_frame(results))))
    assert "MISSED" in text and "met" in text


def test_memory_target_for_perplexity_is_lower_is_better_and_can_be_unreachable():
    results = [_result("kvpress", "AdaKVPress", 0.5, quality=10.0, prefill=1, decode_s=1, cache_bytes=1000, task="ppl"),
               _result("kvlab", "head-aware", 0.5, quality=12.0, prefill=1, decode_s=1, cache_bytes=400, task="ppl"),
               _result("kvlab", "head-aware", 0.25, quality=11.0, prefill=1, decode_s=1, cache_bytes=600, task="ppl")]
    (t,) = figure.targets(_frame(results, task="ppl"))
    assert t["met"] is False and t["value"] is None and "no head-aware row reaches ppl 10" in t["detail"]
    results[2]["metrics"]["ppl"] = 9.0
    (t,) = figure.targets(_frame(results, task="ppl"))
    assert t["value"] == pytest.approx(0.6) and t["met"] is False


BASELINES = {"snapkv": "SnapKVPress", "pyramidkv": "PyramidKVPress", "adakv": "AdaKVPress(SnapKVPress)",
             "tova": "TOVAPress", "knorm": "KnormPress", "keydiff": "KeyDiffPress"}


def _table_methods(results) -> list[tuple[str, str]]:
    return [tuple(ln.split()[:3:2]) for ln in figure.text_table(_frame(results)).splitlines()[1:]]


def test_each_baseline_press_sits_beside_its_kvlab_method_and_adakv_beside_adakv_when_run():
    def res(impl, method, ratio=0.5):
        return _result(impl, method, ratio, quality=1.0, prefill=1, decode_s=1, cache_bytes=100)

    results = [res("kvpress", "none", 0.0), *(res("kvpress", p) for p in BASELINES.values()),
               *(res("kvlab", m) for m in BASELINES), res("kvlab", "full", 0.0)]
    pairs = [pair for m, press in BASELINES.items() for pair in (("0.5", m), ("0.5", press))]
    assert _table_methods(results) == [("0", "full"), ("0", "none"), *pairs]
    assert [figure.analogue("AdaKVPress(SnapKVPress)", have) for have in ({"adakv", "head-aware"}, {"head-aware"}, ())] \
        == ["adakv", "head-aware", "adakv"]
    # a run with head-aware and no adakv: AdaKV sits beside head-aware; the memory target finds AdaKV either way
    old = [res("kvpress", "AdaKVPress(SnapKVPress)"), res("kvpress", "SnapKVPress"), res("kvlab", "head-aware"),
           res("kvlab", "snapkv")]
    assert _table_methods(old) == [("0.5", "head-aware"), ("0.5", "AdaKVPress(SnapKVPress)"), ("0.5", "snapkv"),
                                   ("0.5", "SnapKVPress")]
    both = [*results, res("kvlab", "head-aware", 0.75)]
    assert [t["target"] for t in figure.targets(_frame(both))] == [
        "kvlab head-aware at AdaKVPress(SnapKVPress)'s accuracy holds <= 1/2 of its bytes"]


def test_table_markdown_and_figure(tmp_path):
    results = [_result("kvpress", "StreamingLLMPress", r, quality=1 - r, prefill=1, decode_s=1, cache_bytes=1000 * r)
               for r in (0.25, 0.5)] + [_result("kvlab", "streaming", 0.5, quality=0.5, prefill=1, decode_s=1,
                                                cache_bytes=500)]
    results.append({**_result("kvlab", "h2o", 0.5, quality=0, prefill=1, decode_s=1, cache_bytes=1), "error": "boom",
                    "metrics": {}})
    rows = sbs.to_rows(results, {"model": "m"}, {"task": "passkey", "samples": 1, "context_tokens": 100})
    text = figure.text_table(rows_frame(rows)).splitlines()
    assert text[0].split()[:5] == ["ratio", "implementation", "method", "kept", "accuracy"]
    assert [ln.split()[:3] for ln in text[1:]] == [["0.25", "kvpress", "StreamingLLMPress"],
                                                   ["0.5", "kvlab", "streaming"],
                                                   ["0.5", "kvpress", "StreamingLLMPress"], ["0.5", "kvlab", "h2o"]]
    assert "failed: boom" in text[-1]
    paths = figure.write_outputs(rows, tmp_path, command="kvlab compare kvpress --x 1")
    assert {p.name for p in paths} == {"implementation_comparison.png", "implementation_comparison.md"}
    assert (tmp_path / "implementation_comparison.png").stat().st_size > 10_000
    md = (tmp_path / "implementation_comparison.md").read_text()
    assert "kvlab compare kvpress --x 1" in md and "| 0.5 | kvlab | streaming |" in md and "## Targets" in md
    drawn = plot_all(rows, tmp_path / "plot", echo=lambda _m: None, only=["implementation_comparison"], dpi=30,
                     formats=("png",))  # `kvlab plot` draws it from a store's rows too
    assert list(drawn.written) == ["implementation_comparison"]


# --- the command ------------------------------------------------------------------------------------------------

@pytest.fixture
def run_cli(monkeypatch, model):
    monkeypatch.setattr(cli_main, "COMMAND_MODULES", ("kvlab.cli.compare",))
    loads = []

    def fake_load(args):
        loads.append(args.model)
        return model, CharTokenizer()

    monkeypatch.setattr(cli_compare, "load_model", fake_load)

    def run(*argv) -> int:
        try:
            return cli_main.main(["compare", "kvpress", *map(str, argv)])
        except SystemExit as exc:  # argparse's usage errors
            return int(exc.code)

    return run, loads


def test_command_end_to_end(run_cli, fake, tmp_path, capsys):
    run, _ = run_cli
    out = tmp_path / "out"
    assert run("--model", "tiny", "--ratios", "0.5", "--presses", "StreamingLLMPress,ObservedAttentionPress",
               "--methods", "streaming,h2o", "--samples", "1", "--context-tokens", "100", "--max-new-tokens", "2",
               "--threads", "1", "--out", out) == 0
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert sorted((r["config"]["implementation"], r["config"]["method"]) for r in rows) == [
        ("kvlab", "h2o"), ("kvlab", "streaming"), ("kvpress", "ObservedAttentionPress"),
        ("kvpress", "StreamingLLMPress")]
    printed = capsys.readouterr().out
    assert "kvlab streaming at least 1.1x kvpress StreamingLLMPress (ratio 0.5)" in printed
    assert "kvlab h2o at least 1.1x kvpress ObservedAttentionPress" in printed
    assert (out / "implementation_comparison.png").is_file()
    md = (out / "implementation_comparison.md").read_text()
    assert "kvlab compare kvpress --model tiny --task passkey --ratios 0.5" in md and "--threads 1" in md
    assert json.loads(fake.request.read_text())["threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0.5,1.0"], "ratio must be in [0, 1)"),
    (["--ratios", "half"], "--ratios 'half' must be float values"),
    (["--methods", "streaming,h20"], "did you mean 'h2o'"),
    (["--methods", "head-aware"], "needs a head profile: give --profile"),
    (["--methods", "head-aware", "--profile", "/no/such.json"], "head profile '/no/such.json' not found"),
    (["--samples", "0"], "samples must be at least 1"),
    (["--task", "needle"], "invalid choice: 'needle'"),
    (["--presses", "Unknown"], "kvpress: unknown press 'Unknown'; kvpress 9.9 has: none, KnormPress"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_cli, fake, tmp_path, capsys, argv, message):
    run, _ = run_cli
    out = tmp_path / "out"
    assert run("--samples", "1", "--context-tokens", "100", *argv, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    errors = [ln for ln in err if "error" in ln]
    assert len(errors) == 1 and errors == err[-1:] and message in errors[0], err
    assert not out.exists()


def test_missing_kvpress_env_names_the_make_target_before_loading(run_cli, tmp_path, monkeypatch, capsys):
    run, loads = run_cli
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(tmp_path / "nowhere"))
    assert run("--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "run `make kvpress-env`" in err and len(err.splitlines()) == 1 and loads == []


def test_haq_is_skipped_with_a_message_when_kvlab_lacks_it(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("kvlab.methods"), "names", lambda: ["full", "h2o", "streaming"])
    said = []
    assert sbs.available_methods(["streaming", "haq"], said.append) == ["streaming"]
    assert said and "skipping kvlab method 'haq'" in said[0]


def test_a_profile_of_another_model_fails_before_anything_runs(model, fake, tmp_path, tiny_qwen2):
    profile = round_robin_profile(tiny_qwen2, tmp_path)
    cmp = sbs.Comparison(ratios=(0.5,), presses=("StreamingLLMPress",), methods=("head-aware",), profile=profile,
                         samples=1, context_tokens=100)
    with pytest.raises(KvlabError, match="head profile was made for 'tiny'"):
        sbs.run_comparison(model, CharTokenizer(), cmp, model_name="tiny", echo=lambda _: None)
    assert not fake.request.exists()  # the worker never ran


# --- the real thing ---------------------------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.skipif(not (KVPRESS_VENV / "bin" / "python").exists(), reason="no .kvpress-venv: run `make kvpress-env`")
def test_real_comparison_on_smollm2(smollm2, monkeypatch):
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(KVPRESS_VENV))
    model, tok = smollm2
    cmp = sbs.Comparison(ratios=(0.5,), presses=("StreamingLLMPress",), methods=("streaming",), samples=1,
                         context_tokens=256, max_new_tokens=12, timeout_s=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = sbs.run_comparison(model, tok, cmp, model_name="smollm2-135m", echo=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    press, mine = (r["metrics"] for r in rows)
    assert mine["kept_tokens"] == press["kept_tokens"] == rows[0]["config"]["kept_tokens"]
    cfg = model.config  # both hold the kept tokens, dense float32; kvlab also the exact keys of its 4 moved sinks
    sinks = 4 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert mine["cache_bytes"] == press["cache_bytes"] + sinks
    for m in (press, mine):
        assert m["prefill_s"] > 0 and m["decode_tok_s"] > 0 and m["peak_rss_bytes"] > 100 * 2**20
        assert not math.isnan(m["accuracy"])
    assert figure.targets(rows_frame(rows))[0]["value"] > 0
