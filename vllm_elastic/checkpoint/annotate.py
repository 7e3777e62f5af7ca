"""Serve a plain checkpoint plus a budget list as an elastic one, without copying weights.

``annotate(CKPT, budgets.json, OUT)`` writes ``OUT/config.json``: the plain config with
the elastic ``model_type`` and architecture of its family and an ``elastic`` section,
and links every other file of ``CKPT`` (weight shards, index, tokenizer) into ``OUT``.
The budgets are validated against the parent before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vllm_elastic.checkpoint.io import read_config_json
from vllm_elastic.errors import ElasticConfigError, short
from vllm_elastic.spec.families import Family, all_families


def _family_of_plain(model_type: Any) -> Family:
    for family in all_families():
        if family.plain_model_type == model_type:
            return family
    known = sorted({f.plain_model_type for f in all_families()})
    raise ElasticConfigError(
        f"model_type: {short(model_type)} has no elastic family; known: {known}"
    )


def read_budgets(path: str | Path) -> dict[str, Any]:
    """A budgets file: a list of budgets, or an object with ``budgets`` (and optionally
    ``default_budget``, ``think_start``, ``think_end``)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ElasticConfigError(f"budgets file {path}: {exc}") from exc
    return {"budgets": raw} if isinstance(raw, list) else raw


def annotate(
    ckpt_dir: str | Path, budgets: str | Path | dict[str, Any], out_dir: str | Path
) -> Path:
    ckpt, out = Path(ckpt_dir).resolve(), Path(out_dir)
    if out.resolve() == ckpt:
        raise ElasticConfigError("annotate: the output folder must differ from the checkpoint")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = _family_of_plain(read_config_json(ckpt).get("model_type"))
    section = budgets if isinstance(budgets, dict) else read_budgets(budgets)
    plain = CONFIG_MAPPING[family.plain_model_type].from_pretrained(ckpt)
    skip = ("model_type", "architectures", "auto_map", "transformers_version")
    fields = {k: v for k, v in plain.to_dict().items() if k not in skip}
    config = family.config_cls(**fields, elastic=section, architectures=[family.elastic_arch])
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(ckpt.iterdir()):
        if path.name == "config.json" or not path.is_file():
            continue
        link = out / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(path, link)
    config.save_pretrained(out)
    return out
