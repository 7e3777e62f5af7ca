"""``vllm-elastic inspect | slice | random | annotate``: the checkpoint tools."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_elastic.errors import ElasticConfigError, short
from vllm_elastic.spec.axes import AXES, LAYERS

_SubParsers = Any  # argparse's private _SubParsersAction
SPEC_KEYS = {a.alias: a for a in AXES.values()}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import budget_report
    from vllm_elastic.cli.report_format import format_report

    rows = budget_report(args.ckpt)
    print(json.dumps(rows, indent=2) if args.json else format_report(rows))
    return 0


def add_inspect(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "inspect", help="list a checkpoint's budgets: sizes, total and active parameters"
    )
    p.add_argument("ckpt", type=Path, help="elastic checkpoint directory (weights not needed)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_inspect)


def _cmd_slice(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import slice_checkpoint

    out = slice_checkpoint(args.ckpt, args.budget, args.output)
    print(f"wrote budget {args.budget!r} of {args.ckpt} as a plain checkpoint to {out}")
    return 0


def add_slice(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "slice", help="write one budget as a standalone plain checkpoint (Llama/Qwen3/NemotronH)"
    )
    p.add_argument("ckpt", type=Path, help="elastic checkpoint directory")
    p.add_argument("--budget", required=True, help="budget name")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.set_defaults(func=_cmd_slice)


def _cmd_annotate(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import annotate
    from vllm_elastic.checkpoint.report import budget_report
    from vllm_elastic.cli.report_format import format_report

    out = annotate(args.ckpt, args.budgets, args.output)
    print(f"wrote an elastic config over {args.ckpt} (weights linked, not copied) to {out}")
    print(format_report(budget_report(out)))
    return 0


def add_annotate(sub: _SubParsers) -> None:
    p = sub.add_parser(
        "annotate",
        help="serve a plain checkpoint plus a budget list as an elastic one (no weight copy)",
    )
    p.add_argument("ckpt", type=Path, help="plain checkpoint (e.g. NemotronHForCausalLM)")
    p.add_argument("--budgets", type=Path, required=True, help="JSON: a list of budgets, or "
                   '{"budgets": [...], "default_budget": ..., "think_end": ...}')  # fmt: skip
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.set_defaults(func=_cmd_annotate)


def _spec_int(key: str, text: str) -> int:
    """An int of a budget SPEC, or ElasticConfigError naming the key."""
    try:
        return int(text)
    except ValueError:
        raise ElasticConfigError(f"--budget {key}: {short(text)} is not an int") from None


def parse_budget_spec(spec: str) -> dict[str, Any]:
    """``name:hidden=128,heads=4,kv_heads=2,intermediate=384/256,layers=0-2-3`` -> a budget.

    Keys are the axes' short names (``spec/axes.py``) or their full fields; per-layer axes
    take one int or a ``/``-separated per-layer list; ``layers`` is ``-``-separated.
    Omitted keys keep the parent's size; ``name`` alone is a full budget.
    """
    name, _, body = spec.partition(":")
    if not name:
        raise ElasticConfigError(f"--budget: {short(spec)} has no name (NAME:key=value,...)")
    budget: dict[str, Any] = {"name": name}
    keys = {**SPEC_KEYS, **{a.field: a for a in AXES.values()}}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or (key not in keys and key != LAYERS):
            raise ElasticConfigError(
                f"--budget {name}: bad item {short(item)}; expected key=value with key in "
                f"{sorted([*SPEC_KEYS, LAYERS])}"
            )
        if key == LAYERS:
            budget[LAYERS] = [_spec_int(key, v) for v in value.split("-")]
        elif keys[key].per_layer and "/" in value:
            budget[keys[key].field] = [_spec_int(key, v) for v in value.split("/")]
        else:
            budget[keys[key].field] = _spec_int(key, value)
    return budget


def _config_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
        "hybrid_override_pattern": args.pattern,
        "default_budget": args.default_budget,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    for item in args.set or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ElasticConfigError(f"--set: expected FIELD=VALUE, got {short(item)}")
        kwargs[key] = _config_value(value)
    if args.budget:
        kwargs["budgets"] = [parse_budget_spec(s) for s in args.budget]
    if args.tie_embeddings:
        kwargs["tie_word_embeddings"] = True
    kwargs.update(dtype=args.dtype, seed=args.seed)
    return kwargs


def _cmd_random(args: argparse.Namespace) -> int:
    from vllm_elastic.checkpoint import budget_report, build_random_checkpoint
    from vllm_elastic.cli.report_format import format_report

    out = build_random_checkpoint(args.output, **_random_kwargs(args))
    print(f"wrote a random elastic checkpoint to {out}")
    print(format_report(budget_report(out)))
    return 0


def add_random(sub: _SubParsers) -> None:
    from vllm_elastic.checkpoint import DEFAULT_PRESET, PRESETS

    keys = ", ".join(sorted(SPEC_KEYS))
    p = sub.add_parser(
        "random",
        help="write a deterministic random elastic checkpoint (for tests and demos)",
        description="Budget SPEC: NAME:hidden=128,heads=4,kv_heads=2,intermediate=384,"
        f"layers=0-2-3 (keys: {keys}, layers; per-layer axes may take a list: 384/256/384/384;"
        " omitted keys keep the parent's size). --budget replaces the preset's budgets.",
    )
    p.add_argument("output", type=Path, help="output directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    p.add_argument("--family", choices=["llama", "qwen3", "nemotron_h"])
    p.add_argument("--hidden", type=int, help="parent hidden_size")
    p.add_argument("--layers", type=int, help="parent num_hidden_layers (Llama/Qwen3)")
    p.add_argument("--pattern", help="NemotronH hybrid_override_pattern of M, *, - and E")
    p.add_argument("--heads", type=int, help="parent num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="parent num_key_value_heads")
    p.add_argument("--head-dim", type=int, help="head_dim")
    p.add_argument("--intermediate", type=int, help="parent intermediate_size")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any other parent config field (JSON value), repeatable")  # fmt: skip
    p.add_argument("--budget", action="append", metavar="SPEC", help="a budget (repeatable)")
    p.add_argument("--default-budget", help="default budget name (default: the full one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie-embeddings", action="store_true", help="tie lm_head to embeddings")
    p.set_defaults(func=_cmd_random)
