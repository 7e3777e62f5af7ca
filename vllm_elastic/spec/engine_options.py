"""The engine's ``additional_config["elastic"]`` section and the request keys: names and schema.

Request keys (``SamplingParams.extra_args`` offline, ``vllm_xargs`` in the OpenAI API)
choose a request's budgets. The engine section holds the default policy (the same keys)
and engine-wide options. Both are checked here against the known names, so a typo
(``elastic_budegt``, ``weight_packng``) is an error that lists the valid names instead of
a silent default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_elastic.errors import ElasticConfigError, ElasticPolicyError, short
from vllm_elastic.spec.kv_layout import KV_LAYOUTS

# -- request keys (also the engine's default policy) ---------------------------------
KEY_BUDGET = "elastic_budget"
KEY_THINK = "elastic_think_budget"
KEY_ANSWER = "elastic_answer_budget"
KEY_KV_MODE = "elastic_kv_mode"
POLICY_KEYS = (KEY_BUDGET, KEY_THINK, KEY_ANSWER, KEY_KV_MODE)
KV_MODES = ("reuse", "recompute")
# every user key that starts with this must be one of POLICY_KEYS
REQUEST_KEY_PREFIX = "elastic"
# written by the frontend into a request's extra_args once its policy is resolved
KEY_RESOLVED = "_elastic"

# -- engine options --------------------------------------------------------------------
PACKINGS = ("auto", "nested", "blocked", "per-budget", "views")
MAMBA_DECODES = ("auto", "kernel", "vllm")
DEFAULT_MLP_WINDOW = 512
ENGINE_KEYS: dict[str, str] = {
    KEY_BUDGET: "default budget of every request",
    KEY_THINK: "default budget of the thinking phase",
    KEY_ANSWER: "default budget of the answer phase",
    KEY_KV_MODE: f"default KV mode at the switch ({' | '.join(KV_MODES)})",
    "think_start": "start-of-thinking marker (string)",
    "think_end": "end-of-thinking marker (string)",
    "think_start_ids": "start-of-thinking marker (token ids)",
    "think_end_ids": "end-of-thinking marker (token ids)",
    "weight_packing": f"CPU weight storage ({' | '.join(PACKINGS)})",
    "mlp_window": "rows per MLP pass in long prefills (int >= 1)",
    "full_state": "every token writes the recurrent state of every Mamba head (bool)",
    "mamba_decode": "Mamba decode step on CPU: our fused kernels (decode step, and the "
    "gated norm outside compiled graphs) or vLLM's decode kernels "
    f"({' | '.join(MAMBA_DECODES)}; auto: ours where they run)",
    "serve_budgets": "budgets this engine serves (list of names, default: all the "
    "checkpoint declares; must include the full one): fewer graphs, and with nested "
    "packing fewer GEMMs",
    "mixed_graphs": "also compile a graph per mix of budgets at start-up (bool, default "
    "false: mixed batches run the routed eager forward)",
    "kv_layout": f"K/V storage ({' | '.join(KV_LAYOUTS)}; parent: every token writes "
    "every KV head, per-budget: a request stores the KV heads of the budgets it can run "
    "at, attention-only families)",
    "base_scheduler_cls": "scheduler the recompute hook wraps (set from --scheduler-cls)",
}


@dataclass(frozen=True)
class EngineOptions:
    """A validated ``additional_config["elastic"]`` section."""

    policy: dict[str, Any] = field(default_factory=dict)
    markers: dict[str, Any] = field(default_factory=dict)
    weight_packing: str = "auto"
    mlp_window: int = DEFAULT_MLP_WINDOW
    full_state: bool = False
    mamba_decode: str = "auto"
    mixed_graphs: bool = False
    serve_budgets: tuple[str, ...] | None = None  # None: every budget of the checkpoint
    kv_layout: str = "parent"
    base_scheduler_cls: str | None = None


def raw_section(vllm_config: Any) -> dict[str, Any]:
    """The engine's ``additional_config["elastic"]`` as given (a new dict)."""
    section = (getattr(vllm_config, "additional_config", None) or {}).get("elastic") or {}
    if not isinstance(section, Mapping):
        raise ElasticConfigError(
            f'additional_config["elastic"]: expected an object, got {short(section)}'
        )
    return dict(section)


