"""Elastic checkpoint I/O: random test checkpoints, slicing one budget out, size reports.

Nothing here imports vLLM. Weights use the Hugging Face names of ``LlamaForCausalLM`` /
``Qwen3ForCausalLM`` (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
...); which rows and columns a budget keeps is defined in :mod:`vllm_elastic.budgets`.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vllm_elastic.checkpoint.tokenizer import (
    SPECIAL_TOKENS,
    build_tokenizer,
    special_token_ids,
    tokenizer_vocab_size,
)
from vllm_elastic.errors import ElasticConfigError, UnknownBudgetError
from vllm_elastic.spec.budgets import Budget, ElasticSpec, spec_from_hf_config
from vllm_elastic.spec.hf_configs import FAMILIES

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_NOT_COPIED = {"config.json", WEIGHTS_INDEX_NAME}

# Shapes (and budgets) of the random checkpoints; keyword arguments of
# build_random_checkpoint. Fractions of the full model's parameters, from budget_report:
# tiny: full 1.0, half 0.22; small: full 1.0, medium 0.53, small 0.19;
# bench: full 1.0, large 0.75, small 0.39.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "family": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 256,
        "budgets": [
            {"name": "full"},
            {
                "name": "half",
                "hidden_size": 64,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 128,
                "layers": [0, 1, 3],
            },
        ],
    },
    "small": {
        "family": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "intermediate_size": 768,
        "budgets": [
            {"name": "full"},
            {
                "name": "medium",
                "hidden_size": 192,
                "num_attention_heads": 6,
                "num_key_value_heads": 3,
                "intermediate_size": 512,
            },
            {
                "name": "small",
                "hidden_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": [384, 256, 384, 256],
                "layers": [0, 2, 3],
            },
        ],
    },
    "bench": {
        "family": "llama",
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "intermediate_size": 4096,
        "budgets": [
            {"name": "full"},
            {
                "name": "large",
                "hidden_size": 768,
                "num_attention_heads": 12,
                "num_key_value_heads": 3,
                "intermediate_size": 4032,
            },
            {
                "name": "small",
                "hidden_size": 640,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "intermediate_size": 2688,
            },
        ],
    },
}
DEFAULT_PRESET = "small"


# --------------------------------------------------------------------------- shapes


def _family_of(config: Any) -> str:
    """``"llama"`` or ``"qwen3"`` for an elastic or plain config."""
    model_type = getattr(config, "model_type", "")
    return "qwen3" if model_type.endswith("qwen3") else "llama"


def _layer_shapes(config: Any, h: int, q: int, kv: int, inter: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one decoder layer (names relative to ``model.layers.N.``)."""
    hd = config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (q * hd, h),
        "self_attn.k_proj.weight": (kv * hd, h),
        "self_attn.v_proj.weight": (kv * hd, h),
        "self_attn.o_proj.weight": (h, q * hd),
    }
    if getattr(config, "attention_bias", False):
        shapes["self_attn.q_proj.bias"] = (q * hd,)
        shapes["self_attn.k_proj.bias"] = (kv * hd,)
        shapes["self_attn.v_proj.bias"] = (kv * hd,)
        shapes["self_attn.o_proj.bias"] = (h,)
    if _family_of(config) == "qwen3":
        shapes["self_attn.q_norm.weight"] = (hd,)
        shapes["self_attn.k_norm.weight"] = (hd,)
    shapes["mlp.gate_proj.weight"] = (inter, h)
    shapes["mlp.up_proj.weight"] = (inter, h)
    shapes["mlp.down_proj.weight"] = (h, inter)
    if getattr(config, "mlp_bias", False):
        shapes["mlp.gate_proj.bias"] = (inter,)
        shapes["mlp.up_proj.bias"] = (inter,)
        shapes["mlp.down_proj.bias"] = (h,)
    shapes["input_layernorm.weight"] = (h,)
    shapes["post_attention_layernorm.weight"] = (h,)
    return shapes


