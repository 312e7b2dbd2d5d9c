"""`mmcore finetune wafer --lora --data DIR`: teach the wafer model a new pattern class from a few labelled maps."""

from __future__ import annotations

import argparse

from apps.commands import add_device_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="few-shot adaptation of a shipped model (LoRA, base frozen)")
    sub = p.add_subparsers(dest="finetune_target", metavar="MODEL", parser_class=type(p))
    sub.required = True
    w = sub.add_parser("wafer", help="learn new wafer pattern classes from ~50 labelled maps")
    w.add_argument("--lora", action="store_true", required=True,
                   help="adapt with LoRA on the core, base weights frozen (the only mode)")
    w.add_argument("--data", required=True, metavar="DIR",
                   help="labelled maps: a folder with labels.csv (file,labels), e.g. from `mmcore wafer synth`")
    w.add_argument("--checkpoint", default=None, help="base wafer checkpoint (default: the shipped demo)")
    w.add_argument("--out", default=None, help="adapter folder to write (default ./wafer-adapter)")
    w.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    w.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    w.add_argument("--seed", type=int, default=0)
    add_device_argument(w)
    w.set_defaults(handler=_finetune_wafer)


def _finetune_wafer(args: argparse.Namespace) -> int:
    from apps.commands.wafer import model_id_for
    from mmcore.device import resolve_device
    from mmcore.errors import InputError
    from pipelines.wafer.dataset import load_labelled
    from pipelines.wafer.finetune import finetune_new_classes, save_fewshot
    from pipelines.wafer.scoring import WaferScorer

    if args.steps < 1 or args.rank < 1:
        raise InputError(f"--steps/--rank: expected positive integers, found {args.steps}/{args.rank}")
    wafers = load_labelled(args.data)
    scorer = WaferScorer(args.checkpoint, device=str(resolve_device(args.device)))
    head, classes = finetune_new_classes(scorer, wafers, steps=args.steps, rank=args.rank, seed=args.seed)
    out = save_fewshot(scorer, head, classes, args.out or "wafer-adapter", model_id_for(args.checkpoint))
    positives = sum(any(c in (w.labels or ()) for c in classes) for w in wafers)
    print(f"learned {', '.join(classes)} from {positives} maps ({len(wafers)} labelled in all); adapter in {out}; "
          f"score with `mmcore wafer score ... --adapter {out}`")
    return 0
