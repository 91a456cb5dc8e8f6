"""Streaming translation: incremental wait-k against re-running the model on the whole prefix (batch and
group positions), the two separately compressed parts, data loading, and the evaluation's mechanics."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.cache import make_cache
from kvlab.errors import KvlabError
from kvlab.evals import translate as tr
from kvlab.evals.pairs import load_pairs
from kvlab.evals.waitk import BatchStream, GroupStream, translate
from test_eval_helpers import ByteTokenizer, ChatByteTokenizer

SENTENCE = "the cat sat on a mat"
EOS = {2}


class Traced:
    """Records the logits that drive every decision of the policy."""

    def __init__(self, inner):
        self.inner, self.trace, self.reads = inner, [], []

    @property
    def peak_nbytes(self) -> int:
        return self.inner.peak_nbytes

    def read(self, ids):
        self.reads.append(list(ids))
        return self.inner.read(ids)

    def write(self, ids):
        out = self.inner.write(ids)
        self.trace.append(out.clone())
        return out

    def next_logits(self):
        out = self.inner.next_logits()
        self.trace.append(out.clone())
        return out

    def end_word(self, more_source):
        self.inner.end_word(more_source)


class RecomputeBatch:
    """No cache: the model re-reads the whole interleaved stream at every step."""

    peak_nbytes = 0

    def __init__(self, model):
        self.model, self.ids, self.logits = model, [], None

    def _feed(self, ids):
        self.ids += ids
        with torch.no_grad():
            self.logits = self.model(input_ids=torch.tensor([self.ids])).logits[0, -1]
        return self.logits

    read = write = _feed

    def next_logits(self):
        return self.logits

    def end_word(self, more_source):
        pass


class RecomputeGroup:
    """No cache: the whole stream with group positions and a 4D mask (source never sees target)."""

    peak_nbytes = 0

    def __init__(self, model, phi):
        self.model, self.phi = model, phi
        self.toks: list[tuple[int, bool, int]] = []  # (id, is_target, position), in arrival order
        self.n_src = self.n_tgt = 0
        self.logits, self.pending, self.last = None, [], None

    def read(self, ids):
        for t in ids:
            self.toks.append((t, False, self.n_src))
            self.n_src += 1

    def write(self, ids):
        for t in ids:
            self.toks.append((t, True, self.phi + self.n_tgt))
            self.n_tgt += 1
        ids_t = torch.tensor([[t for t, _, _ in self.toks]])
        pos = torch.tensor([[p for _, _, p in self.toks]])
        tgt = torch.tensor([is_t for _, is_t, _ in self.toks])
        n = len(self.toks)
        mask = torch.ones(n, n, dtype=torch.bool).tril() & ~(~tgt[:, None] & tgt[None, :])
        with torch.no_grad():
            self.logits = self.model(input_ids=ids_t, position_ids=pos, attention_mask=mask[None, None]).logits[0, -1]
        self.last, self.pending = ids[-1], []
        return self.logits

    def next_logits(self):
        return self.write(self.pending) if self.pending else self.logits

    def end_word(self, more_source):
        if more_source and not self.pending and self.last is not None:
            idx = max(i for i, (_, is_t, _) in enumerate(self.toks) if is_t)
            del self.toks[idx]
            self.n_tgt -= 1
            self.pending = [self.last]


def _run(stream, tok, k=2):
    head, tail = (tok.encode(t) for t in tr.prompt_parts(tok, "en", "fr"))
    traced = Traced(stream)
    out = translate(traced, tok, head, tr.source_words(tok, SENTENCE), tail, k, EOS, max_words=8, max_word_tokens=3)
    return out, traced


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2", "tiny_gemma3"])
def test_batch_positions_incremental_equals_recomputing_the_prefix(request, family):
    model = request.getfixturevalue(family)
    tok = ByteTokenizer()
    out, inc = _run(BatchStream(model, "full"), tok)
    ref, rec = _run(RecomputeBatch(model), tok)
    assert out.tokens == ref.tokens and out.delays == ref.delays
    assert len(set(out.delays)) > 2  # reads really interleave with writes
    assert len(inc.trace) == len(rec.trace)
    for a, b in zip(inc.trace, rec.trace):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("family, phi", [("tiny_llama", 0), ("tiny_llama", 300), ("tiny_qwen2", 7)])
def test_group_positions_incremental_equals_recomputing_with_a_group_mask(request, family, phi):
    model = request.getfixturevalue(family)
    tok = ByteTokenizer()
    out, inc = _run(GroupStream(model, "full", phi), tok)
    ref, rec = _run(RecomputeGroup(model, phi), tok)
    assert out.tokens == ref.tokens and out.delays == ref.delays
    assert len(set(out.delays)) > 2
    for a, b in zip(inc.trace, rec.trace):
        assert (a - b).abs().max().item() < 1e-4


def test_group_differs_from_batch(tiny_llama):
    tok = ByteTokenizer()
    _, batch = _run(BatchStream(tiny_llama, "full"), tok)
    _, group = _run(GroupStream(tiny_llama, "full", 0), tok)
    assert (batch.trace[0] - group.trace[0]).abs().max().item() > 1e-3


def test_lossless_h2o_in_both_parts_equals_the_full_cache(tiny_qwen2):
    tok = ByteTokenizer()
    _, full = _run(GroupStream(tiny_qwen2, "full", 5), tok)
    _, h2o = _run(GroupStream(tiny_qwen2, "h2o:budget=4096,recent=4", 5), tok)
    for a, b in zip(full.trace, h2o.trace):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("spec, budget", [("streaming:sinks=2,window=10", 12), ("h2o:budget=12,recent=3", 12)])
def test_parts_are_compressed_separately_and_the_source_ignores_the_target(tiny_llama, spec, budget):
    tok = ByteTokenizer()
    stream = GroupStream(tiny_llama, spec, 0)
    out, traced = _run(stream, tok)
    assert out.tokens
    assert all(n <= budget + len(traced.reads[-1]) for layer in stream.source.kept_tokens() for n in layer)
    assert all(n <= budget + 8 for layer in stream.cache.target.kept_tokens() for n in layer)  # + the 8-byte tail
    alone = make_cache(tiny_llama, spec)  # the same reads without any target token in between
    with torch.no_grad():
        for ids in traced.reads:
            tiny_llama(input_ids=torch.tensor([ids]), past_key_values=alone)
    for a, b in zip(stream.source.layers, alone.layers):
        assert torch.equal(a.segments[0].keys, b.segments[0].keys)


def test_group_positions_refuse_sliding_window_layers_and_quantized_parts(tiny_gemma3, tiny_llama):
    with pytest.raises(KvlabError, match="sliding-window"):
        GroupStream(tiny_gemma3, "full")
    with pytest.raises(KvlabError, match="16-bit methods only"):
        GroupStream(tiny_llama, "quant:bits=4")


def test_prompt_parts_with_and_without_chat_template():
    head, tail = tr.prompt_parts(ByteTokenizer(), "en", "fr")
    assert head.endswith("English:") and tail == "\nFrench:"
    head, tail = tr.prompt_parts(ChatByteTokenizer(), "en", "de")
    assert head.startswith("<u>Translate the following English text into German.") and tail == "</u><a>"
    assert tr.source_words(ByteTokenizer(), "a  bc") == [list(b" a"), list(b" bc")]


def test_params_validate_k_and_normalize_offline():
    with pytest.raises(KvlabError, match="k must be at least 1"):
        tr.Params(k=0)
    with pytest.raises(KvlabError, match="unknown positions"):
        tr.Params(positions="interleaved")
    offline = tr.Params(mode="offline", k=7, positions="group", phi=3)
    assert (offline.k, offline.positions, offline.phi) == (0, "batch", 0)


def test_load_pairs_files_json_and_errors(tmp_path):
    src, tgt = tmp_path / "a.en", tmp_path / "a.fr"
    src.write_text("one\n\nthree\nfour\n")
    tgt.write_text("un\ndeux\ntrois\nquatre\n")
    assert load_pairs(f"{src},{tgt}", "en", "fr") == [("one", "un"), ("three", "trois"), ("four", "quatre")]
    assert len(load_pairs(f"{src},{tgt}", "en", "fr", max_samples=2)) == 2
    tgt.write_text("un\ndeux\n")
    with pytest.raises(KvlabError, match=r"has 4 lines, .* has 2"):
        load_pairs(f"{src},{tgt}", "en", "fr")
    tgt.write_text("")
    with pytest.raises(KvlabError, match="is empty"):
        load_pairs(f"{src},{tgt}", "en", "fr")
    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps([{"en": "hello", "fr": "bonjour"}]))
    assert load_pairs(str(pairs), "en", "fr") == [("hello", "bonjour")]
    with pytest.raises(KvlabError, match="no 'de' key"):
        load_pairs(str(pairs), "en", "de")
    pairs.write_text(json.dumps([{"en": " ", "fr": "x"}]))
    with pytest.raises(KvlabError, match="no sentence pairs"):
        load_pairs(str(pairs), "en", "fr")


def test_evaluate_on_a_tiny_model(tiny_llama, tmp_path):
    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps([{"en": "a b c d e", "fr": "le petit chat"}, {"en": "good morning", "fr": "bonjour"}]))
    tok = ByteTokenizer()
    rows = {}
    for mode, pos, k in (("offline", "batch", 1), ("waitk", "batch", 1), ("waitk", "group", 1), ("waitk", "group", 4)):
        params = tr.Params(mode=mode, positions=pos, k=k, data=str(pairs), max_word_tokens=1)
        rows[(mode, pos, k)] = m = tr.evaluate(tiny_llama, tok, "full", params)
        assert m["samples"] == 2 and len(m["hypotheses"]) == 2 and m["bleu"] >= 0 and m["kv_bytes_peak"] > 0
    assert rows[("waitk", "group", 4)]["al"] > rows[("waitk", "group", 1)]["al"]


@pytest.mark.real
def test_qwen_translates_a_headline(qwen, shared_data):
    model, tok = qwen
    data = f"{shared_data / 'translation/newstest2014.en'},{shared_data / 'translation/newstest2014.fr'}"
    m = tr.evaluate(model, tok, "full", tr.Params(mode="offline", data=data, max_samples=1))
    assert m["bleu"] > 0 and m["chrf"] > 20, m["hypotheses"]
