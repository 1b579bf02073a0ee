"""``qwenlm train RECIPE.yaml [--section.key VALUE ...]``: run a training recipe."""

from __future__ import annotations

import argparse

FLAGS = {"--resume", "--force-resume", "--check-data"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm train",
        description=(
            "Train with a recipe (YAML). Any recipe field can be overridden: "
            "--optim.lr 1e-4 --train.steps 200 --out runs/try2. Under torchrun "
            "(torchrun --nproc-per-node 2 -m qwenlm train RECIPE) every process trains."
        ),
    )
    p.add_argument("recipe", help="recipe file, e.g. recipes/identity-lora.yaml")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest valid checkpoint in the recipe's out folder",
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even from a checkpoint trained on other data or another recipe",
    )
    p.add_argument(
        "--check-data",
        action="store_true",
        help="read, check and tokenize the data, report it, and stop",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="--section.key VALUE",
        help="recipe overrides, e.g. --lora.r 16 --data.train '[a.jsonl, b.jsonl]'",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(argv or [])
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    # Overrides are free-form (--any.key value), so only the recipe and the flags are
    # parsed here; the rest goes to load_recipe, which checks every key and value.
    path, rest = argv[0], argv[1:]
    flags = {a for a in rest if a in FLAGS}
    overrides = [a for a in rest if a not in FLAGS]
    if any(a in ("-h", "--help") for a in rest):
        build_parser().print_help()
        return 0

    from qwenlm.train import load_recipe, train

    recipe = load_recipe(path, overrides=overrides)
    result = train(
        recipe,
        resume="--resume" in flags,
        force_resume="--force-resume" in flags,
        check_data="--check-data" in flags,
    )
    return 130 if result.interrupted else 0
