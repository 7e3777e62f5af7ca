"""Call the fused Mamba-2 decode step (``mamba_decode.cpp``; built by ``kernels/build.py``)
and decide, per engine, whether it runs (``elastic.mamba_decode``).

One call per layer and decode step does the conv update and the state update of every
decode token, read from the layer's in_proj output in the elastic (rank-major) head order
and written into vLLM's conv and SSM state: no per-head copy of B and C, no gathered
conv input. It runs on x86-64 CPUs with AVX2 + FMA, fp32 model and state; elsewhere (GPU,
other CPUs) the layer calls vLLM's kernels.
"""

from __future__ import annotations

import torch

from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.kernels import build
from vllm_elastic.log import get_logger

logger = get_logger(__name__)


def resolve(option: str, on_cpu: bool, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether the kernel runs, for ``elastic.mamba_decode`` = ``option`` on an engine on
    CPU or not, whose model and Mamba state have ``dtypes``. ``auto``: the kernel where it
    runs (when it fails to build: a warning, and vLLM's kernels); ``kernel`` where it
    cannot run is an ElasticConfigError; ``vllm``: never."""
    if option == "vllm":
        return False
    why = None if on_cpu else "it runs on CPU only"
    for dtype in dtypes:
        why = why or build.unavailable_reason(dtype)
    if why is None:
        try:
            build.load()
            return True
        except ElasticConfigError as e:
            why = str(e)
            if option == "auto":
                logger.warning("vllm-elastic mamba_decode 'auto': %s; using vLLM's kernels", e)
                return False
    if option == "kernel":
        raise ElasticConfigError(f"elastic.mamba_decode: 'kernel' cannot run here: {why}")
    return False


def decode_step(
    out: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, proj: torch.Tensor,
    params: dict[str, torch.Tensor], state_idx: torch.Tensor, token_heads: torch.Tensor | None,
    groups: int, null_block: int,
) -> None:  # fmt: skip
    """Decode tokens' conv + state update: ``out`` ``[T, H, P]`` for the first ``H``
    heads; ``conv_state`` ``[blocks, channels, K-1]`` (any strides), ``ssm_state``
    ``[blocks, heads, P, N]``; ``proj`` ``[T, >= B|C + H*(2P+1)]`` in_proj rows;
    ``state_idx`` ``[T, >= 1]`` (column 0); ``token_heads`` per token (None: ``H``)."""
    torch.ops.vllm_elastic.mamba_decode(
        out, conv_state, ssm_state, proj, params["conv_weight"], params["conv_bias"],
        params["A"], params["D"], params["dt_bias"], state_idx, token_heads, groups,
        null_block,
    )  # fmt: skip
