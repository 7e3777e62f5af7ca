"""vllm-elastic's own ops: CPU kernels (C++, built from source on first use) and the
registration of its Python graph ops.

``nested_gemm.cpp``: one GEMM over any nested prefix ``W[:n, :k]`` of a single weight
copy, for the ``blocked`` weight packing (see ``models/nested_linear.py``).
``graph_ops.py``: how the Python ops a compiled forward calls are registered.
"""
