"""vllm-elastic's own CPU kernels (C++), built from source on first use.

``nested_gemm.cpp``: one GEMM over any nested prefix ``W[:n, :k]`` of a single weight
copy, for the ``blocked`` weight packing (see ``models/nested_linear.py``).
"""
