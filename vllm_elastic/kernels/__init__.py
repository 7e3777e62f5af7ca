"""vllm-elastic's own ops: CPU kernels (C++, built from source on first use by
``build.py``) and the registration of its Python graph ops.

``nested_gemm.cpp``: one GEMM over any nested prefix ``W[:n, :k]`` of a single weight
copy, for the ``blocked`` weight packing (see ``models/nested_linear.py``).
``mamba_decode.cpp``: an elastic Mamba-2 layer's decode step (conv + state update) in the
elastic head order, straight from in_proj's output (``mamba_decode.py``).
``graph_ops.py``: how the Python ops a compiled forward calls are registered.
"""