def budget_tensor_shapes(config: Any, budget: Budget) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of the model ``budget`` keeps, without zero padding.

    Kept layers are renumbered ``0..n-1`` in ascending parent order. For the full budget
    this is exactly the parent checkpoint's tensors.
    """
    h, vocab = budget.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for new, layer in enumerate(budget.layers):
        layer_shapes = _layer_shapes(
            config,
            h,
            budget.num_attention_heads,
            budget.num_key_value_heads,
            budget.intermediate_sizes[layer],
        )
        shapes.update({f"model.layers.{new}.{k}": v for k, v in layer_shapes.items()})
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def budget_num_parameters(config: Any, budget: Budget) -> int:
    """Parameters of the standalone model of ``budget`` (zero padding not counted)."""
    return sum(math.prod(shape) for shape in budget_tensor_shapes(config, budget).values())


# --------------------------------------------------------------------------- random


def _random_tensor(
    name: str, shape: tuple[int, ...], gen: torch.Generator, tied: bool
) -> torch.Tensor:
    """A float32 tensor whose scale keeps a random model's activations O(1).

    Matrices ~ N(0, 1/fan_in), so every projection (and the lm_head) preserves the
    activation scale; norm weights ~ 1 + N(0, 0.1); biases ~ N(0, 0.1). Embeddings
    ~ N(0, 1), or N(0, 1/hidden) when tied to the lm_head: otherwise the residual stream
    is dominated by the input token's own embedding and greedy decoding just repeats the
    last prompt token. Logits then spread about +-1, so greedy output depends on the prompt.
    """
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("embed_tokens.weight"):
        return noise / math.sqrt(shape[1]) if tied else noise
    if "norm" in name:
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    return noise / math.sqrt(shape[1])


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a floating-point torch dtype")
    return resolved


def _elastic_family(family: str) -> tuple[type, str]:
    """(config class, elastic architecture) of ``"llama"`` or ``"qwen3"``."""
    for cls, arch, _plain_arch, plain_type in FAMILIES.values():
        if plain_type == family:
            return cls, arch
    known = [f[3] for f in FAMILIES.values()]
    raise ValueError(f"family: {family!r} is not one of {known}")


def build_random_checkpoint(
    out_dir: str | Path,
    *,
    family: str = "llama",
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int | None = None,
    intermediate_size: int,
    budgets: Sequence[Mapping[str, Any]],
    default_budget: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
    mlp_bias: bool = False,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a deterministic random elastic checkpoint (config, weights, tokenizer).

    The same arguments always give byte-identical ``model.safetensors``. ``mlp_bias`` is
    only meaningful for ``family="llama"`` (Qwen3 has no MLP biases). Avoid
    ``attention_bias`` with ``family="qwen3"`` for vLLM: HF Qwen3 then has an o_proj bias
    that stock vLLM's Qwen3 model lacks (real Qwen3 checkpoints have no attention bias). Raises
    ElasticConfigError (naming the field) when the budgets do not fit the parent.
    """
    out = Path(out_dir)
    cls, arch = _elastic_family(family)
    torch_dtype = _resolve_dtype(dtype)
    elastic: dict[str, Any] = {"budgets": copy.deepcopy([dict(b) for b in budgets])}
    if default_budget is not None:
        elastic["default_budget"] = default_budget
    extra = {"mlp_bias": mlp_bias} if family == "llama" else {}
    special = special_token_ids()
    # Constructing the config validates the budgets, before anything is written.
    config = cls(
        architectures=[arch],
        elastic=elastic,
        vocab_size=tokenizer_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim or hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
        dtype=str(torch_dtype).removeprefix("torch."),
        **extra,
    )
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if len(tokenizer) != config.vocab_size or tokenizer.eos_token_id != special["eos"]:
        raise RuntimeError(f"tokenizer written to {out} does not match tokenizer_vocab_size()")
    spec = spec_from_hf_config(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, shape, gen, tie_word_embeddings).to(torch_dtype)
        for name, shape in budget_tensor_shapes(config, spec.full).items()
    }
    _quiet_special_tokens(tensors, config)
    _save_tensors(tensors, out)
    config.save_pretrained(out)
    return out


