"""One compiled graph per budget: the forward of a batch whose tokens share one budget.

Routing tokens to budgets is data-dependent, but a batch of one budget routes every
token the same way: its layer stack is a fixed function of the hidden states and
positions, which compiles like a stock model (``compat/compile.py``: traced once with a
dynamic token count, no guards). Mixed batches run the routed eager forward. Every
budget's graph is traced in vLLM's profile run at start-up, so no request waits for a
compile; the time is logged and kept in ``compile_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from vllm_elastic.compat.compile import CompileSettings, compile_budget_forward
from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.log import get_logger
from vllm_elastic.models.routing import Segment

logger = get_logger(__name__)


def _one_budget_forward(
    model: Any, budget: int, hidden: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The layer stack and final norm for tokens that all run at ``budget``; ``hidden``
    holds their embeddings at the budget's width."""
    n = hidden.shape[0]
    seg = Segment(budget, slice(None), n, hidden)  # slice(0, n) would pin n
    for layer in model.layers:
        layer(positions, [seg], n)
    return model._final_norm(seg)


class BudgetGraphs:
    """The compiled per-budget forwards of one model."""

    def __init__(self, model: Any, settings: CompileSettings) -> None:
        self.model = model
        self.settings = settings
        self.graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.compile_s: dict[str, float] = {}
        self.calls: dict[int, int] = {}  # forwards served per budget index

    @property
    def ready(self) -> bool:
        return bool(self.graphs)

    def trace_all(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Compile every budget's graph on the profile run's dummy batch."""
        if embeds.shape[0] < 2:  # a dynamic dimension is traced at a size >= 2
            logger.warning(
                "vllm-elastic: a %d-token profile run cannot trace the per-budget graphs; "
                "waiting for a larger one (eager until then)",
                embeds.shape[0],
            )
            return
        spec = self.model.spec
        for b in spec.budgets:
            fn = compile_budget_forward(
                _one_budget_forward, f"elastic_{b.name}_forward", self.settings
            )
            start = time.perf_counter()
            h = embeds[:, : b.hidden_size].contiguous()
            try:
                fn(self.model, b.index, h, positions)
            except Exception as e:  # noqa: BLE001 - re-raised with what to do
                raise ElasticConfigError(
                    f"vllm-elastic could not compile budget {b.name!r}'s forward "
                    f"({type(e).__name__}: {e}); start the engine with enforce_eager=True"
                ) from e
            self.compile_s[b.name] = round(time.perf_counter() - start, 2)
            self.graphs[b.index] = fn
        logger.info(
            "vllm-elastic: compiled one graph per budget (backend %s) in %s s",
            self.settings.backend,
            self.compile_s,
        )

    def __call__(self, seg: Segment, positions: torch.Tensor) -> torch.Tensor:
        self.calls[seg.budget] = self.calls.get(seg.budget, 0) + 1
        return self.graphs[seg.budget](self.model, seg.budget, seg.hidden, positions)
