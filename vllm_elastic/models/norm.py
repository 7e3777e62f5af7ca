"""RMSNorm over a budget's first channels, with vLLM's fused CPU kernels where they apply.

vLLM's IR picks the PyTorch-native RMSNorm on CPU (about eight tensor ops per call); its
CPU build also ships fused kernels, one pass each, for widths that are a multiple of 8.
The elastic forward calls the norms once per budget group and layer, so it uses those
kernels when it can and vLLM's IR op otherwise.
"""

from __future__ import annotations

import torch
from vllm import ir

from vllm_elastic.compat import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight[:width]`` (a new tensor)."""
    w = weight[: x.shape[-1]]
    if cpu_kernels.has_norm_kernel(x, fused=False):
        x = x.contiguous()
        out = torch.empty_like(x)
        cpu_kernels.rms_norm(out, x, w, eps)
        return out
    return ir.ops.rms_norm(x, w, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; may overwrite ``x`` and ``residual``
    (a contiguous ``residual`` is updated in place by the CPU kernel)."""
    w = weight[: x.shape[-1]]
    x = x.contiguous()
    if cpu_kernels.has_norm_kernel(x, fused=True) and residual.is_contiguous():
        cpu_kernels.fused_add_rms_norm_(x, residual, w, eps)
        return x, residual
    return ir.ops.fused_add_rms_norm(x, residual, w, eps)


def add_norm(
    weight: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm: ``(rms_norm(x + residual), x + residual)`` (``residual`` None: the
    first layer, whose input is the residual)."""
    if residual is None:
        return rms_norm(x, weight, eps), x
    return fused_add_rms_norm(x, residual, weight, eps)
