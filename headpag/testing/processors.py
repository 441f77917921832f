"""
Reference attention processors with head-level SoftPAG for SD3/SD3.5 joint attention and FLUX attention.

The runtime does not install these (it perturbs inside whatever processor is installed, see `attention.py`); they are
an independent, processor-swapping implementation that tests and benchmarks compare the runtime against.

Each processor computes exactly what the diffusers processor it replaces computes (same ops in the same order), and
then, for the batch rows and heads that the current [`~headpag.guidance.plan.PerturbationPlan`] marks, blends the
SDPA output towards the target (see [`~headpag.guidance.softpag.softpag`]). No `L x L` attention map is built, so
the fast SDPA kernels stay in use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..guidance.plan import PerturbationPlan
from ..runtime.layout import describe_transformer
from .state import PerturbationState


class HeadPAGJointAttnProcessor:
    r"""
    SoftPAG on selected heads of SD3 / SD3.5 joint attention (diffusers' `JointAttnProcessor2_0` layout).

    Honours SD3.5's qk-norm (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`) and serves the image-only `attn2`
    of SD3.5 dual-attention blocks as well (there the joint sequence has no text tokens). Joint order:
    `[image, text]`.

    Args:
        layer (`int`): The layer index of the block that owns this attention module.
        state ([`~headpag.guidance.plan.PerturbationState`]): Shared state holding the current plan.
    """

    def __init__(self, layer: int, state: PerturbationState):
        self.layer = layer
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)

            context_query = context_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_key = context_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_value = context_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)

            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        num_image = residual.shape[1]
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = self.state.apply(
            self.layer,
            hidden_states,
            query,
            key,
            value,
            image=slice(0, num_image),
            text=slice(num_image, query.shape[2]),
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :num_image], hidden_states[:, num_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class HeadPAGFluxAttnProcessor:
    r"""
    SoftPAG on selected heads of FLUX.1 attention (diffusers' `FluxAttnProcessor` layout, rotary embeddings).

    Double-stream blocks get the text stream as `encoder_hidden_states`; single-stream blocks see one concatenated
    `[text, image]` sequence, so the text length comes from the shared state (set per transformer call).

    Args:
        layer (`int`): The layer index (double-stream blocks first, then `num_double_blocks + i`).
        state ([`~headpag.guidance.plan.PerturbationState`]): Shared state holding the current plan.
        original (*optional*): The processor being replaced; its attention backend and parallel config are kept.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: int, state: PerturbationState, original=None):
        self.layer = layer
        self.state = state
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        if self.state.plan is not None:
            text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.text_len
            if text_len is None:
                raise RuntimeError("FLUX single-stream attention needs the text length; set state.text_len.")
            # (B, L, H, D) -> (B, H, L, D) views for the blend, and back.
            hidden_states = self.state.apply(
                self.layer,
                hidden_states.transpose(1, 2),
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                image=slice(text_len, query.shape[1]),
                text=slice(0, text_len),
            ).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        return hidden_states


def reference_forward(
    transformer: torch.nn.Module,
    kwargs: dict,
    head_sets: list,
    perturbation,
    state: PerturbationState | None = None,
):
    r"""
    The reference perturbed prediction: swap these processors in on the perturbed layers, run the transformer with
    every row perturbed (row `i` by `head_sets[i]`, or all rows by a single head set), restore the processors.

    Independent of the hook runtime (no hooks, no function mode, no prefix sharing); for tests and benchmarks.

    Args:
        transformer (`nn.Module`): An SD3 or FLUX transformer.
        kwargs (`dict`): Transformer call arguments.
        head_sets (`list[HeadSet]`): Resolved head sets.
        perturbation ([`~headpag.guidance.Perturbation`]): Identity weight, scope, target.
        state ([`PerturbationState`], *optional*): e.g. `ExplicitMapState` for the explicit attention-map reference.
    """
    layout = describe_transformer(transformer)
    batch = kwargs["hidden_states"].shape[0]
    sets = list(head_sets) * batch if len(head_sets) == 1 else list(head_sets)
    state = state or PerturbationState()
    state.plan = PerturbationPlan(range(batch), sets, perturbation, layout.num_heads)
    state.text_len = kwargs["encoder_hidden_states"].shape[1]
    saved = []
    try:
        for layer in sorted({layer for hs in sets for layer in hs.layers()}):
            for attn in layout.attentions[layer]:
                saved.append((attn, attn.processor))
                if layout.family == "sd3":
                    attn.set_processor(HeadPAGJointAttnProcessor(layer, state))
                else:
                    attn.set_processor(HeadPAGFluxAttnProcessor(layer, state, original=attn.processor))
        return transformer(**kwargs)
    finally:
        for attn, processor in reversed(saved):
            attn.set_processor(processor)
        state.plan = None
