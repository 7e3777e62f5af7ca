"""NemotronH checkpoint tools without an engine: validation of the new axes, slicing
tensor by tensor against hand-written index math, ``annotate`` of a plain checkpoint, and
``inspect`` of Star Elastic's parent (Nemotron Nano v3's real dimensions)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_elastic.checkpoint import (
    annotate,
    budget_report,
    build_random_checkpoint,
    load_elastic_config,
    load_state_dict,
    slice_checkpoint,
)
from vllm_elastic.errors import ElasticConfigError

REPO = Path(__file__).resolve().parents[1]
STAR = REPO / "examples" / "star_elastic"

# 8 Mamba heads x 8 channels in 2 groups (4 heads each); budget "cut" keeps 2 per group,
# i.e. parent heads [0, 1, 4, 5]
SHAPE: dict[str, Any] = dict(
    family="nemotron_h",
    hybrid_override_pattern="ME*-E",
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=40,
    mamba_num_heads=8,
    mamba_head_dim=8,
    n_groups=2,
    ssm_state_size=4,
    conv_kernel=4,
    n_routed_experts=5,
    num_experts_per_tok=2,
    moe_intermediate_size=12,
    moe_shared_expert_intermediate_size=10,
)
CUT = {
    "name": "cut",
    "hidden_size": 24,
    "mamba_num_heads": 4,
    "n_routed_experts": 3,
    "moe_intermediate_size": [None, 8, None, None, 12],
    "moe_shared_expert_intermediate_size": 6,
    "num_attention_heads": 2,
    "layers": [0, 1, 2, 4],
}
KEPT_HEADS = [0, 1, 4, 5]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nemh") / "elastic"
    return build_random_checkpoint(out, budgets=[{"name": "full"}, CUT], **SHAPE)


def _channels(heads: list[int], width: int, offset: int = 0) -> torch.Tensor:
    return torch.cat([torch.arange(offset + h * width, offset + (h + 1) * width) for h in heads])


def test_sliced_tensors_follow_the_nemotron_h_axes(ckpt: Path, tmp_path: Path) -> None:
    p = load_state_dict(ckpt)
    s = load_state_dict(slice_checkpoint(ckpt, "cut", tmp_path / "cut"))
    h, hd, inner, bc = 24, 8, 64, 2 * 4  # inner = 8 heads x 8, bc = groups x state
    a, b = "backbone.layers.0.mixer.", "backbone.layers.0.mixer."
    x = _channels(KEPT_HEADS, hd)
    rows = torch.cat([x, inner + x, torch.arange(2 * inner, 2 * inner + 2 * bc),
                      2 * inner + 2 * bc + torch.tensor(KEPT_HEADS)])  # fmt: skip
    assert torch.equal(s[b + "in_proj.weight"], p[a + "in_proj.weight"][rows, :h])
    conv = torch.cat([x, torch.arange(inner, inner + 2 * bc)])
    assert torch.equal(s[b + "conv1d.weight"], p[a + "conv1d.weight"][conv])
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(s[b + name], p[a + name][KEPT_HEADS])
    assert torch.equal(s[b + "norm.weight"], p[a + "norm.weight"][x])
    assert torch.equal(s[b + "out_proj.weight"], p[a + "out_proj.weight"][:h, x])
    # MoE layer 1: the first 3 experts, 8 of 12 channels, padded to the widest kept E layer
    a, b = "backbone.layers.1.mixer.", "backbone.layers.1.mixer."
    assert torch.equal(s[b + "gate.weight"], p[a + "gate.weight"][:3, :h])
    assert torch.equal(
        s[b + "gate.e_score_correction_bias"], p[a + "gate.e_score_correction_bias"][:3]
    )
    assert f"{b}experts.3.up_proj.weight" not in s
    up = s[b + "experts.2.up_proj.weight"]
    assert up.shape == (12, h) and not up[8:].any()
    assert torch.equal(up[:8], p[a + "experts.2.up_proj.weight"][:8, :h])
    assert torch.equal(s[b + "shared_experts.down_proj.weight"],
                       p[a + "shared_experts.down_proj.weight"][:h, :6])  # fmt: skip
    # attention layer 2: q heads 0 and 2 (one per KV group), every KV head
    q = _channels([0, 2], 8)
    assert torch.equal(s["backbone.layers.2.mixer.q_proj.weight"],
                       p["backbone.layers.2.mixer.q_proj.weight"][q, :h])  # fmt: skip
    # layer 3 (MLP) is skipped: parent layer 4 becomes layer 3
    assert torch.equal(s["backbone.layers.3.norm.weight"], p["backbone.layers.4.norm.weight"][:h])
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["layers_block_type"] == ["linear_attention", "moe", "full_attention", "moe"]
    assert (config["mamba_num_heads"], config["n_groups"], config["n_routed_experts"]) == (4, 2, 3)


@pytest.mark.parametrize(
    "budget,match",
    [
        ({"mamba_num_heads": 3}, r"mamba_num_heads: 3 is not a multiple of n_groups=2"),
        ({"mamba_num_heads": 10}, r"mamba_num_heads: 10 exceeds the parent's 8"),
        ({"n_routed_experts": 1}, r"n_routed_experts: 1 routed experts must be at least 2"),
        ({"moe_intermediate_size": [None, 8, None, 3]}, r"per-layer list needs 5 entries"),
        ({"moe_intermediate_size": [8, 8, 8, 8, None]}, r"moe_intermediate_size\[4\]: expected"),
        ({"mamba_head_dim": 4}, r"unknown field\(s\) \['mamba_head_dim'\]"),
    ],
)
def test_invalid_nemotron_h_budgets_name_the_field(tmp_path: Path, budget, match) -> None:
    with pytest.raises(ElasticConfigError, match=match):
        build_random_checkpoint(tmp_path, budgets=[{"name": "full"}, {"name": "x", **budget}],
                                **SHAPE)  # fmt: skip
    assert not (tmp_path / "model.safetensors").exists()


def test_annotate_links_a_plain_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    """A plain NemotronH folder plus a budget list is an elastic checkpoint: config
    rewritten, weights linked (not copied), the same tensors."""
    plain = slice_checkpoint(ckpt, "full", tmp_path / "plain")
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps([{"name": "full"}, CUT]))
    out = annotate(plain, budgets, tmp_path / "annotated")
    assert os.path.islink(out / "model.safetensors")
    config = load_elastic_config(out)
    assert config.architectures == ["ElasticNemotronHForCausalLM"]
    assert config.elastic_spec.names == ["full", "cut"]
    assert load_state_dict(out).keys() == load_state_dict(ckpt).keys()
    with pytest.raises(ElasticConfigError, match="mamba_num_heads"):
        annotate(plain, {"budgets": [{"name": "full"}, {"name": "x", "mamba_num_heads": 5}]},
                 tmp_path / "bad")  # fmt: skip


def test_star_elastic_parent_reports_its_published_sizes(tmp_path: Path) -> None:
    """Nemotron Nano v3 (52 layers) with our 23B / 12B budgets: 31.6B total and 3.6B
    active (embedding and lm_head counted) for the parent, near 23B/2.8A and 12B/2.0A."""
    out = annotate(STAR, STAR / "budgets.json", tmp_path / "star")
    rows = {r["name"]: r for r in budget_report(out)}
    full = rows["30b"]
    assert full["parameters"] == pytest.approx(31.58e9, rel=2e-3)
    assert full["active_parameters"] == pytest.approx(3.58e9, rel=2e-3)
    assert rows["23b"]["parameters"] == pytest.approx(23e9, rel=0.03)
    assert rows["23b"]["active_parameters"] == pytest.approx(2.8e9, rel=0.03)
    assert rows["12b"]["parameters"] == pytest.approx(12e9, rel=0.03)
    assert rows["12b"]["active_parameters"] == pytest.approx(2.0e9, rel=0.03)
    assert full["num_layers"] == 52 and full["mamba_num_heads"] == 64


def test_reuse_state_write_flops_count_the_answer_heads_in_proj_rows(
    ckpt: Path, tmp_path: Path
) -> None:
    """A ``reuse`` thinking token at ``cut`` writes ``full``'s Mamba heads: per Mamba
    layer both keep, the in_proj rows ``full`` has beyond ``cut``'s, at ``cut``'s width
    (rows read off the parent's and the sliced checkpoint's tensors); none the other way."""
    from vllm_elastic.spec.cost import reuse_state_write_flops

    name = "backbone.layers.0.mixer.in_proj.weight"  # the pattern's one Mamba layer
    wide = load_state_dict(ckpt)[name]
    narrow = load_state_dict(slice_checkpoint(ckpt, "cut", tmp_path / "cut"))[name]
    config = load_elastic_config(ckpt)
    cut, full = config.elastic_spec.get("cut"), config.elastic_spec.get("full")
    want = 2 * (wide.shape[0] - narrow.shape[0]) * narrow.shape[1]
    assert reuse_state_write_flops(config, cut, full) == want > 0
    assert reuse_state_write_flops(config, full, full) == 0
    assert reuse_state_write_flops(config, cut, cut) == 0
