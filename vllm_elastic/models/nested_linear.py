"""A linear layer serving nested prefixes ``W[:n, :k]`` of one weight, one per budget.

Budget ``b`` of a layer multiplies its first ``k_b`` input channels by the first ``n_b``
output rows of the parent weight. The distinct ``(n, k)`` points of the budgets, sorted,
are the *levels* of the linear; when they form a chain (both sizes grow together, as in
every nested checkpoint) the weight can be stored so that each level is fast:

``views``
    keep ``W`` and call ``F.linear`` on the view ``W[:n, :k]``. GPUs (cuBLAS takes strided
    operands) and the fallback everywhere.
``nested``
    (CPU, oneDNN) cut ``W`` into L-shaped shells, one per level ``c``: the band of new rows
    ``W[n_{c-1}:n_c, :k_c]`` and the strip of new columns ``W[:n_{c-1}, k_{c-1}:k_c]``, each
    prepacked once for oneDNN like vLLM's own CPU linears. Level ``c`` sums ``2c + 1``
    GEMMs; the shells hold exactly the elements of ``W`` (1.0x memory). Rows of several
    levels stacked in descending level order share each shell's GEMM, so a mixed batch
    reads every weight element once.
``blocked``
    (CPU, AVX2, our kernel ``kernels/nested_gemm.cpp``) ``W`` stored once in 16-row
    blocks, so any prefix ``W[:n, :k]`` is one call, and a mixed batch (its runs in any
    order) one call that reads each weight element once: 1.0x memory and one GEMM per
    projection at every level. Faster than oneDNN at a few rows, slower at many (see the
    README's packing table).
``per-budget``
    (CPU, oneDNN) one packed copy of ``W[:n_l, :k_l]`` per level: one GEMM per level, like a
    stock engine serving the sliced checkpoint, for the sum of the levels' bytes.

A call takes the input rows grouped in *runs* ``(level, rows)``; the output has the top
level's width, and a row's values past its own level's width are undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vllm_elastic.compat.cpu_kernels import OneDNNWeight, onednn_available
from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.kernels import nested_gemm
from vllm_elastic.log import get_logger
from vllm_elastic.models import scratch
from vllm_elastic.spec.engine_options import PACKINGS, engine_options

logger = get_logger(__name__)

__all__ = ["PACKINGS", "NestedLinear", "onednn_available", "requested_packing", "resolve_packing"]


def requested_packing(vllm_config: Any) -> str:
    """The engine's ``weight_packing`` option (validated at start-up)."""
    return engine_options(vllm_config).weight_packing


def resolve_packing(packing: str, device: torch.device, dtype: torch.dtype) -> str:
    """The packing to use for one of ``PACKINGS``. ``auto`` is ``blocked`` on a CPU our
    kernel runs on (x86-64 AVX2, fp32 weights; it is built on first use), else ``nested``
    on CPU with oneDNN, else ``views``; when the kernel fails to build, ``auto`` says why
    and takes ``nested``. Asking for a packing this engine cannot run is an error."""
    cpu_onednn = device.type == "cpu" and onednn_available()
    if packing == "auto":
        if device.type == "cpu" and nested_gemm.unavailable_reason(dtype) is None:
            try:
                nested_gemm.load()
                return "blocked"
            except ElasticConfigError as e:
                logger.warning("vllm-elastic weight_packing 'auto': %s; packing 'nested'", e)
        return "nested" if cpu_onednn else "views"
    if packing == "blocked":
        if device.type != "cpu":
            raise ElasticConfigError(
                "elastic.weight_packing: 'blocked' cannot run here: it runs on CPU only"
            )
        nested_gemm.require(dtype)
        return packing
    if packing != "views" and not cpu_onednn:
        raise ElasticConfigError(
            f"elastic.weight_packing: {packing!r} needs vLLM's CPU oneDNN GEMM, which this "
            f"{device.type} engine lacks; use 'auto' or 'views'"
        )
    return packing


