"""Elastic MLPs: gated SiLU (Llama/Qwen3) and non-gated relu2 (NemotronH's ``-`` layers and
shared experts). A budget keeps the first channels of its layer (``intermediate_size``,
or the axis the MLP is built for).

Long prefills run ``mlp_window`` rows at a time: the wide up-projection output stays in
cache between its GEMMs, the activation and down (a long prefill otherwise streams it
through memory several times). Windows may cut budget runs anywhere; runs stay
descending, so each nested shell still runs once per window.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vllm_elastic.compat.compile import is_compiling
from vllm_elastic.kernels.silu_mul import silu_mul_bands
from vllm_elastic.models import scratch
from vllm_elastic.models.layers.common import pack_linears, row_parallel_out, tp_rank_and_size
from vllm_elastic.models.nested_linear import NestedLinear
from vllm_elastic.models.routing import Segment, runs, stack
from vllm_elastic.spec.engine_options import engine_options
from vllm_elastic.spec.layout import channels_of_rank, gate_up_rows


def windows(runs: list[tuple[int, int]], size: int) -> Iterable[tuple[int, list[tuple[int, int]]]]:
    """Consecutive row windows of at most ``size`` rows: ``(first row, runs inside)``."""
    start, window, filled = 0, [], 0
    for budget, m in runs:
        while m:
            take = min(m, size - filled)
            window.append((budget, take))
            filled += take
            m -= take
            if filled == size:
                yield start, window
                start, window, filled = start + size, [], 0
    if window:
        yield start, window


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = SiLU(gate) * up`` of one band ``[gate | up]``; SiLU runs in place on it."""
    half = gate_up.shape[1] // 2
    if is_compiling():  # a graph takes no strided out= (inductor fuses the three ops)
        return out.copy_(F.silu(gate_up[:, :half]) * gate_up[:, half:])
    return torch.mul(F.silu(gate_up[:, :half], inplace=True), gate_up[:, half:], out=out)


