"""How many tokens each batch row feeds in the current forward (vLLM's forward context).

The elastic model needs it to give every token its row's budget. vLLM keeps it in the
attention metadata of the forward context: ``query_start_loc`` of attention layers, or
for a model without attention layers the Mamba metadata (decodes first, one token
each, then the prefills' ``query_start_loc_p``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _metadata_objects() -> list[Any]:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return []
    meta = get_forward_context().attn_metadata
    if meta is None:
        return []
    if isinstance(meta, list):  # ubatches
        meta = meta[0] if meta else {}
    if isinstance(meta, dict):
        return list(meta.values())
    return [meta]


def row_token_counts() -> np.ndarray | None:
    """Tokens per batch row in this forward, or None in a profile or dummy run."""
    mamba = None
    for meta in _metadata_objects():
        qsl = getattr(meta, "query_start_loc", None)
        if qsl is not None:
            return np.diff(qsl.cpu().numpy())
        if mamba is None and hasattr(meta, "num_decodes") and hasattr(meta, "query_start_loc_p"):
            mamba = meta
    if mamba is None:
        return None
    decode = np.ones(mamba.num_decodes, dtype=np.int64)
    if mamba.query_start_loc_p is None:
        return decode
    return np.concatenate([decode, np.diff(mamba.query_start_loc_p.cpu().numpy())])
