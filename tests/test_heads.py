"""Head profiling: pure scores on hand-built attention, probes, the profile on a tiny model, files, CLI."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from kvlab.errors import KvlabError
from kvlab.heads import (HeadProfile, ProfileSettings, classify, group_query_heads, induction_score, locality_score,
                         plot_profile, profile_heads, retrieval_hits)
from kvlab.heads import probes

TINY = dict(retrieval_samples=2, context_len=96, needle_words=3, induction_samples=1, induction_len=16,
            locality_samples=1, locality_len=96, window=16)


class ByteTokenizer:
    """Bytes are tokens (vocab 256); id 1 doubles as BOS, added like a Hugging Face tokenizer does."""

    bos_token_id = 1
    all_special_ids = [1]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + list(text.encode())

    def __len__(self) -> int:
        return 256


def _uniform(h: int, query_pos: torch.Tensor, t: int) -> torch.Tensor:
    """(h, Q, t) causal uniform attention."""
    mask = torch.arange(t).unsqueeze(0) <= query_pos.unsqueeze(1)            # (Q, t)
    return (mask / mask.sum(-1, keepdim=True)).float().expand(h, -1, -1).clone()


# -- pure scores -----------------------------------------------------------------------------------
def test_induction_score_finds_the_induction_pattern():
    period, t = 10, 21  # [bos] + r (10) + r (10)
    q = torch.arange(11, 21)
    attn = _uniform(3, q, t)
    attn[0] = 0.0
    attn[0, torch.arange(10), q - period + 1] = 1.0                         # head 0: perfect induction
    attn[2] = 0.0
    attn[2, torch.arange(10), q - period] = 1.0                             # head 2: attends the same token
    score = induction_score(attn, q, period)
    assert score[0] == pytest.approx(1.0)
    assert score[1] == pytest.approx((1 / (q + 1).float()).mean().item())  # uniform: chance level
    assert score[2] == pytest.approx(0.0)


def test_retrieval_hits_need_the_argmax_on_the_copied_token():
    q, target = torch.tensor([30, 31, 32]), torch.tensor([5, 6, 7])
    attn = _uniform(2, q, 33)
    attn[0, torch.arange(3), target] += 0.5                                 # head 0 copies every step
    attn[1, 0, 5] += 0.5
    attn[1, 1, 20] += 0.5                                                   # head 1: once right, then elsewhere
    attn[1, 2, 6] += 0.5                                                    # (a needle token, but not the copied one)
    hits = retrieval_hits(attn, target)
    assert hits.tolist() == [[True, True, True], [True, False, False]]


def test_locality_score_counts_sinks_and_window_only():
    q = torch.tensor([40, 50])
    attn = torch.zeros(3, 2, 51)
    attn[0, :, 0] = 1.0                                                     # sink
    attn[1, torch.arange(2), q - 3] = 1.0                                   # inside the window of 8
    attn[2, :, 20] = 1.0                                                    # far away
    assert locality_score(attn, q, sinks=4, window=8).tolist() == [1.0, 1.0, 0.0]
    uniform = locality_score(_uniform(1, q, 51), q, sinks=4, window=8)
    assert uniform.item() == pytest.approx(((12 / 41) + (12 / 51)) / 2)


def test_scores_reject_bad_shapes():
    with pytest.raises(KvlabError):
        induction_score(torch.zeros(2, 3, 10), torch.tensor([8, 9]), 4)
    with pytest.raises(KvlabError):
        locality_score(torch.zeros(2, 2, 10), torch.tensor([8, 12]), 4, 2)
    with pytest.raises(KvlabError):
        group_query_heads(torch.zeros(3, 9), 2, "max")


def test_group_query_heads_follows_repeat_kv_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.0, 0.7]])     # (layers, Hq=4)
    assert torch.equal(group_query_heads(scores, 2, "max"), torch.tensor([[0.9, 0.3], [0.5, 0.7]]))
    assert torch.equal(group_query_heads(scores, 2, "min"), torch.tensor([[0.1, 0.2], [0.4, 0.0]]))


def test_classify_fills_quotas_in_order_with_floors():
    r = torch.tensor([[0.9, 0.0, 0.0, 0.5], [0.0, 0.0, 0.2, 0.0]])
    i = torch.tensor([[0.9, 0.8, 0.01, 0.0], [0.3, 0.0, 0.0, 0.02]])
    got = classify(r, i, retrieval_quota=0.25, induction_quota=0.25)
    # 2 retrieval (0.9, 0.5), then 2 induction among the rest (0.8, 0.3); head (0,0) stays retrieval.
    assert got == [["retrieval", "induction", "local", "retrieval"], ["induction", "local", "local", "local"]]
    floored = classify(r, i, retrieval_quota=0.25, induction_quota=0.25, min_retrieval=0.6, min_induction=0.5)
    assert sum(row.count("retrieval") for row in floored) == 1
    assert sum(row.count("induction") for row in floored) == 1
    ties = classify(torch.zeros(2, 2), torch.zeros(2, 2), retrieval_quota=0.5, induction_quota=0.0, min_retrieval=-1)
    assert ties == [["retrieval", "retrieval"], ["local", "local"]]            # ties: lower index first


# -- probes ----------------------------------------------------------------------------------------
def test_needle_probe_points_at_the_needle():
    tok = ByteTokenizer()
    probe = probes.needle_probe(tok, probes.haystack_text(), random.Random(0), context_len=200, depth=0.5,
                                needle_words=4)
    ids = probe.input_ids[0]
    assert probe.target_ids is not None and probe.target_pos is not None
    assert torch.equal(ids[probe.target_pos], probe.target_ids)               # the needle sits in the context
    assert torch.equal(ids[probe.query_pos + 1], probe.target_ids)            # each query outputs the next one
    assert int(probe.query_pos[-1]) == ids.numel() - 2 and int(ids[0]) == tok.bos_token_id
    needle = bytes(probe.target_ids.tolist()).decode()
    assert len(needle.split()) == 4 and all(w in probes.WORDS for w in needle.split())


def test_repeat_probe_repeats_ordinary_tokens():
    probe = probes.repeat_probe(ByteTokenizer(), random.Random(1), period=20, vocab_size=256)
    ids = probe.input_ids[0]
    assert ids.numel() == 41 and probe.query_pos.tolist() == list(range(21, 41))
    assert torch.equal(ids[probe.query_pos], ids[probe.query_pos - 20])
    assert 1 not in ids[1:].tolist()


def test_run_probe_keeps_the_rows_eager_attention_returns(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    before = model.config._attn_implementation
    probe = probes.text_probe(ByteTokenizer(), probes.haystack_text(), random.Random(2), length=48, first_query=40)
    rows, _ = probes.run_probe(model, probe, lambda a: a)                   # (layers, Hq, Q, T)
    assert model.config._attn_implementation == before                       # restored
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        full = model(probe.input_ids, output_attentions=True).attentions
    expected = torch.stack([a[0][:, probe.query_pos] for a in full])
    assert rows.shape == (2, 4, 8, 48)
    assert torch.allclose(rows, expected, atol=1e-6)


# -- the profile -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_profile(tiny_llama) -> HeadProfile:
    settings = ProfileSettings(**TINY, retrieval_quota=0.25, induction_quota=0.5, min_retrieval=-1, min_induction=-1)
    return profile_heads(copy.deepcopy(tiny_llama), ByteTokenizer(), settings, model_id="tiny-llama")


def test_profile_shapes_and_quotas(tiny_profile):
    p = tiny_profile
    assert (p.num_layers, p.num_kv_heads, p.num_attention_heads) == (2, 2, 4)
    for name in ("retrieval", "induction", "locality"):
        grid = p.score(name)
        assert grid.shape == (2, 2) and bool(((grid >= 0) & (grid <= 1)).all())
        assert len(p.query_head_scores[name]) == 2 and len(p.query_head_scores[name][0]) == 4
    assert p.counts() == {"retrieval": 1, "induction": 2, "local": 1}
    assert p.class_mask("induction").sum() == 2
    assert p.settings["seed"] == 0 and p.versions["torch"] == torch.__version__
    assert 0.0 <= p.copy_accuracy <= 1.0


def test_profile_is_deterministic_and_seeded(tiny_llama, tiny_profile):
    settings = ProfileSettings(**TINY, retrieval_quota=0.25, induction_quota=0.5, min_retrieval=-1, min_induction=-1)
    again = profile_heads(copy.deepcopy(tiny_llama), ByteTokenizer(), settings, model_id="tiny-llama")
    assert again.dumps() == tiny_profile.dumps()
    other = profile_heads(copy.deepcopy(tiny_llama), ByteTokenizer(),
                          ProfileSettings(**{**TINY, "seed": 1}), model_id="tiny-llama")
    assert other.scores["locality"] != tiny_profile.scores["locality"]


def test_profile_runs_on_qwen2_and_gemma3(tiny_qwen2, tiny_gemma3):
    for model in (tiny_qwen2, tiny_gemma3):
        p = profile_heads(copy.deepcopy(model), ByteTokenizer(), ProfileSettings(**TINY))
        assert len(p.classes) == model.config.num_hidden_layers and p.num_kv_heads == 2
    # Gemma3's sliding layers (window 8 < 16) are perfectly local.
    assert p.scores["locality"][0] == [1.0, 1.0]


def test_save_load_round_trip(tmp_path, tiny_profile):
    path = tiny_profile.save(tmp_path / "p.json")
    loaded = HeadProfile.load(path)
    assert loaded == tiny_profile and loaded.dumps() == path.read_text()
    data = json.loads(path.read_text())
    assert list(data) == sorted(data) and "created" not in data


@pytest.mark.parametrize("content,match", [(None, "not found"), ("{", "cannot read"), ('{"schema": 9}', "not a kvlab"),
                                           ('{"schema": 1, "model": "x"}', "incomplete")])
def test_load_rejects_bad_files(tmp_path, content, match):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KvlabError, match=match):
        HeadProfile.load(path)


def test_load_rejects_malformed_fields(tmp_path, tiny_profile):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**tiny_profile.to_dict(), "scores": 3}))
    with pytest.raises(KvlabError, match="malformed"):
        HeadProfile.load(path)


def test_probe_longer_than_the_model_is_an_error(tiny_llama):
    with pytest.raises(KvlabError, match="1024 positions"):
        profile_heads(copy.deepcopy(tiny_llama), ByteTokenizer(), ProfileSettings(**{**TINY, "context_len": 1100}))


def test_profile_rejects_inconsistent_grids(tiny_profile):
    data = tiny_profile.to_dict()
    with pytest.raises(KvlabError, match="grid"):
        HeadProfile(**{**data, "classes": [["local", "local"]]})
    with pytest.raises(KvlabError, match="unknown classes"):
        HeadProfile(**{**data, "classes": [["local", "echo"], ["local", "local"]]})


def test_check_matches(tiny_llama, tiny_qwen2, tiny_gemma3, tiny_profile):
    tiny_profile.check_matches(tiny_llama)
    tiny_profile.check_matches(copy.deepcopy(tiny_llama).to(torch.bfloat16))   # same weights, other dtype
    retrained = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in retrained.parameters():
            p.mul_(1.05)
    with pytest.raises(KvlabError, match="was made for 'tiny-llama'"):
        tiny_profile.check_matches(retrained)
    with pytest.raises(KvlabError, match="was made for"):
        tiny_profile.check_matches(tiny_qwen2)                                  # same shape, other weights
    with pytest.raises(KvlabError, match="4 x 2"):
        tiny_profile.check_matches(tiny_gemma3)                                 # 4 layers


def test_settings_validation():
    with pytest.raises(KvlabError, match="locality_len"):
        ProfileSettings(window=200)
    with pytest.raises(KvlabError, match="quota"):
        ProfileSettings(retrieval_quota=0.7, induction_quota=0.5)
    with pytest.raises(KvlabError, match="context_len"):
        ProfileSettings(context_len=0)


def test_plot_writes_a_png(tmp_path, tiny_profile):
    path = tmp_path / "heads.png"
    plot_profile(tiny_profile, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["heads.png"]


# -- command line ----------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    from kvlab.cli import heads
    from kvlab.cli.main import _Parser

    parser = _Parser(prog="kvlab")
    heads.register(parser.add_subparsers(dest="command", parser_class=_Parser))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KvlabError as exc:
        print(f"kvlab: error: {exc}")
        return 2


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_llama):
    """The tiny Llama saved with a byte-level tokenizer, loadable by kvlab.models.load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    tiny_llama.save_pretrained(folder)
    return folder