def _quiet_special_tokens(tensors: dict[str, torch.Tensor], config: Any) -> None:
    """Shrink the output rows of the special tokens (ids ``0..8``) to 1% scale.

    Their logits are then ~0 while the words' spread about +-1, so greedy decoding of a
    random model never emits ``</s>``, ``<pad>``, ``<think>``, ...: generations run to
    ``max_tokens``. With tied embeddings the shared rows shrink too (a special input token
    then barely writes into the residual stream, which is fine for a random model).
    """
    name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    tensors[name][: len(SPECIAL_TOKENS)] *= 0.01


# --------------------------------------------------------------------------- loading


def load_elastic_config(ckpt_dir: str | Path) -> PreTrainedConfig:
    """The elastic config of a checkpoint directory (validated on construction).

    Raises ElasticConfigError when there is no ``config.json``, it is not JSON, its
    ``model_type`` is not an elastic family, it has no ``elastic`` section, or the section
    is invalid.
    """
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise ElasticConfigError(f"{ckpt_dir}: no config.json (not a checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ElasticConfigError(f"{path}: not valid JSON ({exc})") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in FAMILIES:
        raise ElasticConfigError(
            f"model_type: {model_type!r} in {path} is not an elastic architecture "
            f"(expected one of {sorted(FAMILIES)})"
        )
    if raw.get("elastic") is None:
        raise ElasticConfigError(f"elastic: {path} has no 'elastic' section")
    return FAMILIES[model_type][0].from_pretrained(Path(ckpt_dir))


def load_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: ``model.safetensors`` or a sharded index."""
    ckpt = Path(ckpt_dir)
    if (ckpt / WEIGHTS_NAME).is_file():
        return load_file(ckpt / WEIGHTS_NAME)
    index = ckpt / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise ElasticConfigError(f"{ckpt}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(ckpt / shard))
    return state


def _save_tensors(tensors: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """One ``model.safetensors`` with contiguous tensors."""
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        out_dir / WEIGHTS_NAME,
        metadata={"format": "pt"},
    )


def get_budget(spec: ElasticSpec, name: str) -> Budget:
    """``spec.get(name)`` with an error that lists the budgets."""
    try:
        return spec.get(name)
    except KeyError:
        raise UnknownBudgetError(
            f"budget: {name!r} is not a budget of this checkpoint; budgets: {spec.names}"
        ) from None


# --------------------------------------------------------------------------- slicing


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a ``[heads * head_dim, ...]`` matrix."""
    return torch.cat([torch.arange(p * head_dim, (p + 1) * head_dim) for p in heads])


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad ``t`` along ``dim`` up to ``size``."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def _slice_attention(
    get: Any, src: str, dst: str, budget: Budget, heads: torch.Tensor, config: Any
) -> dict[str, torch.Tensor]:
    """Sliced attention tensors of one layer (``get(name)`` reads a parent tensor)."""
    h, kv_rows = budget.hidden_size, budget.num_key_value_heads * config.head_dim
    a, b = f"{src}.self_attn.", f"{dst}.self_attn."
    out = {
        b + "q_proj.weight": get(a + "q_proj.weight")[heads, :h],
        b + "k_proj.weight": get(a + "k_proj.weight")[:kv_rows, :h],
        b + "v_proj.weight": get(a + "v_proj.weight")[:kv_rows, :h],
        b + "o_proj.weight": get(a + "o_proj.weight")[:h, heads],
    }
    if getattr(config, "attention_bias", False):
        out[b + "q_proj.bias"] = get(a + "q_proj.bias")[heads]
        out[b + "k_proj.bias"] = get(a + "k_proj.bias")[:kv_rows]
        out[b + "v_proj.bias"] = get(a + "v_proj.bias")[:kv_rows]
        out[b + "o_proj.bias"] = get(a + "o_proj.bias")[:h]
    if _family_of(config) == "qwen3":  # per-head norms over head_dim: not sliced
        out[b + "q_norm.weight"] = get(a + "q_norm.weight")
        out[b + "k_norm.weight"] = get(a + "k_norm.weight")
    return out


