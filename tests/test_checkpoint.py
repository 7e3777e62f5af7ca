"""Checkpoint I/O: random checkpoints, budget validation, slicing, reports and the CLI.

No vLLM engine: everything runs on plain torch / transformers / safetensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_elastic.checkpoint import (
    PRESETS,
    UnknownBudgetError,
    budget_report,
    build_random_checkpoint,
    load_elastic_config,
    load_state_dict,
    slice_checkpoint,
)
from vllm_elastic.checkpoint.tokenizer import THINK_START
from vllm_elastic.cli.checkpoint_cmds import parse_budget_spec
from vllm_elastic.cli.main import main
from vllm_elastic.errors import ElasticConfigError

REPO = Path(__file__).resolve().parents[1]

# Parent: 8 query heads over 2 KV heads (group 4), 4 layers. Budget "cut" keeps 2 of 4
# query heads per group, so its query heads are not a prefix: parent heads [0, 1, 4, 5].
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "intermediate_size": 96,
}
CUT = {
    "name": "cut",
    "hidden_size": 48,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": [80, 96, 32, 48],
    "layers": [0, 2, 3],
}
CUT_HEADS = [0, 1, 4, 5]
BUDGETS = [{"name": "full"}, CUT]


def _build(out: Path, family: str = "llama", **kwargs: Any) -> Path:
    """A small random checkpoint with the SHAPE parent (and BUDGETS unless given)."""
    kwargs.setdefault("budgets", BUDGETS)
    return build_random_checkpoint(out, family=family, **{**SHAPE, **kwargs})


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    """Random checkpoint with every optional tensor kind (biases; qwen3's q/k norms)."""
    extra = {"mlp_bias": True} if family == "llama" else {}
    out = tmp_path_factory.mktemp(f"elastic-{family}")
    return _build(out, family, attention_bias=True, **extra)


# --------------------------------------------------------------------------- random


def test_random_checkpoint_is_deterministic(tmp_path: Path) -> None:
    a = _build(tmp_path / "a", seed=3)
    b = _build(tmp_path / "b", seed=3)
    c = _build(tmp_path / "c", seed=4)
    weights = "model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    ta, tc = load_file(a / weights), load_file(c / weights)
    assert ta.keys() == tc.keys()
    assert not torch.equal(
        ta["model.layers.0.self_attn.q_proj.weight"], tc["model.layers.0.self_attn.q_proj.weight"]
    )


def test_random_checkpoint_layout(ckpt: Path, family: str) -> None:
    config = load_elastic_config(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tensors = load_state_dict(ckpt)
    assert config.model_type == f"elastic_{family}"
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.head_dim == SHAPE["head_dim"]
    assert tensors["model.embed_tokens.weight"].shape == (len(tokenizer), 64)
    assert tensors["lm_head.weight"].shape == (len(tokenizer), 64)
    assert tensors["model.layers.3.self_attn.q_proj.weight"].shape == (64, 64)
    assert tensors["model.layers.3.self_attn.k_proj.bias"].shape == (16,)
    assert ("model.layers.0.self_attn.q_norm.weight" in tensors) == (family == "qwen3")
    assert ("model.layers.0.mlp.down_proj.bias" in tensors) == (family == "llama")
    assert all(t.is_contiguous() for t in tensors.values())


def test_tied_bfloat16_checkpoint(tmp_path: Path) -> None:
    out = _build(tmp_path / "t", tie_word_embeddings=True, dtype="bfloat16")
    tensors = load_state_dict(out)
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    full = budget_report(out)[0]
    assert full["parameters"] == sum(t.numel() for t in tensors.values())
    assert full["bytes"] == 2 * full["parameters"]


def test_tokenizer_words_and_chat_template(ckpt: Path) -> None:
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("what is the time ?")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["what", "is", "the", "time", "?"]  # no BOS
    assert tok.decode(ids) == "what is the time ?"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|> hello <|assistant|> <think>"
    ids = tok(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-1] == THINK_START
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


# --------------------------------------------------------------------------- validation

_INVALID = [
    ("too_big", [{"name": "full"}, {"name": "x", "hidden_size": 128}], {}, "hidden_size"),
    ("zero", [{"name": "full"}, {"name": "x", "intermediate_size": 0}], {}, "intermediate"),
    (
        "q_not_multiple",
        [{"name": "full"}, {"name": "x", "num_attention_heads": 3}],
        {},
        "num_attention_heads: 3 is not a multiple of num_key_value_heads=2",
    ),
    (
        "group_too_big",
        [{"name": "full"}, {"name": "x", "num_attention_heads": 8, "num_key_value_heads": 1}],
        {},
        r"num_attention_heads: .*more than the parent's 4 per group",
    ),
    ("unknown_layer", [{"name": "full"}, {"name": "x", "layers": [0, 7]}], {}, "layers"),
    ("dup_layer", [{"name": "full"}, {"name": "x", "layers": [1, 1]}], {}, "layers: dup"),
    ("dup_name", [{"name": "full"}, {"name": "full", "hidden_size": 32}], {}, "duplicate"),
    ("no_full", [{"name": "x", "hidden_size": 32}], {}, "no full budget"),
    ("bad_default", BUDGETS, {"default_budget": "nope"}, "default_budget"),
    (
        "inter_list_len",
        [{"name": "full"}, {"name": "x", "intermediate_size": [32, 32]}],
        {},
        "intermediate_size: a per-layer list needs 4",
    ),
]


@pytest.mark.parametrize(
    ("budgets", "extra", "match"),
    [case[1:] for case in _INVALID],
    ids=[case[0] for case in _INVALID],
)
def test_invalid_budgets_name_the_field(
    tmp_path: Path, budgets: list[dict[str, Any]], extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(ElasticConfigError, match=match):
        _build(tmp_path / "bad", budgets=budgets, **extra)
    assert not (tmp_path / "bad").exists()  # validated before anything is written


def test_load_elastic_config_errors(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(ElasticConfigError, match="no config.json"):
        load_elastic_config(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ElasticConfigError, match="model_type"):
        load_elastic_config(tmp_path)
    del raw["elastic"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ElasticConfigError, match="elastic"):
        load_elastic_config(tmp_path)


# --------------------------------------------------------------------------- slicing


def test_sliced_full_budget_equals_parent(ckpt: Path, tmp_path: Path, family: str) -> None:
    out = slice_checkpoint(ckpt, "full", tmp_path / "full")
    config = json.loads((out / "config.json").read_text())
    assert "elastic" not in config
    assert config["model_type"] == family
    parent, sliced = load_state_dict(ckpt), load_state_dict(out)
    assert parent.keys() == sliced.keys()
    for name, tensor in parent.items():
        assert torch.equal(tensor, sliced[name]), name


def test_sliced_budget_loads_in_transformers(ckpt: Path, tmp_path: Path, family: str) -> None:
    out = slice_checkpoint(ckpt, "cut", tmp_path / "cut")
    raw = json.loads((out / "config.json").read_text())
    assert "elastic" not in raw
    assert raw["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    ]
    assert (raw["hidden_size"], raw["num_hidden_layers"], raw["intermediate_size"]) == (48, 3, 80)
    assert (raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]) == (4, 2, 8)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("the dog saw the cat .")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_sliced_tensors_are_the_budget_slices(ckpt: Path, tmp_path: Path, family: str) -> None:
    spec = load_elastic_config(ckpt).elastic_spec
    assert spec.get("cut").kept_query_heads(spec.parent) == CUT_HEADS
    p = load_state_dict(ckpt)
    s = load_state_dict(slice_checkpoint(ckpt, "cut", tmp_path / "cut"))
    hd, h, kv_rows = 8, 48, 2 * 8
    q_rows = torch.cat([torch.arange(i * hd, (i + 1) * hd) for i in CUT_HEADS])
    for new, old in enumerate(CUT["layers"]):  # parent layers 0, 2, 3 -> 0, 1, 2
        a, b = f"model.layers.{old}.", f"model.layers.{new}."
        assert torch.equal(
            s[b + "self_attn.q_proj.weight"], p[a + "self_attn.q_proj.weight"][q_rows, :h]
        )
        assert torch.equal(s[b + "self_attn.q_proj.bias"], p[a + "self_attn.q_proj.bias"][q_rows])
        assert torch.equal(
            s[b + "self_attn.k_proj.weight"], p[a + "self_attn.k_proj.weight"][:kv_rows, :h]
        )
        assert torch.equal(s[b + "self_attn.v_proj.bias"], p[a + "self_attn.v_proj.bias"][:kv_rows])
        assert torch.equal(
            s[b + "self_attn.o_proj.weight"], p[a + "self_attn.o_proj.weight"][:h, q_rows]
        )
        assert torch.equal(s[b + "self_attn.o_proj.bias"], p[a + "self_attn.o_proj.bias"][:h])
        assert torch.equal(s[b + "input_layernorm.weight"], p[a + "input_layernorm.weight"][:h])
        if family == "qwen3":
            assert torch.equal(s[b + "self_attn.k_norm.weight"], p[a + "self_attn.k_norm.weight"])
        inter = CUT["intermediate_size"][old]
        gate = s[b + "mlp.gate_proj.weight"]
        down = s[b + "mlp.down_proj.weight"]
        assert gate.shape == (80, h) and down.shape == (h, 80)  # widest KEPT layer
        assert torch.equal(gate[:inter], p[a + "mlp.gate_proj.weight"][:inter, :h])
        assert torch.equal(down[:, :inter], p[a + "mlp.down_proj.weight"][:h, :inter])
        assert not gate[inter:].any() and not down[:, inter:].any()  # zero padding
        assert not s[b + "mlp.up_proj.weight"][inter:].any()
        if family == "llama":
            assert not s[b + "mlp.gate_proj.bias"][inter:].any()
            assert torch.equal(s[b + "mlp.down_proj.bias"], p[a + "mlp.down_proj.bias"][:h])
    assert "model.layers.3.input_layernorm.weight" not in s
    assert torch.equal(s["model.embed_tokens.weight"], p["model.embed_tokens.weight"][:, :h])
    assert torch.equal(s["lm_head.weight"], p["lm_head.weight"][:, :h])
    assert torch.equal(s["model.norm.weight"], p["model.norm.weight"][:h])


def test_zero_padding_keeps_mlp_outputs(ckpt: Path, tmp_path: Path) -> None:
    """The padded MLP of a narrow layer equals the same MLP at its true width."""
    out = slice_checkpoint(ckpt, "cut", tmp_path / "cut")
    model = AutoModelForCausalLM.from_pretrained(out)
    mlp = model.model.layers[1].mlp  # parent layer 2: intermediate 32, padded to 80
    inter = CUT["intermediate_size"][2]
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    linear = torch.nn.functional.linear
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    bias = (lambda b: b[:inter]) if gate.bias is not None else (lambda b: None)
    with torch.no_grad():
        act = torch.nn.functional.silu(linear(x, gate.weight[:inter], bias(gate.bias)))
        act = act * linear(x, up.weight[:inter], bias(up.bias))
        expected = linear(act, down.weight[:, :inter], down.bias)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_budget(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownBudgetError, match=r"'nope'.*\['full', 'cut'\]"):
        slice_checkpoint(ckpt, "nope", tmp_path / "x")
    with pytest.raises(KeyError):
        slice_checkpoint(ckpt, "nope", tmp_path / "x")


# --------------------------------------------------------------------------- report


def test_budget_report_counts(ckpt: Path, tmp_path: Path) -> None:
    full, cut = budget_report(ckpt)
    parent = load_state_dict(ckpt)
    assert (full["name"], full["default"], full["fraction"]) == ("full", True, 1.0)
    assert full["parameters"] == sum(t.numel() for t in parent.values())
    assert full["bytes"] == 4 * full["parameters"]
    assert cut["intermediate_size"] == "32-80"
    assert cut["intermediate_sizes"] == [80, 32, 48]
    assert (cut["num_layers"], cut["layers"]) == (3, [0, 2, 3])
    sliced = load_state_dict(slice_checkpoint(ckpt, "cut", tmp_path / "cut"))
    padding = sum(3 * 48 * (80 - i) for i in cut["intermediate_sizes"])
    if "model.layers.0.mlp.gate_proj.bias" in sliced:
        padding += sum(2 * (80 - i) for i in cut["intermediate_sizes"])
    assert cut["parameters"] == sum(t.numel() for t in sliced.values()) - padding
    assert cut["fraction"] == pytest.approx(cut["parameters"] / full["parameters"])


def _uniform_presets() -> list[str]:
    """Presets whose budgets have one size per axis (a standalone config holds them)."""
    return [
        name
        for name, kwargs in PRESETS.items()
        if not any(
            isinstance(v, list) and k != "layers" for b in kwargs["budgets"] for k, v in b.items()
        )
    ]


@pytest.mark.parametrize("preset", _uniform_presets())
def test_preset_parameters_match_transformers(preset: str, tmp_path: Path) -> None:
    """``inspect``'s parameter count of every budget equals that of the budget's
    standalone model as transformers builds it (meta device: no weights are made),
    counting what a checkpoint stores: parameters once, persistent buffers."""
    from vllm_elastic.checkpoint.slicing import plain_config
    from vllm_elastic.spec.families import family_named

    kwargs = PRESETS[preset]
    cls = family_named(kwargs["family"]).config_cls
    shape = {k: v for k, v in kwargs.items() if k not in ("family", "budgets")}
    config = cls(elastic={"budgets": kwargs["budgets"]}, vocab_size=273, **shape)
    config.save_pretrained(tmp_path)
    counts = []
    for budget in config.elastic_spec.budgets:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(plain_config(config, budget))
        saved = model.state_dict()  # persistent buffers too (MoE e_score_correction_bias)
        buffers = [b for n, b in model.named_buffers() if n in saved]
        counts.append(sum(t.numel() for t in [*model.parameters(), *buffers]))
    rows = budget_report(tmp_path)
    assert [row["parameters"] for row in rows] == counts
    assert [row["fraction"] for row in rows] == pytest.approx([c / counts[0] for c in counts])


# --------------------------------------------------------------------------- CLI


def test_cli_inspect_json(tmp_path: Path) -> None:
    """Through ``python -m`` (one family only: the interpreter start is the slow part)."""
    ckpt = _build(tmp_path / "c")
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_elastic.cli", "inspect", str(ckpt), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ["full", "cut"]
    parent = load_state_dict(ckpt)
    assert rows[0]["parameters"] == sum(t.numel() for t in parent.values())


def test_cli_inspect_table(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "budget"
    assert lines[1].startswith("full *") and lines[2].startswith("cut")
    assert len({len(line) for line in lines}) == 1  # right-aligned last column


def test_cli_inspect_broken_config(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    raw["elastic"]["budgets"][1]["num_key_value_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "num_key_value_heads" in err


def test_cli_random_and_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = "lite:hidden=32,heads=2,kv_heads=1,intermediate=48/32/48,layers=0-2"
    args = ["random", str(tmp_path / "r"), "--preset", "tiny", "--layers", "3"]
    assert main([*args, "--budget", "full", "--budget", spec, "--family", "qwen3"]) == 0
    rows = budget_report(tmp_path / "r")
    assert [r["name"] for r in rows] == ["full", "lite"]
    assert rows[1]["intermediate_sizes"] == [48, 48]
    assert main(["slice", str(tmp_path / "r"), "--budget", "lite", "-o", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["model_type"] == "qwen3"
    assert main(["slice", str(tmp_path / "r"), "--budget", "x", "-o", str(tmp_path / "x")]) == 2
    assert "'x'" in capsys.readouterr().err


def test_parse_budget_spec() -> None:
    assert parse_budget_spec("full") == {"name": "full"}
    assert parse_budget_spec("s:hidden=128,heads=4,kv_heads=2,intermediate=384/256,layers=0-3") == {
        "name": "s",
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": [384, 256],
        "layers": [0, 3],
    }
    with pytest.raises(ElasticConfigError, match="bad item"):
        parse_budget_spec("s:width=3")


def test_slice_of_a_config_transformers_rejects_names_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hidden 50 over 4 heads of 8: a valid elastic budget (explicit head_dim), but
    LlamaConfig rejects hidden_size % num_attention_heads != 0. Slicing fails with a named
    error before writing anything."""
    odd = {"name": "odd", "hidden_size": 50, "num_attention_heads": 4, "num_key_value_heads": 1}
    ckpt = _build(tmp_path / "c", budgets=[{"name": "full"}, odd])
    out = tmp_path / "out"
    with pytest.raises(ElasticConfigError, match="budget 'odd'"):
        slice_checkpoint(ckpt, "odd", out)
    assert not out.exists()
    assert main(["slice", str(ckpt), "--budget", "odd", "-o", str(out)]) == 2
    assert "budget 'odd'" in capsys.readouterr().err
    assert not out.exists()
