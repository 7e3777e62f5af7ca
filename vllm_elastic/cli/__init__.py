"""The ``vllm-elastic`` command line (``python -m vllm_elastic.cli``)."""
