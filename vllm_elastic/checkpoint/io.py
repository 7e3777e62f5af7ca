"""Reading and writing checkpoint folders (config, safetensors shards, other files)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedConfig

from vllm_elastic.errors import ElasticConfigError, short
from vllm_elastic.spec.families import Family, family_of

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
NOT_COPIED = {"config.json", WEIGHTS_INDEX_NAME}


def read_config_json(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise ElasticConfigError(f"{ckpt_dir}: no config.json (not a checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ElasticConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ElasticConfigError(f"{path}: expected a JSON object")
    return raw


def load_elastic_config(ckpt_dir: str | Path) -> PreTrainedConfig:
    """The elastic config of a checkpoint directory (validated on construction).

    Raises ElasticConfigError when there is no ``config.json``, it is not JSON, its
    ``model_type`` is not an elastic family, it has no ``elastic`` section, or the section
    is invalid.
    """
    raw = read_config_json(ckpt_dir)
    family = family_of(raw.get("model_type"))
    if raw.get("elastic") is None:
        raise ElasticConfigError(
            f"elastic: {Path(ckpt_dir) / 'config.json'} has no 'elastic' section"
        )
    return family.config_cls.from_pretrained(Path(ckpt_dir))


def family_of_config(config: Any) -> Family:
    return family_of(config.model_type)


def _shards(ckpt: Path) -> list[Path]:
    if (ckpt / WEIGHTS_NAME).is_file():
        return [ckpt / WEIGHTS_NAME]
    index = ckpt / WEIGHTS_INDEX_NAME
    if index.is_file():
        names = json.loads(index.read_text())["weight_map"].values()
        return [ckpt / n for n in sorted(set(names))]
    shards = sorted(ckpt.glob("*.safetensors"))
    if not shards:
        raise ElasticConfigError(
            f"{ckpt}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or *.safetensors"
        )
    return shards


class LazyTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, each read from its shard when asked for."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self._where: dict[str, Path] = {}
        for shard in _shards(Path(ckpt_dir)):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    self._where[name] = shard

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ElasticConfigError(f"checkpoint: missing tensor {short(name)}")
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (one file, an index, or every ``*.safetensors``)."""
    lazy = LazyTensors(ckpt_dir)
    return {name: lazy[name] for name in lazy}


def save_tensors(tensors: Mapping[str, torch.Tensor], out_dir: Path) -> None:
    """One ``model.safetensors`` with contiguous tensors."""
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        out_dir / WEIGHTS_NAME,
        metadata={"format": "pt"},
    )


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and other files: everything but the config and the weights."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in NOT_COPIED and path.suffix != ".safetensors":
            shutil.copy2(path, dst / path.name)
