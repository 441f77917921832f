"""The Generate tab: the PAG image and the same seed without PAG, with the `/generate` and `/cancel` endpoints."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr

from ...pipelines.settings import GenerationSettings
from .. import inputs
from ..generate import check_settings, generate_pair
from ..storage import png_bound
from .common import AppContext, by_name, check_uploaded_image, client, decode_image


SCOPES = ("joint", "image")
TARGETS = ("identity", "uniform", "query_mean")


def given(read, value, *args, **kwargs):
    """`read(value, ...)`, or `None` (the model's recommendation) when the client left the value out."""
    return None if value is None else read(value, *args, **kwargs)


def interval(start, stop) -> tuple[float, float] | None:
    """The PAG interval from its two sliders; `None` (the model's) when both are left out, a left-out end otherwise
    taking the built-in one."""
    if start is None and stop is None:
        return None
    return (
        0.0 if start is None else inputs.number(start, "pag_interval_start", minimum=0, maximum=1),
        1.0 if stop is None else inputs.number(stop, "pag_interval_stop", minimum=0, maximum=1),
    )


def build(ctx: AppContext, pag_heads: gr.Textbox) -> SimpleNamespace:
    r"""
    Lay out the tab and wire its events.

    Args:
        ctx ([`AppContext`]): The app.
        pag_heads (`gr.Textbox`): The head-set field shared by the tabs.

    Returns:
        The components other tabs use (`steps`, `width`, `height`, `guidance`, `true_cfg`, `gallery_state`).
    """
    host, limits = ctx.host, ctx.limits
    d = ctx.family_defaults()
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(value=d["prompt"], label="Prompt", lines=2, elem_id="prompt")
                note = gr.Markdown(d["note"], elem_id="model-note")
                negative_prompt = gr.Textbox(value="", label="Negative prompt", elem_id="negative-prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                    randomize = gr.Checkbox(label="Randomize seed", value=False)
                with gr.Row():
                    steps = gr.Slider(1, limits.max_steps, value=d["steps"], step=1, label="Steps")
                    top = max(16, limits.max_size // 16 * 16)
                    width = gr.Slider(16, top, value=d["size"], step=16, label="Width")
                    height = gr.Slider(16, top, value=d["size"], step=16, label="Height")
                with gr.Row():
                    guidance = gr.Slider(
                        0, min(20, limits.max_scale), value=d["guidance"], step=0.1, label=d["guidance_label"]
                    )
                    true_cfg = gr.Slider(
                        1,
                        max(1, min(10, limits.max_scale)),
                        value=d["true_cfg"],
                        step=0.1,
                        label="True CFG (FLUX; an empty negative prompt is the empty prompt)",
                        visible=d["flux"],
                    )
                with gr.Row():
                    pag_scale = gr.Slider(
                        0,
                        max(min(15, limits.max_scale), d["pag_scale"]),
                        value=d["pag_scale"],
                        step=0.1,
                        label="PAG scale",
                        elem_id="pag-scale",
                    )
                    identity_weight = gr.Slider(
                        0, 1, value=d["pag_identity_weight"], step=0.05, label="Identity weight u", elem_id="u"
                    )
                with gr.Row():
                    scope = gr.Radio(list(SCOPES), value=d["pag_identity_scope"], label="Identity scope")
                    target = gr.Radio(list(TARGETS), value=d["pag_target"], label="Target")
                with gr.Row():
                    start, stop = d["pag_interval"]
                    interval_start = gr.Slider(0, 1, value=start, step=0.05, label="PAG from (fraction)")
                    interval_stop = gr.Slider(0, 1, value=stop, step=0.05, label="PAG until (fraction)")
                    reuse = gr.Slider(
                        1,
                        8,
                        value=d["pag_reuse"],
                        step=1,
                        label="PAG every k steps (reuse v_c - v_p in between)",
                        elem_id="reuse",
                    )
                with gr.Accordion("Input image (img2img)", open=False):
                    input_image = gr.Image(label="Input image", type="pil")
                    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    stop = gr.Button("Cancel", elem_id="cancel-btn")
            with gr.Column(scale=3):
                with gr.Row():
                    out_pag = gr.Image(label="With PAG", type="filepath", format="png", height=360, elem_id="out-pag")
                    out_nopag = gr.Image(
                        label="Without PAG (same seed)", type="filepath", format="png", height=360, elem_id="out-nopag"
                    )
                settings_box = gr.Code(label="Settings (also in each PNG's metadata)", language="json")
                gallery = gr.Gallery(label="This session", columns=4, height=260, elem_id="gallery")
                files = gr.File(label="PNG files with their settings", file_count="multiple")
        gallery_state = gr.State([])

    @ctx.readable
    def generate(
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        randomize_seed: bool = False,
        num_inference_steps: int = 8,
        width: int = 64,
        height: int = 64,
        guidance_scale: float = 7.0,
        true_cfg_scale: float = 1.0,
        pag_scale: float | None = None,
        pag_identity_weight: float | None = None,
        pag_identity_scope: str | None = None,
        pag_target: str | None = None,
        pag_interval_start: float | None = None,
        pag_interval_stop: float | None = None,
        pag_reuse: int | None = None,
        pag_heads: str = "",
        image=None,
        strength: float = 0.6,
        gallery_entries: list | None = None,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - how Gradio injects a progress tracker
    ):
        # Every value arrives raw (preprocess=False): read strictly, then check the limits, all before any work.
        prompt = inputs.text(prompt, "prompt", limits)
        if not prompt.strip():
            raise ValueError("Write a prompt first.")
        upload = check_uploaded_image(image, limits)  # header only: decoded after the client is admitted
        negative_prompt = inputs.text(negative_prompt, "negative_prompt", limits)
        true_cfg_scale = inputs.number(true_cfg_scale, "true_cfg_scale", minimum=0) if host.family == "flux" else None
        # FLUX's true CFG needs a negative prompt: an empty box is the empty prompt, as in diffusers
        true_cfg = true_cfg_scale is not None and true_cfg_scale > 1
        settings = GenerationSettings(
            prompt=prompt,
            negative_prompt=negative_prompt if negative_prompt or true_cfg else None,
            pag_heads=inputs.text(pag_heads, "pag_heads", limits).strip() or None,
            # a PAG value left out (None) is the model's recommendation, spelled out before the call
            pag_scale=given(inputs.number, pag_scale, "pag_scale", minimum=0),
            pag_identity_weight=given(inputs.number, pag_identity_weight, "pag_identity_weight", minimum=0, maximum=1),
            pag_identity_scope=given(inputs.choice, pag_identity_scope, "pag_identity_scope", SCOPES),
            pag_target=given(inputs.choice, pag_target, "pag_target", TARGETS),
            pag_interval=interval(pag_interval_start, pag_interval_stop),
            pag_reuse=given(inputs.integer, pag_reuse, "pag_reuse", minimum=1, maximum=limits.max_steps),
            guidance_scale=inputs.number(guidance_scale, "guidance_scale", minimum=0),
            true_cfg_scale=true_cfg_scale,
            num_inference_steps=inputs.integer(num_inference_steps, "num_inference_steps", minimum=1),
            height=inputs.integer(height, "height", minimum=1),
            width=inputs.integer(width, "width", minimum=1),
            seed=inputs.integer(0 if seed is None else seed, "seed", minimum=0, maximum=2**63 - 1),
            strength=inputs.number(strength, "strength", minimum=0, maximum=1) if upload is not None else None,
        )
        randomize_seed = inputs.flag(randomize_seed, "randomize_seed")
        host.require()
        check_settings(host, settings, limits)
        session = (request.session_hash if request is not None else "") or ""
        host.clear_cancel(session)  # a cancel from now on (even while waiting for the model) stops this call
        who = client(request)
        bound = png_bound(settings.width or 1024, settings.height or 1024, 2)
        with ctx.store.reserve(who, bound) as saved, ctx.admission.enter(who, "generation"):
            result = generate_pair(
                host,
                settings,
                image=decode_image(upload),
                randomize_seed=randomize_seed,
                session=session,
                progress=lambda fraction, text: progress(fraction, desc=text),
                limits=limits,
                on_saved=saved,
            )
        entries = list(gallery_entries or []) + [
            {
                "pag_path": str(result.pag_path),
                "nopag_path": str(result.nopag_path),
                "prompt": settings.prompt,
                "seed": settings.seed,
                "settings": json.loads(settings.to_json()) | {"model": result.model},
                "caption": result.caption(),
            }
        ]
        items = [(e["pag_path"], e["caption"]) for e in reversed(entries)]
        all_files = [p for e in reversed(entries) for p in (e["pag_path"], e["nopag_path"])]
        settings_text = json.dumps(entries[-1]["settings"], indent=2)
        return str(result.pag_path), str(result.nopag_path), settings_text, items, all_files, entries, settings.seed

    gen_inputs = by_name(
        generate,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        randomize_seed=randomize,
        num_inference_steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance,
        true_cfg_scale=true_cfg,
        pag_scale=pag_scale,
        pag_identity_weight=identity_weight,
        pag_identity_scope=scope,
        pag_target=target,
        pag_interval_start=interval_start,
        pag_interval_stop=interval_stop,
        pag_reuse=reuse,
        pag_heads=pag_heads,
        image=input_image,
        strength=strength,
        gallery_entries=gallery_state,
    )
    gen_outputs = [out_pag, out_nopag, settings_box, gallery, files, gallery_state, seed]
    # preprocess=False: the handler reads every raw value itself, so that limits and non-finite numbers are refused
    # with messages that name them; concurrency_limit=None: admission is bounded by the handler (max_queue...).
    common = dict(preprocess=False, concurrency_limit=None)
    gen_event = go.click(generate, gen_inputs, gen_outputs, api_name="generate", **common)
    submit_event = prompt.submit(generate, gen_inputs, gen_outputs, api_visibility="private", **common)

    def cancel(request: gr.Request):
        host.cancel(request.session_hash)
        gr.Info("Cancelling after the current step.")

    stop.click(cancel, None, None, cancels=[gen_event, submit_event], api_name="cancel")

    def show_entry(entries: list, evt: gr.SelectData):
        index = len(entries or []) - 1 - (evt.index if isinstance(evt.index, int) else -1)
        if not entries or not 0 <= index < len(entries):
            return gr.skip()
        return json.dumps(entries[index]["settings"], indent=2)

    gallery.select(show_entry, gallery_state, settings_box, api_visibility="private")
    return SimpleNamespace(
        prompt=prompt,
        note=note,
        steps=steps,
        width=width,
        height=height,
        guidance=guidance,
        true_cfg=true_cfg,
        gallery_state=gallery_state,
        pag=[pag_scale, identity_weight, scope, target, interval_start, interval_stop, reuse],
    )
