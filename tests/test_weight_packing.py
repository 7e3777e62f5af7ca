"""Weight storage of the elastic projections (``additional_config.elastic.weight_packing``).

On CPU the default (``auto``) packs each projection once, in 16-row blocks for our nested
GEMM kernel where it runs (x86-64 AVX2, fp32), else as nested shells for oneDNN, and drops
the plain parameter: one copy of the weights serves every budget. Every packing must give
the same tokens as stock vLLM on the sliced checkpoints.
"""

from __future__ import annotations

import pytest
from conftest import CHECKPOINTS, assert_same_output, budget_names, greedy

from vllm_elastic.kernels import nested_gemm

CHAIN = "llama_chain"


def _projection_bytes(cfg: dict) -> int:
    """fp32 bytes of every layer's q/k/v/o/gate/up/down weights in the parent."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = (q + 2 * kv) * h + h * q + 3 * inter * h
    return 4 * per_layer * cfg["num_hidden_layers"]


def test_chain_is_packed_once_by_default(elastic_llm):
    llm = elastic_llm(CHAIN)

    def inspect(model):
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        weights = (attn.qkv_weight, attn.o_weight, mlp.up_weight, mlp.down_weight)
        plain = sum(w.numel() for w in weights)
        return model.weight_packing, model.packed_weight_bytes(), plain

    packing, packed, plain = llm.apply_model(inspect)[0]
    default = "nested" if nested_gemm.unavailable_reason() else "blocked"
    assert packing == {
        "requested": "auto",
        "qkv": default,
        "o": default,
        "gate_up": default,
        "down": default,
    }
    assert packed == _projection_bytes(CHECKPOINTS[CHAIN])  # exactly one copy
    assert plain == 0  # the unpacked parameters were released


def _mixed_batch(name, refs, prompts):
    batch, extra, max_tokens, want = [], [], [], []
    for i, prompt in enumerate(prompts):
        for j, b in enumerate(budget_names(name)):
            m = 5 + (3 * i + 4 * j) % 8
            batch.append(prompt)
            extra.append({"elastic_budget": b})
            max_tokens.append(m)
            ids, lps = refs[b][i]
            want.append((ids[:m], lps[:m]))
    return batch, extra, max_tokens, want


@pytest.mark.parametrize("packing", ["nested", "blocked", "per-budget", "views"])
def test_every_packing_matches_the_sliced_checkpoints(packing, reference, elastic_llm, prompts):
    refs = {b: reference(CHAIN, b) for b in budget_names(CHAIN)}
    llm = elastic_llm(CHAIN, additional_config={"elastic": {"weight_packing": packing}})
    used = llm.apply_model(lambda model: model.weight_packing)[0]
    assert used["requested"] == packing and used["down"] == packing
    batch, extra, max_tokens, want = _mixed_batch(CHAIN, refs, prompts)
    got = greedy(llm, batch, extra, max_tokens)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"{packing} request {k} ({extra[k]['elastic_budget']})")


def test_non_chain_projection_falls_back_to_views_with_nested_shells(elastic_llm):
    """llama_bias's budgets are not nested in qkv (q_thin is narrower but keeps more
    heads than kv_half): nested shells cannot hold that projection, which keeps its plain
    weight; the others pack. The nested GEMM (``auto`` where it runs) takes any prefixes."""
    used = elastic_llm(
        "llama_bias", additional_config={"elastic": {"weight_packing": "nested"}}
    ).apply_model(lambda model: model.weight_packing)[0]
    assert used["qkv"] == "views"
    assert used["down"] == "nested"
    if not nested_gemm.unavailable_reason():
        used = elastic_llm("llama_bias").apply_model(lambda model: model.weight_packing)[0]
        assert used["qkv"] == used["down"] == "blocked"


def test_unknown_packing_is_rejected_at_start(checkpoint):
    from vllm import LLM

    # vLLM's config (pydantic) wraps the plugin's ElasticConfigError in a ValueError
    with pytest.raises(ValueError, match="elastic.weight_packing: expected one of"):
        LLM(
            str(checkpoint(CHAIN)),
            dtype="float32",
            additional_config={"elastic": {"weight_packing": "zip"}},
        )


@pytest.mark.parametrize("packing", ["nested", "per-budget"])
def test_mlp_windows_match_the_sliced_checkpoints(packing, reference, elastic_llm, prompts):
    """Long prefills run the MLP ``mlp_window`` rows at a time; a window of 5 rows cuts
    every budget's run (and the tests' 64-token steps) at odd places."""
    refs = {b: reference(CHAIN, b) for b in budget_names(CHAIN)}
    options = {"weight_packing": packing, "mlp_window": 5}
    llm = elastic_llm(CHAIN, additional_config={"elastic": options})
    assert llm.apply_model(lambda model: model.layers[0].mlp.mlp_window)[0] == 5
    batch, extra, max_tokens, want = _mixed_batch(CHAIN, refs, prompts)
    got = greedy(llm, batch, extra, max_tokens)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same_output(g, w, f"{packing} window request {k} ({extra[k]['elastic_budget']})")


def test_budgets_with_fewer_kv_heads_attend_over_their_own_heads(elastic_llm, prompts, monkeypatch):
    """On vLLM's CPU backend a one-budget batch that keeps fewer KV groups reads only its
    KV groups of the cache (``compat/cpu_attention.py``; the exactness tests check its
    outputs): the own-heads kernel call runs and returns the attention output."""
    from vllm_elastic.compat import cpu_attention

    calls = []
    real = cpu_attention.attend

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_attention, "attend", spy)
    llm = elastic_llm(CHAIN)
    greedy(llm, prompts[:2], [{"elastic_budget": "small"}] * 2, 3)
    assert calls and all(calls), calls
