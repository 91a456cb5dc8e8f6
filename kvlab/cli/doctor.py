"""``kvlab doctor``: check Python, torch, transformers, kvpress, disk, the model cache and the hub."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that this machine is ready (exit 1 when something is wrong)",
                       description="Check Python, torch and CUDA, transformers, the kvpress venv, free disk, the model "
                                   "cache (with checksums) and the Hugging Face hub; print a fix for each problem.")
    p.add_argument("--quick", action="store_true", help="skip the checksums of cached models")
    p.add_argument("--cache-dir", help="model cache (default: $KVLAB_CACHE or ~/.cache/kvlab)")
    p.add_argument("--hub-timeout", type=float, default=3.0, help="seconds to wait for the hub (default: 3)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from kvlab.doctor import FAIL, WARN, run_checks

    checks = run_checks(verify=not args.quick, cache_dir=args.cache_dir, hub_timeout=args.hub_timeout)
    for check in checks:
        print(check)
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    print(f"\n{failed} problem(s), {warned} warning(s)" if failed or warned else "\neverything looks fine")
    return 1 if failed else 0
