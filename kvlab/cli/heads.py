"""``kvlab heads profile | show | plot``: profile attention heads as retrieval / induction / local."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvlab.cli.common import add_progress_arg
from kvlab.errors import KvlabError

_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _check_output(path: str, what: str, suffixes: tuple[str, ...] | None = None) -> None:
    p = Path(path)
    if p.is_dir():
        raise KvlabError(f"{what} {p} is a folder; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise KvlabError(f"{what} {p} must end with one of {', '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise KvlabError(f"cannot write {what} {p}: {parent} is not a folder")


def _settings(args: argparse.Namespace):  # -> ProfileSettings
    from kvlab.heads import ProfileSettings

    fields = ProfileSettings.__dataclass_fields__
    return ProfileSettings(**{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})


def _summary(profile) -> str:  # profile: HeadProfile
    counts = profile.counts()
    return ", ".join(f"{counts[c]} {c}" for c in counts) + f" of {profile.num_layers * profile.num_kv_heads} KV heads"


def _profile(args: argparse.Namespace) -> int:
    settings = _settings(args)                    # bad flags fail before the model is loaded
    if args.output is None and args.out is None:
        raise KvlabError("give --out DIR (writes DIR/profile.json and DIR/profile.png) or --output FILE")
    if args.out is not None:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise KvlabError(f"--out {args.out} is a file; give a folder")
        args.output = args.output or str(Path(args.out) / "profile.json")
        args.plot = args.plot or str(Path(args.out) / "profile.png")
    _check_output(args.output, "--output")
    if args.plot:
        _check_output(args.plot, "--plot", _PLOT_SUFFIXES)
    from kvlab.heads import plot_profile, profile_heads
    from kvlab.models import load

    say = (lambda _m: None) if args.no_progress else (lambda m: print(f"kvlab heads: {m}", file=sys.stderr, flush=True))
    start = time.perf_counter()
    model, tokenizer = load(args.model, device=args.device, dtype="float32", attn_implementation="eager")
    say(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    profile = profile_heads(model, tokenizer, settings, model_id=args.model, progress=say)
    elapsed = time.perf_counter() - start
    profile.save(args.output)
    if args.plot:
        plot_profile(profile, args.plot)
    print(f"{args.output}: {_summary(profile)} (profiled in {elapsed:.0f} s; "
          f"model copied the needle at {profile.copy_accuracy:.0%} of steps)")
    if args.plot:
        print(f"{args.plot}: heatmaps of the three scores and the class map")
    return 0


def _budgets(method: str, profile_path: str, profile):  # -> (classes, budgets) of every head under method
    from kvlab.methods import build, get
    from kvlab.methods.head_aware import HeadAware
    from kvlab.spec import parse_spec

    name, settings = parse_spec(method)
    if not issubclass(get(name), HeadAware):
        raise KvlabError(f"--method must be head-aware or haq (a method that reads a profile), got '{name}'")
    spec = method if "profile" in settings else method + ("," if ":" in method else ":") + f"profile={profile_path}"
    return build(spec).layout(profile)


def _show(args: argparse.Namespace) -> int:
    from kvlab.cli.common import split_methods
    from kvlab.heads import HeadProfile

    profile = HeadProfile.load(args.profile)
    methods = split_methods(args.method) if args.method else [None]
    layouts = [(m, *(_budgets(m, args.profile, profile) if m else (profile.classes, None))) for m in methods]
    print(f"{profile.model} (weights {profile.fingerprint}, {profile.dtype}): {_summary(profile)}")
    for method, classes, budgets in layouts:
        _print_layout(profile.num_kv_heads, method, classes, budgets)
    return 0


def _print_layout(num_kv_heads: int, method: str | None, classes: list[list[str]],
                  budgets: list[list[int]] | None) -> None:
    """Every head's class per layer (and the tokens ``method`` keeps in it)."""
    letters = {"retrieval": "R", "induction": "I", "local": "." if budgets is None else "L"}
    width = 2 if budgets is None else 2 + len(str(max(map(max, budgets))))
    legend = (f"R retrieval, I induction, {letters['local']} local"
              + ("" if budgets is None else f"; tokens kept under {method}"))
    print("layer  " + " ".join(f"{'h' + str(h):>{width}}" for h in range(num_kv_heads)) + f"   ({legend})")
    for layer, row in enumerate(classes):
        cells = [letters[c] + ("" if budgets is None else str(budgets[layer][h])) for h, c in enumerate(row)]
        print(f"{layer:>5}  " + " ".join(f"{cell:>{width}}" for cell in cells))
    if budgets is not None:
        flat = [b for row in budgets for b in row]
        print(f"mean {sum(flat) / len(flat):.1f} tokens per KV head, {sum(flat)} in all")


