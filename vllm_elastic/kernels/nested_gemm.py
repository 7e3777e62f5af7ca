"""Call the nested-prefix GEMM (``nested_gemm.cpp``; built by ``kernels/build.py``).

It needs an x86-64 CPU with AVX2 and FMA, and fp32 weights; where the CPU has AVX-512 it
runs wider micro-kernels (24 rows per tile instead of 6), chosen at run time (``isa``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.kernels import build
from vllm_elastic.kernels.build import load, unavailable_reason

__all__ = ["BLOCK", "BlockedWeight", "isa", "load", "require", "unavailable_reason"]

BLOCK = 16  # output rows per packed block (nested_gemm.cpp's NR)


def require(dtype: torch.dtype = torch.float32) -> None:
    """Make the kernel ready for ``dtype`` weights (compiled and loaded), or raise
    ElasticConfigError saying why it cannot run here."""
    why = unavailable_reason(dtype)
    if why:
        raise ElasticConfigError(f"elastic.weight_packing: 'blocked' cannot run here: {why}")
    build.load()


def isa(choice: str = "") -> str:
    """The micro-kernels the loaded kernel runs: ``"avx512"`` where the CPU has it (the
    default), else ``"avx2"``. ``choice`` pins one for this process (tests run both);
    ``"avx512"`` on a CPU without it raises RuntimeError."""
    return torch.ops.vllm_elastic.nested_isa(choice)


class BlockedWeight:
    """One weight ``[N, K]`` (and bias) packed for the nested GEMM: every prefix
    ``W[:n, :k]`` is one call, for the bytes of ``W`` (rows padded to a multiple of 16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        require(weight.dtype)
        self.packed = torch.ops.vllm_elastic.nested_pack(weight.detach())
        self.bias = None
        if bias is not None:
            self.bias = bias.new_zeros(self.packed.shape[0] * BLOCK)
            self.bias[: weight.shape[0]] = bias
        self.bytes = self.packed.numel() * self.packed.element_size()

    def __call__(
        self,
        x: torch.Tensor,
        n: Sequence[int],
        k: Sequence[int],
        rows: Sequence[int] = (),
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fill ``out[r, :n_s] = x[r, :k_s] @ W[:n_s, :k_s].T (+ bias)`` for the rows of
        each segment ``s`` (``rows`` empty: one segment of every row); returns ``out``
        (a new ``[rows, max(n)]`` tensor when not given)."""
        if out is None:
            out = x.new_empty(x.shape[0], max(n))
        torch.ops.vllm_elastic.nested_mm(
            out, x, self.packed, self.bias, list(rows), list(n), list(k)
        )
        return out
