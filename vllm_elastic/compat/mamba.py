"""vLLM's Mamba-2 mixer used for its state: cache registration, conv + scan kernels.

The elastic Mamba layer (``models/layers/mamba2.py``) computes its own projections and
gated norm per budget; it runs vLLM's ``MambaMixer2.conv_ssm_forward`` once per forward
over every token for the conv and SSM state update (prefill and decode kernels, chunked
prefill, prefix caching's align mode), which needs the mixer registered as a layer so the
hybrid KV-cache allocator binds its state. The mixer's own in/out projections and norm are
dropped (the elastic layer holds that one copy of the weights).

On CPU the mixer's prefill-checkpoint KV spec is replaced by the plain Mamba spec: vLLM
0.32's CPU chunk scan cannot export an intermediate state, so with prefix caching a
prompt longer than two blocks fails in ``conv_ssm_forward`` (IndexError); without
checkpoint blocks the scheduler splits prefills at block boundaries instead.

Also: the hybrid-model classmethods (state shapes, dtypes, copy functions) of vLLM's
``NemotronHForCausalLM``, which read the same config fields.
"""

from __future__ import annotations

from typing import Any

import torch


def _mixer_cls() -> type:
    from vllm.model_executor.layers.mamba.abstract import MambaBase
    from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
    from vllm.platforms import current_platform

    class ElasticStateMixer(MambaMixer2):
        """``MambaMixer2`` kept for its state and kernels only."""

        def get_kv_cache_spec(self, vllm_config: Any) -> Any:
            if current_platform.is_cpu():
                return MambaBase.get_kv_cache_spec(self, vllm_config)
            return super().get_kv_cache_spec(vllm_config)

    return ElasticStateMixer


_MIXER: list[type] = []


def state_mixer(config: Any, vllm_config: Any, prefix: str) -> Any:
    """A registered Mamba-2 mixer for the parent's heads, without its projections."""
    if not _MIXER:
        _MIXER.append(_mixer_cls())
    mixer = _MIXER[0](
        hidden_size=config.hidden_size,
        ssm_state_size=config.ssm_state_size,
        conv_kernel_size=config.conv_kernel,
        intermediate_size=config.mamba_num_heads * config.mamba_head_dim,
        use_conv_bias=config.use_conv_bias,
        use_bias=config.use_bias,
        n_groups=config.n_groups,
        num_heads=config.mamba_num_heads,
        head_dim=config.mamba_head_dim,
        rms_norm_eps=config.layer_norm_epsilon,
        activation=config.mamba_hidden_act,
        model_config=vllm_config.model_config,
        cache_config=vllm_config.cache_config,
        quant_config=None,
        prefix=prefix,
    )
    for name in ("in_proj", "out_proj", "norm"):  # the elastic layer owns these weights
        delattr(mixer, name)
    return mixer


def load_state_params(mixer: Any, name: str, w: torch.Tensor) -> str | None:
    """Copy ``conv1d.weight|bias``, ``A_log``, ``D`` or ``dt_bias`` into the mixer;
    returns the mixer parameter's name (None for another tensor)."""
    if name == "A_log":
        mixer.A.data.copy_(-torch.exp(w.float()))
        return "A"
    if name in ("D", "dt_bias"):
        getattr(mixer, name).data.copy_(w)
    elif name == "conv1d.weight":
        mixer.conv1d.weight.data.copy_(w.reshape(mixer.conv1d.weight.shape))
    elif name == "conv1d.bias":
        mixer.conv1d.bias.data.copy_(w)
    else:
        return None
    return name


def conv_ssm(mixer: Any, projected: torch.Tensor, output: torch.Tensor) -> None:
    """vLLM's conv + SSM over every token of the forward: ``projected`` holds the
    parent's in_proj layout ``[z | x | B | C | dt]`` (z unread); writes ``output``
    (``[tokens, heads * head_dim]``) and the layer's state. A profile run writes nothing."""
    mixer.conv_ssm_forward(projected, output)


def hybrid_classmethods() -> dict[str, Any]:
    """``get_mamba_state_{shape,dtype}_from_config`` and ``get_mamba_state_copy_func`` of
    vLLM's NemotronH, as classmethods for another class."""
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

    names = (
        "get_mamba_state_shape_from_config",
        "get_mamba_state_dtype_from_config",
        "get_mamba_state_copy_func",
    )
    return {n: classmethod(NemotronHForCausalLM.__dict__[n].__func__) for n in names}