def parse_engine_options(section: Mapping[str, Any]) -> EngineOptions:
    """Check every key and value type of an engine section (budget names are checked
    against the checkpoint by ``control.policy``); raise ElasticConfigError."""
    unknown = sorted(str(k) for k in section if k not in ENGINE_KEYS)
    if unknown:
        raise ElasticConfigError(
            f'additional_config["elastic"]: unknown key(s) {short(unknown)}; known keys: '
            + ", ".join(sorted(ENGINE_KEYS))
        )
    packing = section.get("weight_packing", "auto")
    if packing not in PACKINGS:
        raise ElasticConfigError(
            f"elastic.weight_packing: expected one of {', '.join(PACKINGS)}, got {short(packing)}"
        )
    window = section.get("mlp_window", DEFAULT_MLP_WINDOW)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ElasticConfigError(f"elastic.mlp_window: expected an int >= 1, got {short(window)}")
    full_state = section.get("full_state", False)
    if not isinstance(full_state, bool):
        raise ElasticConfigError(
            f"elastic.full_state: expected true or false, got {short(full_state)}"
        )
    mamba_decode = section.get("mamba_decode", "auto")
    if mamba_decode not in MAMBA_DECODES:
        raise ElasticConfigError(
            f"elastic.mamba_decode: expected one of {', '.join(MAMBA_DECODES)}, got "
            f"{short(mamba_decode)}"
        )
    mixed = section.get("mixed_graphs", False)
    if not isinstance(mixed, bool):
        raise ElasticConfigError(
            f"elastic.mixed_graphs: expected true or false, got {short(mixed)}"
        )
    served = section.get("serve_budgets")
    if served is not None and (
        isinstance(served, str)
        or not isinstance(served, list)
        or not served
        or not all(isinstance(n, str) for n in served)
        or len(set(served)) != len(served)
    ):
        raise ElasticConfigError(
            "elastic.serve_budgets: expected a non-empty list of distinct budget names, got "
            f"{short(served)}"
        )
    kv_layout = section.get("kv_layout", "parent")
    if kv_layout not in KV_LAYOUTS:
        raise ElasticConfigError(
            f"elastic.kv_layout: expected one of {', '.join(KV_LAYOUTS)}, got {short(kv_layout)}"
        )
    base = section.get("base_scheduler_cls")
    if base is not None and not isinstance(base, str):
        raise ElasticConfigError(
            f"elastic.base_scheduler_cls: expected a 'module.Class' string, got {short(base)}"
        )
    markers = {k: section[k] for k in ENGINE_KEYS if k.startswith("think_") and k in section}
    return EngineOptions(
        policy={k: section[k] for k in POLICY_KEYS if k in section},
        markers=markers,
        weight_packing=packing,
        mlp_window=window,
        full_state=full_state,
        mamba_decode=mamba_decode,
        mixed_graphs=mixed,
        serve_budgets=None if served is None else tuple(served),
        kv_layout=kv_layout,
        base_scheduler_cls=base,
    )


def engine_options(vllm_config: Any) -> EngineOptions:
    """The engine's validated options (raises ElasticConfigError on a bad section)."""
    return parse_engine_options(raw_section(vllm_config))


def check_request_keys(args: Mapping[str, Any] | None) -> None:
    """Reject a request key that looks like ours but is not one (``elastic_budegt``,
    ``"elastic_budget "``), naming the valid keys; raise ElasticPolicyError."""
    for key in args or ():
        name = str(key)
        if name.strip().lower().startswith(REQUEST_KEY_PREFIX) and name not in POLICY_KEYS:
            raise ElasticPolicyError(
                f"unknown request key {short(name)}; the elastic keys are " + ", ".join(POLICY_KEYS)
            )
