"""The model box above the tabs, with the `/load_model` endpoint: hub ids, the tiny models and folders of the models
root, by name; switched off with `--no-model-switch`."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
from diffusers.utils import logging

from ...models.catalog import DEFAULT_MODEL
from .. import inputs
from ..heads_grid import selected_pairs
from ..models import pipeline_folders, resolve_pipeline
from .common import KNOWN_MODELS, AppContext, client


logger = logging.get_logger(__name__)


def build(ctx: AppContext) -> SimpleNamespace:
    """The model box and its status line (the load event is wired by [`wire`] once every tab exists)."""
    host = ctx.host
    choices = list(dict.fromkeys([*KNOWN_MODELS, *pipeline_folders(ctx.roots)]))
    with gr.Row(equal_height=True):
        label = (
            "Model (hub id owner/name, a folder name in the server's models folder, or an offline tiny model)"
            if ctx.model_switch
            else "Model (fixed by the server)"
        )
        model_box = gr.Dropdown(
            choices,
            value=host.model_name or (DEFAULT_MODEL if host.error else None),
            allow_custom_value=True,
            label=label,
            scale=4,
            elem_id="model-box",
            interactive=ctx.model_switch,
        )
        load_btn = gr.Button("Load model", scale=1, elem_id="load-model", interactive=ctx.model_switch)
    model_status = gr.Markdown(host.status_markdown(), elem_id="model-status")
    return SimpleNamespace(model_box=model_box, load_btn=load_btn, model_status=model_status)


def describe_failure(name: str, local: bool, error: Exception) -> str:
    """Why a client's model did not load, without quoting any file (the log has the details)."""
    if local:
        return (
            f"Model folder {name!r} could not be loaded ({type(error).__name__}): it must be a diffusers pipeline "
            "folder of Stable Diffusion 3 / 3.5 or FLUX.1. The server log has the details."
        )
    if isinstance(error, ValueError) and not isinstance(error, UnicodeError):
        text = str(error).splitlines()[0] if str(error) else ""
        return f"Could not load {name!r}: {text[:300]}"
    return f"Could not load {name!r} ({type(error).__name__}; the server log has the details)."


def wire(ctx: AppContext, box: SimpleNamespace, pag_heads: gr.Textbox, grid: gr.Image, gen, search) -> None:
    r"""
    Wire `/load_model` to the controls that follow the model family.

    Args:
        ctx ([`AppContext`]): The app. box: From [`build`]. pag_heads, grid: The shared head field and grid.
        gen, search: The Generate and Search tabs' components (`steps`, `width`, ..., the PAG controls `pag`, and
            `steps`, `size`): a loaded model sets them to its recommendations.
    """
    host, limits = ctx.host, ctx.limits
    outputs = [
        box.model_status,
        grid,
        gen.steps,
        gen.width,
        gen.height,
        gen.guidance,
        gen.true_cfg,
        search.steps,
        search.size,
        pag_heads,
        gen.note,
        *gen.pag,
    ]

    def family_updates(spec: str):
        d = ctx.family_defaults()
        return [
            host.status_markdown(),
            ctx.grid_image(spec),
            gr.update(value=d["steps"]),
            gr.update(value=d["size"]),
            gr.update(value=d["size"]),
            gr.update(value=d["guidance"], label=d["guidance_label"]),
            gr.update(visible=d["flux"]),
            gr.update(value=d["steps"]),
            gr.update(value=d["size"]),
            spec,
            gr.update(value=d["note"]),
            *(gr.update(value=d[name]) for name in ("pag_scale", "pag_identity_weight", "pag_identity_scope")),
            gr.update(value=d["pag_target"]),
            gr.update(value=d["pag_interval"][0]),
            gr.update(value=d["pag_interval"][1]),
            gr.update(value=d["pag_reuse"]),
        ]

    @ctx.readable
    def load_model(model: str, spec: str = "", request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        if not ctx.model_switch:
            raise ValueError("Loading another model is switched off on this server (--no-model-switch).")
        model = inputs.text(model, "model", limits)
        spec = inputs.text(spec, "spec", limits)
        choice = resolve_pipeline(model, ctx.roots)
        with ctx.admission.enter(client(request), "model load"):
            progress(0, desc=f"Loading {choice.name}...")
            try:
                host.load(choice.target, name=choice.name)
            except Exception as e:  # noqa: BLE001 - shown in the status line; the previous model stays loaded
                logger.warning("could not load %r: %r", choice.name, e)
                message = describe_failure(choice.name, choice.local, e)
                return [f"**Could not load** `{choice.name}`. {message}\n\n{host.status_markdown()}"] + [
                    gr.update()
                ] * (len(outputs) - 1)
        try:
            selected_pairs(spec, host.layout.num_layers, host.layout.num_heads, limits)
        except ValueError:
            spec = ""
        return family_updates(spec)

    box.load_btn.click(
        load_model, [box.model_box, pag_heads], outputs, api_name="load_model", preprocess=False, concurrency_limit=1
    )
