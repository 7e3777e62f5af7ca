"""Build and load the plugin's C++ CPU kernels (one torch extension, ``vllm_elastic_kernels``).

The kernels are compiled the first time an engine needs one, with torch's extension
builder (a C++ compiler and ninja are needed); torch caches the build under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later engines only
load it. They need an x86-64 CPU with AVX2 and FMA, and run fp32.

* ``nested_gemm.cpp``: one GEMM over any nested prefix of one weight copy (``blocked``
  weight packing, ``kernels/nested_gemm.py``);
* ``mamba_decode.cpp``: an elastic Mamba-2 layer's decode step (conv + state update) in
  the elastic head order (``compat/mamba.py``);
* ``mamba_norm.cpp``: its gated RMSNorm for the rows of every budget of a batch in one
  pass (``kernels/mamba_norm.py``);
* ``silu_mul.cpp``: a gated MLP's ``SiLU(gate) * up`` for the rows of every budget in one
  pass (``kernels/silu_mul.py``);
* ``seg_norm.cpp``: the fused add-RMSNorm of a mixed batch stacked in one buffer, every
  budget's rows at their width in one pass (``kernels/seg_norm.py``).

``vec_math.h`` holds the vector exp / SiLU they share.
"""

from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path

import torch

from vllm_elastic.errors import ElasticConfigError
from vllm_elastic.log import get_logger

logger = get_logger(__name__)

SOURCES = [
    Path(__file__).with_name(n)
    for n in (
        "nested_gemm.cpp",
        "mamba_decode.cpp",
        "mamba_norm.cpp",
        "silu_mul.cpp",
        "seg_norm.cpp",
    )
]
EXTENSION = "vllm_elastic_kernels"

_loaded = False


def unavailable_reason(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernels cannot serve this machine and dtype, or None if they can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs an x86-64 CPU, this is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"it needs AVX2 and FMA, torch reports CPU capability {capability}"
    if dtype != torch.float32:
        return f"it runs float32 only, the model is {dtype}"
    return None


def _headers_hash() -> str:
    """A digest of the shared headers: torch rebuilds a cached extension when its sources
    or flags change, and this flag carries the headers' content into that check."""
    digest = hashlib.sha256()
    for header in sorted(Path(__file__).parent.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def load() -> None:
    """Compile (first use on this machine) and load the kernels; ElasticConfigError if
    that fails, with the compiler's reason."""
    global _loaded
    if _loaded:
        return
    from torch.utils.cpp_extension import load as build

    start = time.perf_counter()
    try:
        build(
            name=EXTENSION,
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", f"-DHEADERS={_headers_hash()}"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing, build error: say which
        raise ElasticConfigError(
            "building vllm-elastic's CPU kernels "
            f"({', '.join(s.name for s in SOURCES)}) failed; they need a C++ compiler "
            f"(g++) and ninja: {e}"
        ) from e
    _loaded = True
    logger.info(
        "vllm-elastic CPU kernels ready in %.1f s (%s GEMM micro-kernels)",
        time.perf_counter() - start,
        torch.ops.vllm_elastic.nested_isa(""),
    )
