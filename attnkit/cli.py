"""The ``attnkit`` command line: argument parsing only; the work is in ``attnkit.api`` and ``attnkit.eval``."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from attnkit.interventions import available
    from attnkit.models import supported_classes

    print("interventions:")
    for name, info in available().items():
        print(f"  {name:<12} {info['doc']}")
        for p, meta in info["params"].items():
            print(f"      {p} = {meta['default']!r}  ({meta['type']}; {meta['allowed']}) {meta['doc']}")
    print("models:")
    for cls in supported_classes():
        print(f"  {cls}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered interventions, supported models, benchmarks")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
