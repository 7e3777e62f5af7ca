"""vllm-elastic: serve elastic nested LLMs (one checkpoint, many budgets) in one vLLM engine."""

__version__ = "0.1.0"