def _plot(args: argparse.Namespace) -> int:
    from kvlab.heads import HeadProfile, plot_profile

    if args.output is None and args.out is None:
        raise KvlabError("give --out DIR (writes DIR/<profile name>.png) or --output FILE")
    output = args.output or str(Path(args.out) / f"{Path(args.profile).stem}.png")
    _check_output(output, "--output", _PLOT_SUFFIXES)
    profile = HeadProfile.load(args.profile)
    plot_profile(profile, output, dpi=args.dpi)
    print(f"{output}: heatmaps of the three scores and the class map")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from kvlab.heads.profile import ProfileSettings

    d = ProfileSettings()
    parser = subparsers.add_parser("heads", help="profile attention heads (retrieval / induction / local)",
                                   description="Score every KV head of a model as retrieval (needle copying, "
                                               "Wu et al. 2024), induction (repeated random tokens) and locality "
                                               "(attention on sinks + a recent window), and classify them.")
    actions = parser.add_subparsers(dest="heads_command", metavar="ACTION", parser_class=type(parser))
    actions.required = True

    p = actions.add_parser("profile", help="profile a model and write the profile JSON")
    p.add_argument("--model", required=True, help="model alias, folder, .gguf file or hub id")
    p.add_argument("--out", metavar="DIR", help="folder for profile.json and its heatmaps profile.png")
    p.add_argument("--output", metavar="FILE", help="profile JSON to write (instead of, or besides, --out)")
    p.add_argument("--plot", default=None, help="also write heatmaps to this .png/.pdf/.svg")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of every probe (default: {d.seed})")
    add_progress_arg(p, quiet_alias=True)
    g = p.add_argument_group("probes")
    g.add_argument("--retrieval-samples", type=int, help=f"needle prompts (default: {d.retrieval_samples})")
    g.add_argument("--context-len", type=int, help=f"haystack tokens per needle prompt (default: {d.context_len})")
    g.add_argument("--needle-words", type=int, help=f"random words in the needle (default: {d.needle_words})")
    g.add_argument("--induction-samples", type=int, help=f"repeated sequences (default: {d.induction_samples})")
    g.add_argument("--induction-len", type=int, help=f"length of the repeated sequence (default: {d.induction_len})")
    g.add_argument("--locality-samples", type=int, help=f"natural-text samples (default: {d.locality_samples})")
    g.add_argument("--locality-len", type=int, help=f"tokens per text sample (default: {d.locality_len})")
    g.add_argument("--window", type=int, help=f"recent keys that count as local (default: {d.window})")
    g.add_argument("--sinks", type=int, help=f"first keys that count as local (default: {d.sinks})")
    g = p.add_argument_group("classes")
    g.add_argument("--retrieval-quota", type=float,
                   help=f"fraction of KV heads classed retrieval (default: {d.retrieval_quota})")
    g.add_argument("--induction-quota", type=float,
                   help=f"fraction of KV heads classed induction, among the rest (default: {d.induction_quota})")
    g.add_argument("--min-retrieval", type=float, help=f"minimum retrieval score (default: {d.min_retrieval})")
    g.add_argument("--min-induction", type=float, help=f"minimum induction score (default: {d.min_induction})")
    p.set_defaults(func=_profile)

    p = actions.add_parser("show", help="print a profile's classes per layer (and the budgets a method gives them)")
    p.add_argument("profile", help="profile JSON")
    p.add_argument("--method", "--methods", dest="method", action="append", metavar="SPEC",
                   help="a head-aware or haq spec, e.g. 'head-aware:budget=512': print every head's tokens under it "
                        "(repeat the flag, or separate with ';', for several)")
    p.set_defaults(func=_show)

    p = actions.add_parser("plot", help="draw a profile's heatmaps")
    p.add_argument("profile", help="profile JSON")
    p.add_argument("--out", metavar="DIR", help="folder for the figure (named after the profile, .png)")
    p.add_argument("--output", metavar="FILE", help="image to write (.png, .pdf or .svg)")
    p.add_argument("--dpi", type=int, default=150, help="resolution (default: 150)")
    p.set_defaults(func=_plot)
