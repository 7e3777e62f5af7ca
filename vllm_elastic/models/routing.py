"""Token routing of an elastic forward: which budget each token runs at, grouped once.

Every forward groups the batch's tokens by budget (``BudgetRouter.route``), largest
budget first: that makes each nested projection's shells apply to a prefix of the
stacked rows (``NestedLinear``). A batch of one budget is one segment with no gather.
Layers update each segment's residual stream in place; an eager mixed batch of a family
whose layers support it keeps the segments' streams stacked in one buffer (``Stack``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_elastic.compat.forward_context import row_token_counts
from vllm_elastic.errors import ElasticStateError
from vllm_elastic.models import scratch
from vllm_elastic.models.batch_state import ElasticBatchState, lookup_state
from vllm_elastic.spec.budgets import ElasticSpec

Index = slice | torch.Tensor


def take(t: torch.Tensor, idx: Index) -> torch.Tensor:
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def put(dst: torch.Tensor, idx: Index, src: torch.Tensor) -> None:
    dst[idx] = src


def stack(xs: list[torch.Tensor]) -> torch.Tensor:
    """Rows of every tensor, one after another, in a buffer as wide as the widest."""
    if len(xs) == 1:
        return xs[0]
    out = xs[0].new_empty(sum(x.shape[0] for x in xs), max(x.shape[1] for x in xs))
    start = 0
    for x in xs:
        out[start : start + x.shape[0], : x.shape[1]] = x
        start += x.shape[0]
    return out


# the last stacked_index: (the segments' token indices, the result)
_STACKED: list[tuple[tuple[Index, ...], torch.Tensor] | None] = [None]


def stacked_index(segments: list[Segment], num_tokens: int) -> torch.Tensor | None:
    """The forward token of each row of the segments' rows stacked in order (int64);
    None when that is every token in order. Kept until asked for other segments, so the
    layers of one forward build it once."""
    idxs = tuple(s.idx for s in segments)
    if len(idxs) == 1 and isinstance(idxs[0], slice):
        start, stop, _ = idxs[0].indices(num_tokens)
        if start == 0 and stop == num_tokens:
            return None
    last = _STACKED[0]
    if last is not None and len(last[0]) == len(idxs):
        if all(a is b or (isinstance(a, slice) and a == b) for a, b in zip(last[0], idxs)):
            return last[1]
    parts = []
    for idx in idxs:
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(num_tokens)
            parts.append(torch.arange(start, stop))
        else:
            parts.append(idx.to("cpu", torch.int64))
    out = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
    _STACKED[0] = (idxs, out)
    return out


def widen(q: torch.Tensor, width: int, name: str = "attn.q") -> torch.Tensor:
    """``q`` in the first columns of a ``width``-wide scratch buffer; the other columns
    hold finite leftovers that nothing reads."""
    out = scratch.buffer(name, q.shape[0], width, q)
    out[:, : q.shape[1]] = q
    return out


@dataclass
class Segment:
    """The tokens of one budget in this forward, and their residual stream."""

    budget: int  # budget index
    idx: Index  # the tokens' positions in the forward
    rows: int
    hidden: torch.Tensor
    residual: torch.Tensor | None = None
    states: tuple[int, ...] = ()  # the state budgets of its tokens (recurrent layers)

    def stream(self) -> torch.Tensor:
        """The residual stream a skipped layer passes through."""
        return self.hidden if self.residual is None else self.hidden + self.residual


@dataclass
class Stack:
    """A mixed batch's residual stream stacked in one buffer: every segment's rows in
    segment order (largest budget first), each row's values in its budget's first
    ``widths`` columns (the rest hold values nothing reads). Layers that run
    every budget of the batch update it in place with one call per norm and projection
    (``ElasticForCausalLM.run_stacked``) instead of one per segment."""

    hidden: torch.Tensor  # [rows, widest]: the last layer's output, then its normed input
    residual: torch.Tensor  # [rows, widest]
    rows: list[int]  # per segment
    widths: list[int]  # per segment: its budget's hidden size
    order: torch.Tensor | None  # the forward token of each stacked row; None: in order


def runs(segments: list[Segment]) -> list[tuple[int, int]]:
    """``(budget, rows)`` of the segments, the form ``NestedLinear`` takes."""
    return [(s.budget, s.rows) for s in segments]


class BudgetRouter:
    """Per-forward budget of every token, from the batch state the logits processor keeps."""

    def __init__(self, vllm_config: Any, spec: ElasticSpec) -> None:
        self.vllm_config = vllm_config
        self.spec = spec
        self.full_index = spec.full.index
        order = [b.index for b in reversed(spec.by_size())]  # largest first
        self.rank = {b: r for r, b in enumerate(order)}
        self._state: ElasticBatchState | None = None
        self.logit_budgets: np.ndarray | None = None
        self.token_states: np.ndarray | None = None
        self.dummy = False  # this forward is a profile or dummy run (no requests)

    def _batch_state(self) -> ElasticBatchState:
        if self._state is None:
            self._state = lookup_state(self.vllm_config)
            if self._state is None:
                raise ElasticStateError(
                    "the elastic budget logits processor is not loaded in this engine, so "
                    "no request's budget is known (vllm-elastic attaches it from the elastic "
                    "architecture's config hook)"
                )
        return self._state

    def token_budgets(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, num_tokens: int
    ) -> np.ndarray:
        """Budget index per token; records the logits rows' budgets."""
        self.logit_budgets = None
        counts = row_token_counts()
        self.dummy = counts is None
        if counts is None:  # profile / dummy runs
            self.token_states = np.full((num_tokens, 2), self.full_index)
            return self.token_states[:, 0]
        state = self._batch_state()
        qsl = np.concatenate([[0], np.cumsum(counts)])
        pos = positions.cpu().numpy()
        pending = np.flatnonzero(state.pending[: len(counts)] & (counts > 0))
        if pending.size and input_ids is not None and state.on_fed is not None:
            last = qsl[1:][pending] - 1
            index = torch.from_numpy(last).to(input_ids.device)
            state.on_fed(pending, input_ids[index].cpu().numpy(), pos[last])
        tb = state.token_budgets(counts, pos)
        sb = state.token_states(counts)
        if len(tb) < num_tokens:  # padding tokens (no request) run at the full budget
            tb = np.concatenate([tb, np.full(num_tokens - len(tb), self.full_index)])
            sb = np.concatenate([sb, np.full((num_tokens - len(sb), 2), self.full_index)])
        self.token_states = sb
        self.logit_budgets = tb[qsl[1:] - 1] if len(counts) else None
        return tb

    def groups(self, tb: np.ndarray, device: torch.device) -> list[tuple[int, Index]]:
        """``(budget, token index)`` per budget present, largest budget first."""
        first = int(tb[0])
        if (tb == first).all():
            return [(first, slice(0, len(tb)))]
        out: list[tuple[int, Index]] = []
        for b in sorted(np.unique(tb).tolist(), key=self.rank.__getitem__):
            pos = np.flatnonzero(tb == b)
            if pos[-1] - pos[0] + 1 == len(pos):
                out.append((int(b), slice(int(pos[0]), int(pos[-1]) + 1)))
            else:
                out.append((int(b), torch.from_numpy(pos).to(device)))
        return out

    def segments(
        self, embeds: torch.Tensor, input_ids: torch.Tensor | None, positions: torch.Tensor
    ) -> list[Segment]:
        """The forward's segments, each holding its tokens' embeddings at its width."""
        tb = self.token_budgets(input_ids, positions, embeds.shape[0])
        sb = self.token_states
        out = []
        for budget, idx in self.groups(tb, embeds.device):
            h = self.spec.budgets[budget].hidden_size
            x = take(embeds, idx)[:, :h].contiguous()
            mine = sb[idx] if isinstance(idx, slice) else sb[idx.cpu().numpy()]
            if (mine == mine[0, 0]).all():
                states: tuple[int, ...] = (int(mine[0, 0]),)
            else:
                states = tuple(np.unique(mine).tolist())
            out.append(Segment(budget, idx, x.shape[0], x, states=states))
        return out
