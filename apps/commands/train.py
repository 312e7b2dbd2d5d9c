"""`mmcore train RECIPE`: train a registered recipe into a checkpoint directory (resumable, DDP under torchrun).

Recipes register themselves by name when their module is imported; RECIPE_MODULES lists the modules that may
provide them (a module that is not part of this build is skipped).
"""

from __future__ import annotations

import importlib
import importlib.util

from apps.commands import add_device_argument, print_json

RECIPE_MODULES = ("mmcore.recipes", "pipelines.wafer.train", "pipelines.ct.train")


def load_recipe_modules() -> list[str]:
    """Import every recipe provider that exists; returns the names imported."""
    loaded = []
    for name in RECIPE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if found:
            importlib.import_module(name)
            loaded.append(name)
    return loaded


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a registered recipe (e.g. `toy`) into a checkpoint directory",
                              description="Train a recipe. `mmcore train list` shows the registered recipes. "
                                          "Under `torchrun --nproc_per_node N` it trains with DDP.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe name, or `list`")
    p.add_argument("--out", help="output directory: checkpoint, train_state.pt, metrics.jsonl (default runs/RECIPE)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--steps", type=int, help="optimizer steps (recipe default otherwise)")
    p.add_argument("--batch-size", type=int, help="samples per process per micro-step")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--seed", type=int)
    p.add_argument("--data", help="dataset path, for recipes that read one")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="recipe-specific option")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    add_device_argument(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from mmcore.device import resolve_device
    from mmcore.errors import InputError
    from mmcore.train import RECIPES, get_recipe, run_recipe

    load_recipe_modules()
    if args.recipe == "list":
        for name, cls in sorted(RECIPES.items()):
            print(f"{name:16s} {cls.description}")
        return 0
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option: expected KEY=VALUE, found {item!r}")
        options[key.replace("-", "_")] = value
    recipe = get_recipe(args.recipe, data=args.data, **options)
    overrides = dict(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                     warmup_steps=args.warmup_steps, eval_every=args.eval_every, save_every=args.save_every,
                     seed=args.seed)
    if args.no_progress:
        overrides["progress"] = False
    try:
        summary = run_recipe(recipe, args.out or f"runs/{args.recipe}", resume=args.resume,
                             device=resolve_device(args.device), **overrides)
    except ValueError as exc:  # a TrainConfig field out of range: a user input error here
        raise InputError(str(exc)) from exc
    from mmcore.train import distributed_env

    if distributed_env()[0] == 0:
        summary = {"recipe": args.recipe, "out": args.out or f"runs/{args.recipe}", **summary}
        if args.json:
            print_json(summary)
        else:
            print(f"trained {args.recipe} to step {summary['step']} (loss {summary['loss']:.4f}); "
                  f"checkpoint in {summary['out']}")
            for key, value in summary["eval"].items():
                print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return 0