class NestedLinear:
    """``y = x[:, :k_b] @ W[:n_b, :k_b].T (+ bias[:n_b])`` for every budget ``b``.

    ``points[b] = (n_b, k_b)``, or ``None`` for a budget that never calls it (a budget
    that skips the layer). Call :meth:`pack` once the weight is loaded.
    """

    def __init__(self, points: Sequence[tuple[int, int] | None]) -> None:
        self.levels = sorted({p for p in points if p is not None})
        self.level_of = [None if p is None else self.levels.index(p) for p in points]
        self.is_chain = all(
            a[0] <= b[0] and a[1] <= b[1] for a, b in zip(self.levels, self.levels[1:])
        )
        self.packing = "views"
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self._bands: list[OneDNNWeight | None] = []
        self._strips: list[OneDNNWeight | None] = []
        self._per_level: list[OneDNNWeight] = []
        self._blocked: nested_gemm.BlockedWeight | None = None

    # ------------------------------------------------------------------ packing
    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None, packing: str) -> str:
        """Store ``weight`` (``[N, K]``) the way ``packing`` says; returns the packing used.

        ``nested`` needs the levels to form a chain and falls back to ``views`` otherwise.
        """
        if packing == "nested" and not self.is_chain:
            packing = "views"
        self.packing = packing
        if packing == "views":
            self.weight, self.bias = weight, bias
            return packing
        if packing == "blocked":
            n, k = (max(p[i] for p in self.levels) for i in (0, 1))
            top_bias = None if bias is None else bias[:n]
            self._blocked = nested_gemm.BlockedWeight(weight[:n, :k], top_bias)
            return packing
        bias_of = (lambda a, b: None) if bias is None else (lambda a, b: bias[a:b])
        if packing == "per-budget":
            self._per_level = [OneDNNWeight(weight[:n, :k], bias_of(0, n)) for n, k in self.levels]
            return packing
        n0 = k0 = 0
        for n, k in self.levels:
            self._bands.append(OneDNNWeight(weight[n0:n, :k], bias_of(n0, n)) if n > n0 else None)
            self._strips.append(OneDNNWeight(weight[:n0, k0:k], None) if n0 and k > k0 else None)
            n0, k0 = n, k
        return packing

    def packed_bytes(self) -> int:
        """Bytes of the oneDNN-packed blocks (0 for ``views``: the plain parameter holds it)."""
        blocks = [*self._bands, *self._strips, *self._per_level, self._blocked]
        return sum(b.bytes for b in blocks if b is not None)

    # ------------------------------------------------------------------ forward
    @property
    def fills_out(self) -> bool:
        """Whether calls write the ``out`` they are given (every packing but ``views``)."""
        return self.packing != "views"

    def out_width(self, runs: Sequence[tuple[int, int]]) -> int:
        """Columns of the output for ``runs``: the widest level among them."""
        return max(self.levels[self.level_of[b]][0] for b, m in runs if m)

    def __call__(
        self,
        x: torch.Tensor,
        runs: Sequence[tuple[int, int]],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply to ``x`` whose rows are ``runs`` = ``[(budget, rows), ...]`` in order.

        ``out`` (contiguous ``[rows, out_width(runs)]``) is filled and returned by the
        oneDNN packings; ``views`` returns a new tensor.
        """
        levels = [(self.level_of[b], m) for b, m in runs if m]
        if len(levels) == 1:
            return self._one_level(x, levels[0][0], out)
        top = max(lv for lv, _ in levels)
        if self._blocked is not None:  # one call, runs in any order
            n, k = zip(*(self.levels[lv] for lv, _ in levels))
            return self._blocked(x, n, k, [m for _, m in levels], out)
        descending = all(a[0] >= b[0] for a, b in zip(levels, levels[1:]))
        if self.packing == "nested" and descending:
            return self._nested(x, levels, out)
        out = x.new_empty(x.shape[0], self.levels[top][0])
        start = 0
        for lv, m in levels:
            y = self._one_level(x[start : start + m], lv, None)
            out[start : start + m, : y.shape[1]] = y
            start += m
        return out

    def blocks(
        self, x: torch.Tensor, runs: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int, int, torch.Tensor]] | None:
        """The output unassembled, as ``(rows, n0, n, y)``: ``y`` holds output columns
        ``n0:n`` of the first ``rows`` rows (the rows whose level has them).

        Saves the copy into one wide output when the consumer works band by band (the
        MLP activation). ``y`` are scratch buffers, valid until the next call. Only for
        ``nested`` packing and descending runs; None otherwise.
        """
        levels = [(self.level_of[b], m) for b, m in runs if m]
        if self.packing != "nested" or any(a[0] < b[0] for a, b in zip(levels, levels[1:])):
            return None
        return self._shells(x, levels)

    def _shells(
        self, x: torch.Tensor, levels: list[tuple[int, int]]
    ) -> list[tuple[int, int, int, torch.Tensor]]:
        """Band by band (see ``blocks``), each strip added into the bands it covers; rows
        of level >= c are a prefix since ``levels`` descend."""
        top = levels[0][0]
        rows = [sum(m for lv, m in levels if lv >= c) for c in range(top + 1)]
        out = []
        n0 = 0
        for c, band in enumerate(self._bands[: top + 1]):
            if band is not None:
                n, k = self.levels[c]
                buf = scratch.buffer(f"nested.band{c}", rows[c], n - n0, x, overwritten=True)
                out.append((rows[c], n0, n, band(x[: rows[c], :k], buf)))
                n0 = n
        for c in range(1, top + 1):
            strip = self._strips[c]
            if strip is not None:
                k0, k = self.levels[c - 1][1], self.levels[c][1]
                buf = scratch.buffer("nested.strip", rows[c], strip.n, x, overwritten=True)
                part = strip(x[: rows[c], k0:k], buf)
                for _, b0, b1, y in out:
                    if b1 <= strip.n:  # bands below level c: the strip's rows cover them
                        y[: rows[c]] += part[:, b0:b1]
        return out

    def narrow(self, x: torch.Tensor, rows_of: int, cols_of: int) -> torch.Tensor:
        """``x[:, :k] @ W[:n, :k].T (+ bias[:n])`` with ``n`` of budget ``rows_of`` and
        ``k`` of budget ``cols_of`` (``k`` at most ``rows_of``'s): the rows of a larger
        budget at a smaller one's input width. ``x`` holds at least ``k`` columns.

        Nested shells run the bands up to ``n`` (inputs zero-padded past ``k``) and only
        the strips up to ``k``; one packed level, on inputs zero-padded to its width."""
        top, low = self.level_of[rows_of], self.level_of[cols_of]
        (n, k_top), k = self.levels[top], self.levels[low][1]
        if self.packing == "views":
            bias = None if self.bias is None else self.bias[:n]
            return F.linear(x[:, :k], self.weight[:n, :k], bias)
        if self._blocked is not None:
            return self._blocked(x, [n], [k])
        padded = F.pad(x[:, :k], (0, k_top - k))
        if self.packing == "per-budget" or top == low:
            return self._one_level(padded, top, None)
        out = x.new_empty(x.shape[0], n)
        n0 = 0
        for c, band in enumerate(self._bands[: top + 1]):
            if band is not None:
                n_c, k_c = self.levels[c]
                out[:, n0:n_c] = band(padded[:, :k_c])
                n0 = n_c
        for c in range(1, low + 1):
            strip = self._strips[c]
            if strip is not None:
                k0, k1 = self.levels[c - 1][1], self.levels[c][1]
                out[:, : strip.n] += strip(padded[:, k0:k1])
        return out

    def _one_level(self, x: torch.Tensor, level: int, out: torch.Tensor | None) -> torch.Tensor:
        n, k = self.levels[level]
        if self.packing == "views":
            bias = None if self.bias is None else self.bias[:n]
            return F.linear(x[:, :k], self.weight[:n, :k], bias)
        if self.packing == "per-budget":
            return self._per_level[level](x[:, :k], out)
        if self._blocked is not None:
            return self._blocked(x, [n], [k], out=out)
        return self._nested(x, [(level, x.shape[0])], out)

    def _nested(
        self, x: torch.Tensor, levels: list[tuple[int, int]], out: torch.Tensor | None
    ) -> torch.Tensor:
        """The shells (``_shells``) copied into one output; a single block is written
        straight into ``out``."""
        top = levels[0][0]
        bands = [(c, b) for c, b in enumerate(self._bands[: top + 1]) if b is not None]
        if len(bands) == 1 and not any(self._strips[: top + 1]):  # one block: no assembly
            return bands[0][1](x[:, : self.levels[bands[0][0]][1]], out)
        if out is None:
            out = x.new_empty(x.shape[0], self.levels[top][0])
        for rows, n0, n, y in self._shells(x, levels):
            out[:rows, n0:n] = y
        return out
