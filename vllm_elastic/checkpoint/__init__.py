"""Checkpoint tools: random elastic checkpoints, slicing a budget out, size reports."""

from vllm_elastic.checkpoint.core import *  # noqa: F403
from vllm_elastic.checkpoint.core import (  # noqa: F401
    DEFAULT_PRESET,
    PRESETS,
    budget_report,
    build_random_checkpoint,
    get_budget,
    load_elastic_config,
    load_state_dict,
    slice_checkpoint,
)
