"""The elastic causal LM every family builds on: embedding, layer stack, final norm, logits.

One copy of the parent's weights. Each forward routes the batch's tokens to budgets once
(``models/routing.py``) and hands the segments through the family's layers, which the
family injects (``layer_type``, as vLLM's ``LlamaModel`` / ``NemotronHModel`` do).
Weights load by the family's declared name mapping; per-layer tensors go to their layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_elastic import compat
from vllm_elastic.compat.compile import compile_settings, is_compiling
from vllm_elastic.compat.logits import sliced_logits
from vllm_elastic.compat.runner import check_v1_runner
from vllm_elastic.kernels import seg_norm
from vllm_elastic.log import get_logger
from vllm_elastic.models import norm
from vllm_elastic.models.budget_graphs import BudgetGraphs, GraphKey
from vllm_elastic.models.nested_linear import requested_packing, resolve_packing
from vllm_elastic.models.routing import (
    BudgetRouter,
    Segment,
    Stack,
    put,
    stack,
    stacked_index,
)
from vllm_elastic.spec.budgets import ElasticSpec
from vllm_elastic.spec.engine_options import engine_options

logger = get_logger(__name__)


class ElasticForCausalLM(nn.Module):
    """Base of the elastic causal LMs. A family sets the class attributes below and
    ``make_layer``."""

    # HF tensor name -> this module's parameter, for the non-layer tensors
    hf_globals: dict[str, str] = {}
    norm_eps_field = "rms_norm_eps"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.family = config.family
        self.spec: ElasticSpec = config.elastic_spec
        check_v1_runner(vllm_config)  # this process may see other settings than the frontend
        compat.install_worker_hooks()
        self.spec.check_tensor_parallel(get_tensor_model_parallel_world_size())
        if get_pp_group().world_size > 1:
            raise NotImplementedError("elastic models do not support pipeline parallelism")
        hidden = self.spec.parent.sizes["hidden_size"]
        self.hidden_size = hidden
        self.eps = getattr(config, self.norm_eps_field)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(
            self.make_layer(vllm_config, i, f"{self.layer_prefix()}{i}")
            for i in range(self.spec.parent.num_layers)
        )
        self.norm = RMSNorm(hidden, eps=self.eps)
        self.lm_head = ParallelLMHead(config.vocab_size, hidden, prefix="lm_head")
        if self.family.tied(config):
            self.lm_head = self.lm_head.tie_weights(self.embed_tokens)
        self.logits_processor = LogitsProcessor(
            config.vocab_size, scale=getattr(config, "logit_scale", 1.0)
        )
        self.widths = np.array([b.hidden_size for b in self.spec.budgets])
        self.router = BudgetRouter(vllm_config, self.spec)
        self.weight_packing: dict[str, str] = {}
        self.stacked_budgets: frozenset[int] | None = None  # set once weights are packed
        self.budget_graphs = self._budget_graphs(vllm_config)

    def make_layer(self, vllm_config: VllmConfig, layer: int, prefix: str) -> nn.Module:
        raise NotImplementedError

    def _budget_graphs(self, vllm_config: VllmConfig) -> BudgetGraphs | None:
        settings = compile_settings(vllm_config)
        if settings is None:
            return None
        return BudgetGraphs(self, settings, engine_options(vllm_config).mixed_graphs)

    def layer_prefix(self) -> str:
        return self.family.slices.layer_prefix.split("{i}")[0]

    # --------------------------------------------------------------------- forward
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        num_tokens = embeds.shape[0]
        segments = self.router.segments(embeds, input_ids, positions)
        graphs = self.budget_graphs
        if graphs is not None and not graphs.ready and self.router.dummy:
            graphs.trace_all(embeds, positions)  # vLLM's profile run, at start-up
        key = self.graph_key(segments) if graphs is not None and graphs.ready else None
        if key is not None and graphs.serves(key):  # one of graph_keys(): all traced
            return self._full_width(graphs(key, segments, positions))
        return self._full_width(self.run_segments(positions, segments, num_tokens))

    def run_segments(
        self, positions: torch.Tensor, segments: list[Segment], num_tokens: int
    ) -> torch.Tensor:
        """The layer stack and final norm: one segment's output at its budget's width,
        several segments' in forward token order at the parent's width."""
        if len(segments) > 1 and self._stacks(segments):
            return self.run_stacked(positions, segments, num_tokens)
        for layer in self.layers:
            layer(positions, segments, num_tokens)
        if len(segments) == 1:
            return self._final_norm(segments[0])
        return self._in_forward_order(segments, [self._final_norm(s) for s in segments], num_tokens)

    def _in_forward_order(
        self, segments: list[Segment], parts: list[torch.Tensor], num_tokens: int
    ) -> torch.Tensor:
        """Each segment's final hidden states (at its width) in forward token order, at
        the parent's width (zeros past a row's budget)."""
        out = parts[0].new_zeros(num_tokens, self.hidden_size)
        for seg, part in zip(segments, parts):
            put(out[:, : part.shape[1]], seg.idx, part)
        return out

    def _stacks(self, segments: list[Segment]) -> bool:
        """Whether a mixed batch runs stacked (``run_stacked``): outside a graph, when
        every layer supports it and every budget of the batch runs every layer."""
        ok = self.stacked_budgets
        return ok is not None and not is_compiling() and all(s.budget in ok for s in segments)

    def _stacked_budgets(self) -> frozenset[int] | None:
        """The budgets a mixed batch may stack (``Stack``): those that run every layer,
        where every layer has ``forward_stacked`` and packs ``blocked`` (the plugin's
        kernels are built) on one rank; None where it cannot run."""
        if get_tensor_model_parallel_world_size() > 1 or not all(
            hasattr(layer, "forward_stacked") and layer.stackable() for layer in self.layers
        ):
            return None
        if any(nl.packing != "blocked" for layer in self.layers for nl in layer.linears()):
            return None
        every = range(self.spec.parent.num_layers)
        return frozenset(b.index for b in self.spec.budgets if all(b.keeps_layer(i) for i in every))

    def run_stacked(
        self, positions: torch.Tensor, segments: list[Segment], num_tokens: int
    ) -> torch.Tensor:
        """``run_segments`` of a mixed batch on its residual stream stacked in one buffer
        (``Stack``): per layer one call per norm and projection, one gather into forward
        order for attention and one back, instead of a call per segment and a copy per
        stack. Exactly the routed forward's arithmetic, row by row."""
        rows = [s.rows for s in segments]
        widths = [s.hidden.shape[1] for s in segments]
        hidden = stack([s.hidden for s in segments])
        order = stacked_index(segments, num_tokens)
        st = Stack(hidden, torch.zeros_like(hidden), rows, widths, order)
        for layer in self.layers:
            layer.forward_stacked(positions, st, segments, num_tokens)
        seg_norm.add_rms_norm(st.hidden, st.residual, self.norm.weight, rows, widths, self.eps)
        parts = [h[:, :w] for h, w in zip(st.hidden.split(rows), widths)]
        return self._in_forward_order(segments, parts, num_tokens)

    def budget_mixes(self) -> list[list[int]]:
        """Every set of budgets a batch can hold, each largest budget first (the
        router's segment order)."""
        order = sorted(range(len(self.spec.budgets)), key=self.router.rank.__getitem__)
        return [
            [b for i, b in enumerate(order) if mask >> i & 1] for mask in range(1, 1 << len(order))
        ]

    def graph_keys(self) -> list[GraphKey]:
        """The compiled graphs to trace: one per budget mix (no recurrent state to key by)."""
        return [tuple((b, b) for b in mix) for mix in self.budget_mixes()]

    def graph_key(self, segments: list[Segment]) -> GraphKey:
        """The compiled graph that serves these segments."""
        return tuple((s.budget, s.budget) for s in segments)

    def _full_width(self, hidden: torch.Tensor) -> torch.Tensor:
        """One budget's final hidden states in the parent's width (zeros past it)."""
        if hidden.shape[1] == self.hidden_size:
            return hidden
        return F.pad(hidden, (0, self.hidden_size - hidden.shape[1]))

    def _final_norm(self, seg: Segment) -> torch.Tensor:
        return norm.add_norm(self.norm.weight, seg.hidden, seg.residual, self.eps)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits per row at the row's budget width (hidden channels past it are zero)."""
        rb = self.router.logit_budgets
        if rb is None or len(rb) != hidden_states.shape[0]:
            return self.logits_processor(self.lm_head, hidden_states)
        widths = self.widths[rb]
        if (widths == self.hidden_size).all():
            return self.logits_processor(self.lm_head, hidden_states)
        if (widths == widths[0]).all():
            return self._sliced_logits(hidden_states, int(widths[0]))
        logits = None
        for w in np.unique(widths):
            rows = torch.from_numpy(np.flatnonzero(widths == w)).to(hidden_states.device)
            part = self._sliced_logits(hidden_states.index_select(0, rows), int(w))
            if part is None:
                return None
            if logits is None:
                logits = part.new_empty(hidden_states.shape[0], part.shape[1])
            logits[rows] = part
        return logits

    def _sliced_logits(self, hidden: torch.Tensor, width: int) -> torch.Tensor | None:
        return sliced_logits(self.logits_processor, self.lm_head, hidden, width)

    # ---------------------------------------------------------------- weights
    def process_weights_after_loading(self) -> None:
        """Pack every layer's projections (``additional_config["elastic"]["weight_packing"]``)."""
        requested = requested_packing(self.vllm_config)
        weight = self.embed_tokens.weight
        packing = resolve_packing(requested, weight.device, weight.dtype)
        used: dict[str, str] = {}
        for layer in self.layers:
            for name, how in layer.pack(packing).items():
                used[name] = how if used.get(name, how) == how else "mixed"
        self.weight_packing = {"requested": requested, **used}
        self.stacked_budgets = self._stacked_budgets()
        if "mixed" in used.values() or (packing != "views" and "views" in used.values()):
            logger.warning(
                "vllm-elastic: some projections are not nested chains over the budgets and "
                "keep their plain weight (views): %s",
                self.weight_packing,
            )
        logger.info("vllm-elastic weight packing: %s", self.weight_packing)

    def packed_weight_bytes(self) -> int:
        """Bytes of the oneDNN-packed projection blocks (beside the parameters)."""
        return sum(nl.packed_bytes() for layer in self.layers for nl in layer.linears())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        prefix = self.layer_prefix()
        loaded: set[str] = set()
        for name, w in weights:
            if "rotary_emb.inv_freq" in name or name.startswith("mtp."):
                continue
            if name == "lm_head.weight" and self.family.tied(self.config):
                continue
            if name.startswith(prefix):
                layer_s, sub = name[len(prefix) :].split(".", 1)
                layer = int(layer_s)
                for pname in self.layers[layer].load_hf_weight(sub, w):
                    loaded.add(f"layers.{layer}.{pname}")
                continue
            local = self.hf_globals.get(name)
            if local is None or local not in params:
                raise KeyError(f"unexpected weight {name!r} in the elastic checkpoint")
            param = params[local]
            getattr(param, "weight_loader", default_weight_loader)(param, w)
            loaded.add(local)
        return loaded