def _tiny_flags() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()] + ["--quiet"]


def test_cli_profile_show_plot(tmp_path, tiny_folder, capsys):
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    assert _cli(["heads", "profile", "--model", str(tiny_folder), "--output", str(out1),
                 "--plot", str(tmp_path / "a.png"), *_tiny_flags()]) == 0
    assert _cli(["heads", "profile", "--model", str(tiny_folder), "--output", str(out2), *_tiny_flags()]) == 0
    assert out1.read_bytes() == out2.read_bytes()                               # byte-identical runs
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert _cli(["heads", "show", str(out1)]) == 0
    assert "KV heads" in capsys.readouterr().out
    assert _cli(["heads", "show", str(out1), "--method", "head-aware:budget=40,recent=4"]) == 0
    shown = capsys.readouterr().out.splitlines()
    rows = [line.split()[1:] for line in shown if line.split()[0].isdigit()]
    kept = [int(cell[1:]) for row in rows for cell in row]
    assert len(rows) == 2 and sum(kept) == int(shown[-1].split()[-3])  # "mean M tokens per KV head, S in all"
    assert 40 * len(kept) - len(kept) < sum(kept) <= 40 * len(kept)
    assert _cli(["heads", "show", str(out1), "--method", "h2o:budget=40"]) == 2
    assert "must be head-aware or haq" in capsys.readouterr().out
    assert _cli(["heads", "plot", str(out1), "--output", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").exists()


@pytest.mark.parametrize("extra,match", [(["--window", "200"], "locality_len"),
                                         (["--retrieval-quota", "1.5"], "quota"),
                                         (["--plot", "x.gif"], "must end with")])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_folder, capsys, extra, match):
    out = tmp_path / "p.json"
    code = _cli(["heads", "profile", "--model", str(tiny_folder), "--output", str(out), *extra])
    msg = capsys.readouterr().out
    assert code == 2 and match in msg and msg.count("\n") == 1
    assert not out.exists()


def test_cli_unknown_model_is_an_error(tmp_path, capsys):
    code = _cli(["heads", "profile", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "p.json")])
    assert code == 2 and "no such model" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


# -- real model ------------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_has_retrieval_heads_in_upper_layers(smollm2):
    model, tokenizer = smollm2
    settings = ProfileSettings(retrieval_samples=2, context_len=384, induction_samples=1, locality_samples=1,
                               locality_len=384)
    p = profile_heads(model, tokenizer, settings)
    retrieval = p.score("retrieval")
    assert retrieval.max() > 0.8                                                # a real copying head exists
    assert retrieval[:10].max() < 0.1                                           # not in the first layers
    counts = p.counts()
    assert counts["retrieval"] >= 5 and counts["local"] >= 45
    assert p.score("locality")[10:].mean() > p.score("locality")[:10].mean()
    p.check_matches(model)
