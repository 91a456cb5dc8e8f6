"""One CLI convention for every command (README, "CLI conventions"), checked on every subcommand's parser:

* a command that writes results takes ``--out DIR``;
* a command that runs methods takes ``--method`` (alias ``--methods``), repeatable or one ``;``-separated list;
* a command that shows progress switches it off with ``--no-progress`` (``--quiet`` only as its alias).

A new command must be classified below, so that it is checked too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvlab.cli.main import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
WRITES = {"demo", "ppl", "needle", "memory", "latency", "translate", "ruler", "run", "report", "plot",
          "compare kvpress", "heads profile", "heads plot"}
RUNS_METHODS = {"demo", "ppl", "generate", "needle", "memory", "latency", "translate", "ruler", "compare kvpress",
                "heads show"}
PROGRESS = {"demo", "ppl", "needle", "memory", "latency", "translate", "ruler", "run", "compare kvpress",
            "heads profile", "models pull"}
NEITHER = {"models list", "models verify", "doctor"}  # write nothing, run no method, show no progress
QUIET_NOT_PROGRESS = {"report"}  # its --quiet leaves out the printed tables (it has no progress to hide)


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand, by its words (``"heads profile"``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {" ".join(path): parser}
    return {name: leaf for word, child in subs[0].choices.items()
            for name, leaf in leaves(child, (*path, word)).items()}


COMMANDS = leaves(build_parser())


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_command_is_classified():
    known = WRITES | RUNS_METHODS | PROGRESS | NEITHER
    assert set(COMMANDS) - known == set(), "classify the new command(s) above"
    assert known - set(COMMANDS) == set(), "a classified command no longer exists"


@pytest.mark.parametrize("name", sorted(WRITES))
def test_commands_that_write_results_take_out_dir(name):
    out = option(COMMANDS[name], "--out")
    assert out is not None and out.dest == "out" and out.nargs is None, f"{name}: no --out DIR"
    assert out.metavar == "DIR" or "folder" in (out.help or ""), f"{name}: --out must be a folder"


@pytest.mark.parametrize("name", ["ppl", "heads profile"])
def test_ppl_and_heads_profile_keep_output_file(name):
    assert option(COMMANDS[name], "--output") is not None


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_method_flags_are_repeatable_with_one_alias(name):
    method, methods = option(COMMANDS[name], "--method"), option(COMMANDS[name], "--methods")
    if name in RUNS_METHODS:
        assert method is not None, f"{name}: no --method"
    if method is None and methods is None:
        return
    assert method is methods, f"{name}: --method and --methods must be one option"
    assert isinstance(method, argparse._AppendAction), f"{name}: --method must be repeatable"


@pytest.mark.parametrize("name", sorted(RUNS_METHODS))
def test_repeated_flags_and_a_semicolon_list_are_the_same_methods(name):
    from kvlab.cli.common import split_methods

    words = name.split()
    extra = {"generate": ["--prompt", "x"], "heads show": ["p.json"]}.get(name, [])
    one = build_parser().parse_args([*words, *extra, "--method", "full;streaming:sinks=4,window=60"])
    two = build_parser().parse_args([*words, *extra, "--method", "full", "--methods", "streaming:sinks=4,window=60"])
    dest = option(COMMANDS[name], "--method").dest
    assert split_methods(getattr(one, dest)) == split_methods(getattr(two, dest)) == \
        ["full", "streaming:sinks=4,window=60"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_progress_is_switched_off_by_no_progress(name):
    parser = COMMANDS[name]
    flag, quiet = option(parser, "--no-progress"), option(parser, "--quiet")
    if name in PROGRESS:
        assert flag is not None and flag.dest == "no_progress", f"{name}: no --no-progress"
        assert isinstance(flag, argparse._StoreTrueAction)
    if quiet is not None and name not in QUIET_NOT_PROGRESS:
        assert quiet is flag, f"{name}: --quiet must be an alias of --no-progress"


def test_the_readme_documents_the_convention_once():
    text = README.read_text()
    assert text.count("## CLI conventions") == 1 or text.count("**CLI conventions.**") == 1
    for flag in ("--out DIR", "--method", "--no-progress", "--output FILE"):
        assert flag in text


def test_console_tables_share_one_printer(capsys):
    """Every evaluation's console table is a column list printed by one function: cells line up under their
    titles, a missing figure reads n/a, and a row's note follows its cells."""
    from kvlab.cli import tables

    def row(metrics):
        return {"config": {"method": "streaming:sinks=4,window=60", "params": {"tokens": 2048}}, "metrics": metrics}

    tables.memory([row({"kv_bytes": 2**21, "kv_bytes_peak": 2**22, "kv_bytes_full": 2**23, "mem_reduction_pct": 50.0,
                        "peak_mem_delta_bytes": 2**20}),
                   row({"kv_bytes": None, "kv_bytes_peak": None, "kv_bytes_full": 2**23, "mem_reduction_pct": None,
                        "peak_mem_delta_bytes": None, "note": "past the model's positions"})])
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["method", "tokens", "KV", "MiB", "KV", "peak", "full", "MiB", "saved", "peak", "mem+"]
    assert len(first) == len(header) and first.split()[1:] == ["2048", "2.0", "4.0", "8.0", "50.0%", "1.0"]
    assert header.index("saved") + len("saved") == first.index("50.0%") + len("50.0%")  # right-aligned under it
    assert second.split()[1:7] == ["2048", "n/a", "n/a", "8.0", "n/a", "n/a"]
    assert second.endswith("  past the model's positions")
