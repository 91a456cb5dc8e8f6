"""A fake kvpress environment for the comparison tests: a venv whose python is this one, running
``FAKE_WORKER`` (the worker protocol with canned records: 8 bytes per kept token, presses named
``Broken``, ``Crash``, ``NoDone``, ``Unknown`` misbehave as their names say)."""

from __future__ import annotations

import sys
import textwrap
import types

from kvlab.compare import kvpress_driver as driver

FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    req = json.load(sys.stdin)
    if os.environ.get("FAKE_REQUEST_OUT"):
        with open(os.environ["FAKE_REQUEST_OUT"], "w") as fh:
            json.dump(req, fh)
    presses = req["presses"]
    if "Unknown" in presses:
        print("Some warning from a library", file=sys.stderr)
        print("kvpress-worker: unknown press 'Unknown'; kvpress 9.9 has: none, KnormPress", file=sys.stderr)
        sys.exit(2)
    if "Sleep" in presses:
        time.sleep(60)
    if "Crash" in presses:
        print("Traceback (most recent call last):\\nRuntimeError: boom", file=sys.stderr)
        sys.exit(1)
    def out(record):
        print(json.dumps(record), flush=True)
    out({"type": "hello", "protocol": int(os.environ.get("FAKE_PROTOCOL", "1")), "kvpress": "9.9",
         "transformers": "5.2.0"})
    print("a stray print from a library", flush=True)
    for press in presses:
        for r in ([0.0] if press == "none" else req["ratios"]):
            if press == "Broken":
                out({"type": "error", "press": press, "ratio": r, "error": "AssertionError: eager mode not supported"})
                continue
            for i, s in enumerate(req["samples"]):
                n = len(s["context_ids"]); kept = int(n * (1 - r))
                rec = {"type": "result", "press": press, "ratio": r, "sample": i, "attn_implementation": "sdpa",
                       "context_tokens": n, "kept_tokens": kept, "held_tokens": n if press == "AdaKVPress" else kept,
                       "cache_bytes": 8 * (n if press == "AdaKVPress" else kept), "effective_cache_bytes": 8 * kept,
                       "prefill_s": 0.5 * (i + 1), "peak_rss_bytes": 1000 * (i + 1)}
                if req["task"] == "qa":
                    rec.update(question_s=0.1, decode_s=1.0, decode_steps=4 * (i + 1), contains=(i % 2 == 0),
                               exact_match=False, generated_text="x")
                else:
                    m = len(s["continuation_ids"])
                    rec.update(scored_tokens=m, nll_sum=float(m * (i + 1)), score_s=0.1)
                out(rec)
    if "NoDone" not in presses:
        out({"type": "done", "runtime_s": 0.1})
""")


def install(tmp_path, monkeypatch) -> types.SimpleNamespace:
    """Point kvlab at a fake kvpress venv under ``tmp_path``; returns its paths (``venv``, ``script``,
    ``model_dir``: an empty model folder, ``request``: where the worker writes the request it got)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(driver, "WORKER", script)
    monkeypatch.setenv("KVLAB_KVPRESS_VENV", str(venv))
    monkeypatch.setenv("FAKE_REQUEST_OUT", str(tmp_path / "request.json"))
    model_dir = tmp_path / "fake_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    return types.SimpleNamespace(venv=venv, script=script, model_dir=model_dir, request=tmp_path / "request.json")