def _slice_mlp(
    get: Any, src: str, dst: str, h: int, inter: int, width: int, config: Any
) -> dict[str, torch.Tensor]:
    """Sliced MLP tensors of one layer, zero-padded from ``inter`` to ``width`` channels."""
    a, b = f"{src}.mlp.", f"{dst}.mlp."
    out = {
        b + "gate_proj.weight": _pad(get(a + "gate_proj.weight")[:inter, :h], 0, width),
        b + "up_proj.weight": _pad(get(a + "up_proj.weight")[:inter, :h], 0, width),
        b + "down_proj.weight": _pad(get(a + "down_proj.weight")[:h, :inter], 1, width),
    }
    if getattr(config, "mlp_bias", False):
        out[b + "gate_proj.bias"] = _pad(get(a + "gate_proj.bias")[:inter], 0, width)
        out[b + "up_proj.bias"] = _pad(get(a + "up_proj.bias")[:inter], 0, width)
        out[b + "down_proj.bias"] = get(a + "down_proj.bias")[:h]
    return out


def slice_state_dict(
    state: Mapping[str, torch.Tensor], config: Any, budget: Budget
) -> dict[str, torch.Tensor]:
    """The tensors of ``budget`` as a plain model (layers renumbered, MLPs zero-padded).

    Every layer's MLP is padded to the widest kept layer's intermediate size; the padded
    gate/up rows and down columns are zero, so they add ``silu(0) * 0 = 0``.
    """

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ElasticConfigError(f"checkpoint: missing tensor {name!r}")
        return state[name]

    parent = spec_from_hf_config(config).parent
    h = budget.hidden_size
    heads = _head_rows(budget.kept_query_heads(parent), config.head_dim)
    width = max(budget.intermediate_sizes[layer] for layer in budget.layers)
    out = {"model.embed_tokens.weight": get("model.embed_tokens.weight")[:, :h]}
    for new, layer in enumerate(budget.layers):
        src, dst = f"model.layers.{layer}", f"model.layers.{new}"
        out.update(_slice_attention(get, src, dst, budget, heads, config))
        inter = budget.intermediate_sizes[layer]
        out.update(_slice_mlp(get, src, dst, h, inter, width, config))
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"{dst}.{norm}"] = get(f"{src}.{norm}")[:h]
    out["model.norm.weight"] = get("model.norm.weight")[:h]
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")[:, :h]
    return {name: t.contiguous().clone() for name, t in out.items()}


