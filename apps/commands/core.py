"""Evaluations of the core model library: `mmcore eval toy CKPT`."""

from __future__ import annotations

from apps.commands import add_device_argument


def register_eval(subparsers) -> None:
    p = subparsers.add_parser("toy", help="accuracy of a toy-recipe checkpoint's descriptions on held-out samples")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory written by `mmcore train toy`")
    p.add_argument("--samples", type=int, default=96, help="held-out samples (default 96)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_argument(p)
    p.set_defaults(handler=run_toy_eval)


def run_toy_eval(args) -> int:
    from pathlib import Path

    import mmcore
    from apps.commands.eval import report_metrics
    from mmcore.device import resolve_device
    from mmcore.errors import InputError
    from mmcore.recipes import evaluate_descriptions

    if args.samples < 1:
        raise InputError(f"--samples: expected a positive integer, found {args.samples}")
    if not Path(args.checkpoint).is_dir():
        raise InputError(f"{args.checkpoint}: checkpoint directory not found")
    try:
        model = mmcore.load(args.checkpoint, device=resolve_device(args.device))
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if model.card.get("recipe") != "toy" or model.tokenizer is None:
        raise InputError(f"{args.checkpoint}: expected a checkpoint of the toy recipe with a tokenizer, found recipe "
                         f"{model.card.get('recipe')!r}")
    metrics = evaluate_descriptions(model, n=args.samples)
    report_metrics({"checkpoint": str(args.checkpoint), **metrics}, args.json, "toy recipe: held-out descriptions")
    return 0
