"""Which recurrent (Mamba) state a token writes: the rule the model runs and costs read.

A token of budget ``b`` whose request's answer reads budget ``s``'s Mamba heads (a
``reuse`` request thinking at ``b``, answering at ``s``) writes the conv and SSM state of
``s``'s heads. Its in_proj runs at ``b``'s hidden width over the rows of the *covering*
budget: the smallest budget with at least ``s``'s heads and ``b``'s width (budgets are
nested, so its rows hold B, C and every head ``s`` reads). A request that never switches
covers itself and writes only its own heads.
"""

from __future__ import annotations

from vllm_elastic.spec.budgets import ElasticSpec

HEADS = "mamba_num_heads"


def cover(spec: ElasticSpec, budget: int, state: int) -> int:
    """Index of the smallest budget with ``state``'s Mamba heads (at least) and
    ``budget``'s hidden width."""
    heads = [b.size(HEADS) for b in spec.budgets]
    hidden = [b.hidden_size for b in spec.budgets]
    need = max(heads[budget], heads[state])
    fits = [i for i in range(len(spec.budgets)) if heads[i] >= need and hidden[i] >= hidden[budget]]
    return min(fits, key=lambda i: (heads[i], hidden[i]))


def covering_table(spec: ElasticSpec) -> list[list[int]]:
    """``table[b][s] = cover(spec, b, s)`` for every pair of budgets."""
    n = len(spec.budgets)
    return [[cover(spec, b, s) for s in range(n)] for b in range(n)]
