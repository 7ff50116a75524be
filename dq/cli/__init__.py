"""The ``dq`` command: one module per subcommand, each with ``add_parser`` and ``run(args) -> int``.

stdout is data (tables, ``--json``); stderr is logs and progress. Library errors (``DQError``) become a
one-line message and exit code 2; nothing here is imported by the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from dq import __version__
from dq.errors import DQError

# subcommand name -> module under dq.cli (imported lazily, so `dq --help` stays fast)
SUBCOMMANDS = {
    "analyze": "dq.cli.analyze",
    "plan": "dq.cli.plan",
    "quantize": "dq.cli.quantize",
    "eval": "dq.cli.eval",
    "upload": "dq.cli.upload",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dq", description="Dynamic quantization for LLMs (GGUF and safetensors).")
    parser.add_argument("--version", action="version", version=f"dq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command that re-starts itself passes on
    who = f"dq[rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "dq"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"{who}: %(message)s" if not args.verbose else f"%(levelname)s {who} %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except DQError as exc:
        print(f"dq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dq {args.command}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