def kept_flags(spec: ElasticSpec, layer: int) -> list[bool]:
    """Per budget, whether it runs parent layer ``layer``."""
    return [b.keeps_layer(layer) for b in spec.budgets]


def layer_inputs(
    weight: torch.Tensor, segments: list[Segment], kept: list[bool], eps: float,
    skipped_too: bool,
) -> list[torch.Tensor | None]:  # fmt: skip
    """Each segment's normed layer input. A kept segment's stream advances (fused add);
    a segment whose budget skips the layer gets the norm of the stream it passes through
    when ``skipped_too`` (the layer writes state for it), else None."""
    xs: list[torch.Tensor | None] = []
    for seg in segments:
        if kept[seg.budget]:
            seg.hidden, seg.residual = norm.add_norm(weight, seg.hidden, seg.residual, eps)
            xs.append(seg.hidden)
        elif skipped_too:
            xs.append(norm.rms_norm(seg.stream(), weight, eps))
        else:
            xs.append(None)
    return xs


def split_name(sub: str) -> tuple[str, str, str]:
    """``"self_attn.q_proj.weight"`` -> ``("self_attn", "q_proj", "weight")``."""
    module, rest = sub.split(".", 1) if "." in sub else ("", sub)
    proj, kind = rest.rsplit(".", 1) if "." in rest else (rest, "")
    return module, proj, kind
