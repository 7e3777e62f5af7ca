"""Build, load and call the nested-prefix GEMM (``nested_gemm.cpp``).

The kernel is compiled the first time an engine asks for ``weight_packing: blocked``,
with torch's extension builder (a C++ compiler and ninja are needed); torch caches the
build under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later
engines only load it. It needs an x86-64 CPU with AVX2 and FMA, and fp32 weights; where
the CPU has AVX-512 it runs wider micro-kernels (24 rows per tile instead of 6), chosen
at run time (``isa``).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.log import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("nested_gemm.cpp")
EXTENSION = "vllm_elastic_kernels"
BLOCK = 16  # output rows per packed block (nested_gemm.cpp's NR)

_loaded = False


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the nested GEMM cannot serve this machine and dtype, or None if it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"it needs AVX2 and FMA, torch reports CPU capability {capability}"
    if dtype != torch.float32:
        return f"it runs float32 weights only, the model is {dtype}"
    return None


def require(dtype: torch.dtype = torch.float32) -> None:
    """Make the kernel ready for ``dtype`` weights (compiled and loaded), or raise
    ElasticConfigError saying why it cannot run here."""
    why = unavailable_reason(dtype)
    if why:
        raise ElasticConfigError(f"elastic.weight_packing: 'blocked' cannot run here: {why}")
    load()


def load() -> None:
    """Compile (first use on this machine) and load the kernel; ElasticConfigError if
    that fails, with the compiler's reason."""
    global _loaded
    if _loaded:
        return
    from torch.utils.cpp_extension import load as build

    start = time.perf_counter()
    try:
        build(
            name=EXTENSION,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing, build error: say which
        raise ElasticConfigError(
            "elastic.weight_packing 'blocked': building the nested GEMM kernel "
            f"({SOURCE.name}) failed; it needs a C++ compiler (g++) and ninja: {e}"
        ) from e
    _loaded = True
    logger.info(
        "vllm-elastic nested GEMM kernel ready in %.1f s (%s micro-kernels)",
        time.perf_counter() - start,
        isa(),
    )


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
