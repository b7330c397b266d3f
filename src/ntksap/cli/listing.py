"""`ntksap list`: the registered methods (data needs, rounds, options) and models."""

from __future__ import annotations

import argparse

from ntksap.models import MODELS, defaults, list_models
from ntksap.scoring import get_method, list_methods


def add_parser(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("list", help="list the registered methods and models")
    ls.set_defaults(func=cmd_list)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def cmd_list(args: argparse.Namespace) -> int:
    """Methods (data needs, rounds, options, summary) and models (default input, classes)."""
    names = list_methods()
    width = max(len(n) for n in names)
    print("methods (ntksap prune --method NAME):")
    print(f"  {'name'.ljust(width)}  {'input'.ljust(9)}  rounds  summary")
    for name in names:
        m = get_method(name)
        kind = "data" if m.needs_data else ("data-free" if not m.needs_data_for() else "data")
        print(f"  {name.ljust(width)}  {kind.ljust(9)}  {m.default_rounds:>6}  {m.summary}")
        for opt, spec in m.options.items():
            default = "auto" if spec.default is None else spec.default
            choices = f" {{{','.join(map(str, spec.choices))}}}" if spec.choices else ""
            print(f"  {''.ljust(width)}    {_flag(opt)}{choices} (default {default}): {spec.help}")
    models = list_models()
    width = max(len(n) for n in models)
    print("models (ntksap prune --model NAME; default input shape and classes):")
    for name in models:
        doc = (MODELS.get(name).__doc__ or "").strip().splitlines()
        d = defaults(name)
        shape = "x".join(map(str, d.input_shape)) if d is not None else "?"
        classes = d.num_classes if d is not None else "?"
        line = f"  {name.ljust(width)}  {shape:>9} {classes:>5}  {doc[0] if doc else ''}"
        print(line.rstrip())
    return 0
