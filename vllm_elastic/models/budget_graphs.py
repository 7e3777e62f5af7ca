"""One compiled graph per budget (and state budget): the forward of a batch whose tokens
share one budget.

Routing tokens to budgets is data-dependent, but a batch of one budget routes every
token the same way: its layer stack is a fixed function of the hidden states and
positions, which compiles like a stock model (``compat/compile.py``: traced once with a
dynamic token count, no guards). A family whose layers write recurrent state keys its
graphs by ``(budget, state budget)`` too: a ``reuse`` request's thinking tokens run the
thinking budget but write the answer budget's Mamba heads, a different fixed function
(``GraphKey``). Mixed batches run the routed eager forward. Every key's graph is traced
in vLLM's profile run at start-up, so no request waits for a compile; the time is logged
and kept in ``compile_s``.
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

# (budget index of the tokens, budget index of the state they write)
GraphKey = tuple[int, int]


def _one_budget_forward(
    model: Any, budget: int, state: int, hidden: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The layer stack and final norm for tokens that all run at ``budget`` and write
    ``state``'s recurrent state; ``hidden`` holds their embeddings at the budget's width."""
    n = hidden.shape[0]
    seg = Segment(budget, slice(None), n, hidden, states=(state,))  # slice(0, n) pins n
    for layer in model.layers:
        layer(positions, [seg], n)
    return model._final_norm(seg)


class BudgetGraphs:
    """The compiled forwards of one model, one per ``model.graph_keys()``."""

    def __init__(self, model: Any, settings: CompileSettings) -> None:
        self.model = model
        self.settings = settings
        self.graphs: dict[GraphKey, Callable[..., torch.Tensor]] = {}
        self.compile_s: dict[str, float] = {}
        self.calls: dict[GraphKey, int] = {}  # forwards served per key

    @property
    def ready(self) -> bool:
        return bool(self.graphs)

    def label(self, key: GraphKey) -> str:
        """``"small"``, or ``"small>full"`` for small tokens writing full's state."""
        names = [self.model.spec.budgets[i].name for i in key]
        return names[0] if key[0] == key[1] else ">".join(names)

    def trace_all(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Compile every key's graph on the profile run's dummy batch."""
        if embeds.shape[0] < 2:  # a dynamic dimension is traced at a size >= 2
            logger.warning(
                "vllm-elastic: a %d-token profile run cannot trace the per-budget graphs; "
                "waiting for a larger one (eager until then)",
                embeds.shape[0],
            )
            return
        for key in self.model.graph_keys():
            label = self.label(key)
            fn = compile_budget_forward(
                _one_budget_forward, f"elastic_{label.replace('>', '_to_')}_forward",
                self.settings,
            )  # fmt: skip
            start = time.perf_counter()
            h = embeds[:, : self.model.spec.budgets[key[0]].hidden_size].contiguous()
            try:
                fn(self.model, *key, h, positions)
            except Exception as e:  # noqa: BLE001 - re-raised with what to do
                raise ElasticConfigError(
                    f"vllm-elastic could not compile the {label!r} forward "
                    f"({type(e).__name__}: {e}); start the engine with enforce_eager=True"
                ) from e
            self.compile_s[label] = round(time.perf_counter() - start, 2)
            self.graphs[key] = fn
        logger.info(
            "vllm-elastic: compiled one graph per budget and state budget (backend %s) in %s s",
            self.settings.backend,
            self.compile_s,
        )

    def __call__(self, key: GraphKey, seg: Segment, positions: torch.Tensor) -> torch.Tensor:
        self.calls[key] = self.calls.get(key, 0) + 1
        return self.graphs[key](self.model, *key, seg.hidden, positions)
