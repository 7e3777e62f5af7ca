"""Checkpoint tools: random elastic checkpoints, slicing a budget out, annotating a plain
checkpoint with budgets, size reports; all driven by the families' slice declarations."""

from vllm_elastic.checkpoint.annotate import annotate
from vllm_elastic.checkpoint.io import load_elastic_config, load_state_dict
from vllm_elastic.checkpoint.random import DEFAULT_PRESET, PRESETS, build_random_checkpoint
from vllm_elastic.checkpoint.report import budget_num_parameters, budget_report
from vllm_elastic.checkpoint.slicing import plain_config, slice_checkpoint, slice_state_dict
from vllm_elastic.errors import UnknownBudgetError

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "UnknownBudgetError",
    "annotate",
    "budget_num_parameters",
    "budget_report",
    "build_random_checkpoint",
    "load_elastic_config",
    "load_state_dict",
    "plain_config",
    "slice_checkpoint",
    "slice_state_dict",
]
