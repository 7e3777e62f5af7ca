"""Compiled forwards, one per *mix* of budgets (and state budgets) a batch can hold.

Routing tokens to budgets is data-dependent, but once the batch is grouped by budget
(``models/routing.py``) its layer stack is a fixed function of each group's hidden
states, token positions and forward-order indices: which budgets are present decides
the code, how many tokens each has does not. So every mix compiles like a stock model
(``compat/compile.py``: traced once with every token count dynamic, no guards): a batch
of one budget (one segment, no gathers), and each set of budgets a mixed batch can hold
(one segment per budget, largest first, each with its own token count). A family whose
layers write recurrent state keys its segments by ``(budget, state budget)`` too: a
``reuse`` request's thinking tokens run the thinking budget but write the answer
budget's Mamba heads, a different fixed function. Every key's graph is traced in vLLM's
profile run at start-up, so no request waits for a compile; the time is logged and kept
in ``compile_s``. The mixed graphs are opt-in (engine option ``mixed_graphs``): on this
project's CPU benchmarks they did not beat the routed eager forward and took minutes to
compile (README); by default mixed batches run the routed eager forward.
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

# per segment of the batch, largest budget first: (budget index of its tokens, budget
# index of the recurrent state they write)
GraphKey = tuple[tuple[int, int], ...]


def _segments_forward(
    model: Any, key: GraphKey, positions: torch.Tensor, *tensors: torch.Tensor
) -> torch.Tensor:
    """The layer stack and final norm of a batch grouped as ``key`` says: ``tensors`` are
    each segment's hidden states (at its budget's width), then, for more than one
    segment, each one's token indices in the forward."""
    n = positions.shape[0]
    if len(key) == 1:
        (budget, state), hidden = key[0], tensors[0]
        segments = [Segment(budget, slice(None), n, hidden, states=(state,))]
    else:
        hiddens, idxs = tensors[: len(key)], tensors[len(key) :]
        segments = [
            Segment(b, idx, idx.shape[0], h, states=(s,))
            for (b, s), h, idx in zip(key, hiddens, idxs)
        ]
    return model.run_segments(positions, segments, n)


def _index(idx: slice | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        return idx
    return torch.arange(idx.start, idx.stop, device=device)


class BudgetGraphs:
    """The compiled forwards of one model, one per ``model.graph_keys()``."""

    def __init__(self, model: Any, settings: CompileSettings, mixed: bool = False) -> None:
        self.model = model
        self.settings = settings
        self.mixed = mixed  # engine option mixed_graphs: graphs for mixed batches too
        self.graphs: dict[GraphKey, Callable[..., torch.Tensor]] = {}
        self.compile_s: dict[str, float] = {}
        self.calls: dict[GraphKey, int] = {}  # forwards served per key

    @property
    def ready(self) -> bool:
        return bool(self.graphs)

    def serves(self, key: GraphKey) -> bool:
        """Whether ``key``'s batches run a graph (without ``mixed_graphs``, a mixed batch
        runs the routed eager forward)."""
        return self.mixed or len(key) == 1

    def label(self, key: GraphKey) -> str:
        """``"small"``; ``"small>full"`` for small tokens writing full's state;
        ``"full+small"`` for a batch of both."""
        names = self.model.spec.budgets
        return "+".join(
            names[b].name if b == s else f"{names[b].name}>{names[s].name}" for b, s in key
        )

    def _example(self, key: GraphKey, embeds: torch.Tensor) -> list[torch.Tensor]:
        """Inputs for tracing ``key`` from the profile run's embeddings: segment token
        counts all different (dynamo gives equal sizes one symbol) and at least 2."""
        n, k = embeds.shape[0], len(key)
        sizes = [*range(2, k + 1), n - sum(range(2, k + 1))]
        idxs = list(torch.arange(n, device=embeds.device).split(sizes))
        width = [self.model.spec.budgets[b].hidden_size for b, _ in key]
        hiddens = [embeds[i][:, :w].contiguous() for i, w in zip(idxs, width)]
        return hiddens if k == 1 else [*hiddens, *idxs]

    def trace_all(self, embeds: torch.Tensor, positions: torch.Tensor) -> None:
        """Compile every key's graph on the profile run's dummy batch."""
        keys = [k for k in self.model.graph_keys() if self.serves(k)]
        need = sum(range(2, max(len(k) for k in keys) + 2))
        if embeds.shape[0] < need:  # each dynamic token count traced at a distinct size >= 2
            logger.warning(
                "vllm-elastic: a %d-token profile run cannot trace the budget graphs; "
                "waiting for one of at least %d tokens (eager until then)",
                embeds.shape[0], need,
            )  # fmt: skip
            return
        for key in keys:
            label = self.label(key)
            name = label.replace(">", "_to_").replace("+", "_and_")
            fn = compile_budget_forward(
                _segments_forward, f"elastic_{name}_forward", self.settings, len(key) > 1
            )
            start = time.perf_counter()
            try:
                fn(self.model, key, positions, *self._example(key, embeds))
            except Exception as e:  # noqa: BLE001 - re-raised with what to do
                raise ElasticConfigError(
                    f"vllm-elastic could not compile the {label!r} forward "
                    f"({type(e).__name__}: {e}); start the engine with enforce_eager=True"
                ) from e
            self.compile_s[label] = round(time.perf_counter() - start, 2)
            self.graphs[key] = fn
        logger.info(
            "vllm-elastic: compiled %d graphs (one per budget%s, backend %s) in %.1f s: %s",
            len(self.graphs), " and budget mix" if self.mixed else "", self.settings.backend,
            sum(self.compile_s.values()), self.compile_s,
        )  # fmt: skip

    def __call__(
        self, key: GraphKey, segments: list[Segment], positions: torch.Tensor
    ) -> torch.Tensor:
        self.calls[key] = self.calls.get(key, 0) + 1
        hiddens = [s.hidden for s in segments]
        if len(segments) == 1:
            return self.graphs[key](self.model, key, positions, hiddens[0])
        idxs = [_index(s.idx, positions.device) for s in segments]
        return self.graphs[key](self.model, key, positions, *hiddens, *idxs)
