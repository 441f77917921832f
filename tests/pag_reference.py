"""
PAG written by hand, outside headpag's runtime: the reference that head-level PAG on a pipeline call must equal.

`reference_pag(pipe, ...)` runs the *stock* pipeline call and adds `s (v_c - v_p)` at each scheduler step, where
- `v_c` are the output rows of the step's transformer call whose text embeddings are the positive prompt's (found
  by value: the test knows the prompt, the pipeline's own `encode_prompt` gives its embeddings),
- `v_p` is the same rows recomputed with the explicit attention-map processors of the project's test oracle
  (`reference_forward`: no hooks, no function mode, no prefix sharing).
So the pipeline's own guidance (CFG, true CFG, SLG) is whatever stock diffusers computes, and the PAG term is added
by hand: `v = [stock guidance] + s (v_c - v_p)`.
"""

from __future__ import annotations

import contextlib

import torch

from headpag import HeadSet
from headpag.guidance import Perturbation
from headpag.runtime import describe_transformer
from headpag.testing.processors import reference_forward


def select_rows(value, batch: int, rows: list[int]):
    """`value` with only `rows` of every tensor whose leading size is `batch` (lists, tuples, dicts walked)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, batch, rows) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, batch, rows) for k, v in value.items()}
    return value


def sample_of(output):
    return output[0] if isinstance(output, tuple) else output.sample


@contextlib.contextmanager
def reference_pag(
    pipe,
    heads: str,
    scale: float,
    u: float,
    positive: torch.Tensor,
    steps: range | None = None,
    reuse: int = 1,
    scale_at=None,
):
    """
    Inside the block, stock calls of `pipe` get `s (v_c - v_p)` added at every scheduler step (or at `steps`).

    Args:
        pipe: A stock diffusers pipeline (no head_pag block open on it).
        heads (`str`): Head spec. scale (`float`): `s`. u (`float`): identity weight.
        positive (`torch.Tensor`): The positive prompt's text embeddings `(tokens, dim)`; a row of a transformer
            call is conditional when its `encoder_hidden_states` equal them (and it is not a skip-layer call).
        steps (`range`, *optional*): The steps that get the term (all by default).
        reuse (`int`, defaults to 1): `v_c - v_p` is computed on steps 0, k, 2k, ... counted from the first step that
            gets the term, and reused in between.
        scale_at (`Callable[[float], float]`, *optional*): The scale at scheduler timestep `t` (else `scale`).
    """
    transformer = pipe.transformer
    layout = describe_transformer(transformer)
    head_set = HeadSet.parse(heads).resolve(layout.num_layers, layout.num_heads)
    calls, busy, counter, inputs, delta = [], [False], [0], [], [None]
    first = 0 if steps is None else steps.start

    def snapshot(module, args, kwargs):  # before the forward: FLUX pops IP-Adapter embeddings out of its kwargs
        if not busy[0]:
            inputs.append({k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()})

    def record(module, args, kwargs, output):
        if not busy[0]:
            calls.append((inputs.pop(), sample_of(output)))

    scheduler = pipe.scheduler
    original = type(scheduler).step

    def step(sched, model_output, timestep, *args, **kwargs):
        i = counter[0]
        active = steps is None or i in steps
        if sched is scheduler and active and (i - first) % reuse != 0:  # a step that reuses the last v_c - v_p
            s = scale if scale_at is None else scale_at(float(timestep))
            if s > 0:
                model_output = model_output + s * delta[0][:, : model_output.shape[1]].to(model_output.dtype)
            counter[0] += 1
            calls.clear()
        elif sched is scheduler:
            terms = []
            for call_kwargs, out in calls:
                text = call_kwargs["encoder_hidden_states"]
                if call_kwargs.get("skip_layers") is not None:
                    continue
                rows = [i for i in range(text.shape[0]) if torch.allclose(text[i], positive.to(text.dtype), atol=1e-4)]
                if not rows:
                    continue
                batch = text.shape[0]
                busy[0] = True
                try:
                    v_p = sample_of(
                        reference_forward(
                            transformer, select_rows(call_kwargs, batch, rows), [head_set], Perturbation(u)
                        )
                    )
                finally:
                    busy[0] = False
                terms.append(out[rows] - v_p)
            assert len(terms) == 1, f"expected one conditional call per step, found {len(terms)}"
            s = scale if scale_at is None else scale_at(float(timestep))
            if active and s > 0:
                delta[0] = terms[0]
                model_output = model_output + s * terms[0][:, : model_output.shape[1]].to(model_output.dtype)
            counter[0] += 1
            calls.clear()
        return original(sched, model_output, timestep, *args, **kwargs)

    handles = [
        transformer.register_forward_pre_hook(snapshot, with_kwargs=True, prepend=True),
        transformer.register_forward_hook(record, with_kwargs=True),
    ]
    type(scheduler).step = step
    try:
        yield
    finally:
        type(scheduler).step = original
        for handle in handles:
            handle.remove()


def positive_embeds(pipe, prompt: str, **kwargs) -> torch.Tensor:
    """The positive prompt's text embeddings `(tokens, dim)` as the pipeline encodes them."""
    if hasattr(pipe, "text_encoder_3"):
        out = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False, **kwargs)
    else:
        out = pipe.encode_prompt(prompt, prompt, **kwargs)
    return out[0][0]