def plain_config(config: Any, budget: Budget) -> PreTrainedConfig:
    """The stock ``LlamaConfig`` / ``Qwen3Config`` of ``budget`` (no ``elastic`` key)."""
    _cls, _arch, plain_arch, plain_type = FAMILIES[config.model_type]
    fields = config.to_dict()
    for key in ("elastic", "model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    if fields.get("layer_types") is not None:
        fields["layer_types"] = [fields["layer_types"][layer] for layer in budget.layers]
    fields.update(
        architectures=[plain_arch],
        hidden_size=budget.hidden_size,
        num_attention_heads=budget.num_attention_heads,
        num_key_value_heads=budget.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate_size=max(budget.intermediate_sizes[layer] for layer in budget.layers),
        num_hidden_layers=len(budget.layers),
    )
    try:
        return CONFIG_MAPPING[plain_type](**fields)
    # e.g. LlamaConfig: hidden_size % num_attention_heads != 0 (transformers raises
    # huggingface_hub's StrictDataclassClassValidationError, not a ValueError)
    except (ValueError, TypeError, StrictDataclassError) as err:
        raise ElasticConfigError(
            f"budget {budget.name!r}: transformers rejects its standalone {plain_arch} config "
            f"({err}); stock transformers and vLLM could not load the sliced checkpoint. "
            "The elastic engine serves this budget as it is."
        ) from err


def slice_checkpoint(ckpt_dir: str | Path, budget_name: str, out_dir: str | Path) -> Path:
    """Write budget ``budget_name`` of an elastic checkpoint as a standalone plain model.

    The output is a ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` checkpoint that stock
    transformers and stock vLLM load unchanged: hidden channels ``[:h]``, KV heads
    ``[:kv]``, the query heads of :meth:`Budget.kept_query_heads`, only the kept layers
    (renumbered ``0..n-1``), ``head_dim`` written explicitly.

    Plain configs have a single ``intermediate_size``, so a budget with per-layer sizes is
    written with ``intermediate_size = max`` over the kept layers, and each narrower layer's
    gate/up rows and down columns (and gate/up biases) are zero-padded to that width. The
    padded channels contribute ``silu(0) * 0 = 0``, so outputs are identical to the
    unpadded model's; only the parameter count (and memory) grows.

    Tokenizer files (everything but the config and weights) are copied. Raises
    UnknownBudgetError (an ElasticConfigError and KeyError) for an unknown budget.
    """
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    config = load_elastic_config(ckpt)
    budget = get_budget(spec_from_hf_config(config), budget_name)
    plain = plain_config(config, budget)  # raises before anything is written
    tensors = slice_state_dict(load_state_dict(ckpt), config, budget)
    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, out)
    plain.save_pretrained(out)
    for path in sorted(ckpt.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
    return out


# --------------------------------------------------------------------------- report


def _checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint's config declares (float32 when it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return _resolve_dtype(dtype) if dtype is not None else torch.float32


def _intermediate_summary(sizes: Sequence[int]) -> int | str:
    """One int when all equal, else ``"min-max"``."""
    return sizes[0] if len(set(sizes)) == 1 else f"{min(sizes)}-{max(sizes)}"


def budget_report(ckpt_dir: str | Path) -> list[dict[str, Any]]:
    """Per budget (checkpoint order): its shape, parameter count, bytes and fraction.

    Keys: ``name``, ``default``, ``full``, ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size`` (int, or ``"min-max"`` over the kept
    layers), ``intermediate_sizes`` (one per kept layer, aligned with ``layers``),
    ``num_layers``, ``layers`` (kept parent indices), ``parameters`` (of the sliced model,
    without zero padding), ``bytes`` (in the checkpoint's dtype), ``dtype`` and
    ``fraction`` (of the full budget's parameters).
    """
    config = load_elastic_config(ckpt_dir)
    spec = spec_from_hf_config(config)
    dtype = _checkpoint_dtype(config)
    total = budget_num_parameters(config, spec.full)
    rows = []
    for budget in spec.budgets:
        params = budget_num_parameters(config, budget)
        kept_inter = [budget.intermediate_sizes[layer] for layer in budget.layers]
        rows.append(
            {
                "name": budget.name,
                "default": budget.name == spec.default_budget,
                "full": budget.is_full(spec.parent),
                "hidden_size": budget.hidden_size,
                "num_attention_heads": budget.num_attention_heads,
                "num_key_value_heads": budget.num_key_value_heads,
                "intermediate_size": _intermediate_summary(kept_inter),
                "intermediate_sizes": kept_inter,
                "num_layers": len(budget.layers),
                "layers": list(budget.layers),
                "parameters": params,
                "bytes": params * dtype.itemsize,
                "dtype": str(dtype).removeprefix("torch."),
                "fraction": params / total,
            }
        )
    return rows