def relu2_(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)**2`` in place."""
    return torch.square(torch.relu_(x), out=x)


class _ElasticMLP(nn.Module):
    """Up (or gate_up), activation, down; one copy of the parent's channels."""

    gated: bool
    up_name = "up"  # how packing reports the up projection

    def __init__(self, vllm_config: Any, spec: Any, layer: int, *, field: str, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size()
        p = spec.parent
        self.layer = layer
        self.inter = p.sizes[field] // self.tp_size
        hidden = p.sizes["hidden_size"]
        self.hiddens = [b.hidden_size for b in spec.budgets]
        self.inters = [
            b.size(field, layer) // self.tp_size if b.keeps_layer(layer) else None
            for b in spec.budgets
        ]
        rows = (2 if self.gated else 1) * self.inter
        self.up_weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.down_weight = nn.Parameter(torch.empty(hidden, self.inter), requires_grad=False)
        self.up_bias = self.down_bias = None
        if bias:
            self.up_bias = nn.Parameter(torch.empty(rows))
            self.down_bias = nn.Parameter(torch.empty(hidden))
        factor = 2 if self.gated else 1
        self.up = NestedLinear(
            [None if i is None else (factor * i, h) for i, h in zip(self.inters, self.hiddens)]
        )
        self.down = NestedLinear(
            [None if i is None else (h, i) for i, h in zip(self.inters, self.hiddens)]
        )
        self.bounds = sorted({i for i in self.inters if i is not None} | {self.inter})
        self.mlp_window = engine_options(vllm_config).mlp_window

    # ----------------------------------------------------------------- weights
    def _channels(self) -> torch.Tensor:
        return channels_of_rank(self.inter * self.tp_size, self.tp_size, self.tp_rank)

    def load(self, proj: str, kind: str, w: torch.Tensor) -> str:
        """``up_proj`` / ``gate_proj`` / ``down_proj`` weight or bias into this rank's layout."""
        ch = self._channels()
        if proj == "down_proj":  # input columns per rank; the bias is whole
            getattr(self, f"down_{kind}").data.copy_(w[:, ch] if kind == "weight" else w)
            return f"down_{kind}"
        param = getattr(self, f"up_{kind}")
        param.data.index_copy_(0, self._up_rows(proj), w[ch].to(param.dtype))
        return f"up_{kind}"

    def _up_rows(self, proj: str) -> torch.Tensor:
        return torch.arange(self.inter)

    def pack(self, packing: str) -> dict[str, str]:
        down_bias = self.down_bias if self.tp_size == 1 else None
        return pack_linears(
            {
                self.up_name: (self.up, self.up_weight, self.up_bias),
                "down": (self.down, self.down_weight, down_bias),
            },
            packing,
        )

    def linears(self) -> list[NestedLinear]:
        return [self.up, self.down]

    # ----------------------------------------------------------------- forward
    def forward(self, xs: list[torch.Tensor], segments: list[Segment]) -> list[torch.Tensor]:
        """The MLP of every segment (all keep the layer), at each segment's width."""
        y = self._apply(stack(xs), runs(segments))
        widths = [self.hiddens[s.budget] for s in segments]
        return row_parallel_out(y, self.down_bias, segments, widths, self.tp_size)

    def forward_stacked(self, x: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """The MLP of a stacked batch (``Stack``, one rank): ``[rows, widest]``."""
        return self._apply(x, runs(segments))

    def _apply(self, x: torch.Tensor, r: list[tuple[int, int]]) -> torch.Tensor:
        """Down-projection output of the stacked rows ``x`` (runs ``r``), before the reduce."""
        if is_compiling() or x.shape[0] <= self.mlp_window:  # a graph has no size branches
            return self._window(x, r)
        y = None
        for start, window in windows(r, self.mlp_window):
            rows = sum(m for _, m in window)
            part = self._window(x[start : start + rows], window)
            if y is None:  # the first window holds the widest budget (runs descend)
                y = part.new_empty(x.shape[0], part.shape[1])
            y[start : start + rows, : part.shape[1]] = part
        return y

    def _window(self, x: torch.Tensor, r: list[tuple[int, int]]) -> torch.Tensor:
        raise NotImplementedError


class GatedMLP(_ElasticMLP):
    """``down(SiLU(gate) * up)``; gate_up rows are band-major (``spec/layout.py``): band
    ``[a, b)`` of the channels holds ``gate[a:b]`` then ``up[a:b]``."""

    gated = True
    up_name = "gate_up"

    def __init__(self, vllm_config: Any, spec: Any, layer: int, *, bias: bool) -> None:
        super().__init__(vllm_config, spec, layer, field="intermediate_size", bias=bias)
        self.gate_rows, self.up_rows = gate_up_rows(self.bounds, self.inter)

    def _up_rows(self, proj: str) -> torch.Tensor:
        return self.gate_rows if proj == "gate_proj" else self.up_rows

    def _window(self, x: torch.Tensor, r: list[tuple[int, int]]) -> torch.Tensor:
        blocks = self.up.blocks(x, r)
        if blocks is not None:
            # each row's columns up to its level are written, and down reads no others
            act = scratch.buffer("mlp.act", x.shape[0], blocks[-1][2] // 2, x, overwritten=True)
            for rows, n0, n, y in blocks:  # band [n0/2, n/2) of the channels: gate | up
                silu_mul(y, act[:rows, n0 // 2 : n // 2])
            return self.down(act, r)
        gu = None
        if self.up.fills_out:
            gu = scratch.buffer(
                "mlp.gate_up", x.shape[0], self.up.out_width(r), x, overwritten=True
            )
        return self.down(self._activation(self.up(x, r, gu), r), r)

    def _activation(self, gu: torch.Tensor, r: list[tuple[int, int]]) -> torch.Tensor:
        """SiLU(gate) * up of the band-major gate_up output: outside a graph, where the
        plugin's kernels run (``blocked``), one fused call; else band by band."""
        inters = [self.inters[b] for b, _ in r]
        # each run's channels up to its own are written, and down reads no others
        act = scratch.buffer("mlp.act", gu.shape[0], max(inters), gu, overwritten=True)
        if self.up.packing == "blocked" and not is_compiling():  # its kernels are built
            return silu_mul_bands(act, gu, [m for _, m in r], inters, self.bounds)
        if len(r) == 1 and inters[0] == self.bounds[0]:
            n = self.bounds[0]
            return silu_mul(gu[:, : 2 * n], act)
        start = 0
        for (_, m), inter in zip(r, inters):
            rows = slice(start, start + m)
            start += m
            a = 0
            for b in self.bounds:
                if b > inter:
                    break
                silu_mul(gu[rows, a + a : b + b], act[rows, a:b])
                a = b
        return act


class Relu2MLP(_ElasticMLP):
    """``down(relu(up(x))**2)`` (NemotronH's MLP layers and shared experts)."""

    gated = False

    def __init__(
        self, vllm_config: Any, spec: Any, layer: int, *, field: str = "intermediate_size",
        bias: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(vllm_config, spec, layer, field=field, bias=bias)

    def _window(self, x: torch.Tensor, r: list[tuple[int, int]]) -> torch.Tensor:
        up = None
        if self.up.fills_out:
            up = scratch.buffer("mlp.up", x.shape[0], self.up.out_width(r), x, overwritten=True)
        return self.down(relu2_(self.up(x, r, up)), r)
