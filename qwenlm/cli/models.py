"""``qwenlm pull`` and ``qwenlm list``."""

from __future__ import annotations

import argparse
import json

from qwenlm import registry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm pull", description="Download and verify registry models."
    )
    p.add_argument(
        "names",
        nargs="*",
        default=[registry.DEFAULT_MODEL],
        metavar="NAME",
        help=f"registry model(s) to pull (default: {registry.DEFAULT_MODEL})",
    )
    p.add_argument(
        "--cache-dir",
        help="model cache folder (default: $QWENLM_CACHE, $XDG_CACHE_HOME/qwenlm, ~/.cache/qwenlm)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash a cached file instead of trusting its manifest",
    )
    p.add_argument(
        "--force", action="store_true", help="fetch again even if the cached file is good"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.names:
        path = registry.pull(
            name,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            verify=args.verify,
            force=args.force,
        )
        print(path)
    return 0


def build_list_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm list", description="List registry models and which are pulled."
    )
    p.add_argument("--cache-dir", help="model cache folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def list_main(argv: list[str] | None = None) -> int:
    args = build_list_parser().parse_args(argv)
    rows = registry.list_models(cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) + (2 if any(r["default"] for r in rows) else 0)
    print(f"{'NAME':<{width}}  {'SIZE':>8}  {'PULLED':<6}  DESCRIPTION")
    for r in rows:
        name = r["name"] + (" *" if r["default"] else "")
        pulled = "yes" if r["pulled"] else "no"
        print(f"{name:<{width}}  {r['size'] / 1e9:>6.2f}GB  {pulled:<6}  {r['description']}")
    print(f"\n* default model. Cache: {registry.cache_dir(args.cache_dir)}")
    return 0
