"""Loggers that print through vLLM's logging set-up (its ``vllm`` logger's handler)."""

from __future__ import annotations

import logging

from vllm.logger import init_logger


def get_logger(name: str) -> logging.Logger:
    """``init_logger`` under the ``vllm.`` namespace, so vLLM's handler and level apply."""
    return init_logger(f"vllm.{name}")
