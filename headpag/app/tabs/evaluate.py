"""The Evaluate tab: score the session gallery or an image folder of the eval root (`/evaluate`), and show an
`headpag eval` report of the eval root by run name (`/eval_report`)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ...eval.scoring import metric_names
from .. import evaluate as ev
from .. import inputs, models
from .common import AppContext, by_name, client


SOURCES = ("gallery", "folder")


def build(ctx: AppContext, gallery_state: gr.State) -> SimpleNamespace:
    r"""
    Lay out the tab and wire its events.

    Args:
        ctx ([`AppContext`]): The app.
        gallery_state (`gr.State`): The session's generations (from the Generate tab).
    """
    host, limits, roots = ctx.host, ctx.limits, ctx.roots
    with gr.Tab("Evaluate", id="evaluate") as tab:
        with gr.Row():
            with gr.Column():
                e_source = gr.Radio(list(SOURCES), value="gallery", label="Score")
                e_folder = gr.Dropdown(
                    ev.image_folders(roots),
                    value="",
                    allow_custom_value=True,
                    label="Image folder (in the eval folder; a folder of images or of sub-folders)",
                )
                e_prompts = gr.Textbox(value="", label="Prompts for images without metadata (one per line)", lines=2)
                e_metrics = gr.CheckboxGroup(list(metric_names()), value=["clip"], label="Metrics")
                e_clip_model = gr.Textbox(
                    label="CLIP model (open_clip name, or a config .json in the models folder)", value="ViT-L-14"
                )
                e_clip_checkpoint = gr.Textbox(value="", label="CLIP weights (file name in the models folder)")
                e_pickscore = gr.Textbox(value="", label="PickScore (hub id, or folder name in the models folder)")
                e_reference = gr.Dropdown(
                    ev.image_folders(roots),
                    value="",
                    allow_custom_value=True,
                    label="Reference images (FID/KID; a folder in the eval folder)",
                )
                e_inception = gr.Textbox(value="", label="Inception weights (FID/KID; file name in the models folder)")
                e_btn = gr.Button("Score", variant="primary", elem_id="evaluate-btn")
            with gr.Column():
                e_table = gr.Dataframe(label="Scores", interactive=False, wrap=True)
                e_json = gr.JSON(label="Details")
                r_run = gr.Dropdown(
                    ev.report_runs(roots), value="", allow_custom_value=True, label="`headpag eval` run (eval folder)"
                )
                r_btn = gr.Button("Show comparison report")
                r_md = gr.Markdown()
                r_gallery = gr.Gallery(label="Plots and grids", columns=2)

    def refresh():
        folders = ev.image_folders(roots)
        return gr.update(choices=folders), gr.update(choices=folders), gr.update(choices=ev.report_runs(roots))

    tab.select(refresh, None, [e_folder, e_reference, r_run], api_visibility="private")

    @ctx.readable
    def evaluate(
        source: str = "gallery",
        folder: str = "",
        prompts: str = "",
        metrics: list[str] | None = None,
        clip_model: str = "ViT-L-14",
        clip_checkpoint: str = "",
        pickscore_model: str = "",
        reference_images: str = "",
        inception_weights: str = "",
        gallery_entries: list | None = None,
        request: gr.Request = None,
        progress=gr.Progress(),  # noqa: B008 - how Gradio injects a progress tracker
    ):
        source = inputs.choice(source or "gallery", "source", SOURCES)
        metrics = metrics if metrics else ["clip"]
        allowed = metric_names()
        if not isinstance(metrics, list) or not all(isinstance(m, str) and m in allowed for m in metrics):
            raise ValueError(f"metrics must be a list of {', '.join(allowed)}.")
        prompt_lines = inputs.lines(prompts, "prompts", limits)
        if source == "folder":
            if not folder:
                raise ValueError("Choose an image folder (a folder in the server's eval folder).")
            sets = ev.folder_sets(roots, folder, prompt_lines, limits)
        else:
            sets = ev.gallery_sets(gallery_entries or [], roots)
        resolved = dict(
            clip_model=models.clip_model(inputs.text(clip_model, "clip_model", limits).strip(), roots),
            clip_checkpoint=models.weights_file(clip_checkpoint or None, roots, "CLIP weights file"),
            pickscore_model=models.hub_or_folder(pickscore_model or None, roots, "PickScore model"),
            reference_images=ev.reference_folder(roots, reference_images or None),
            inception_weights=models.weights_file(inception_weights or None, roots, "Inception weights file"),
        )
        with ctx.admission.enter(client(request), "scoring"):
            progress(0, desc="Scoring...")
            rows = ev.evaluate_sets(host, sets, metrics, **resolved)
        table = ev.table(rows)
        width = max(len(r) for r in table)
        headers = ["images", "count"] + [f"metric {i + 1}" for i in range(width - 2)]
        details = [{k: r[k] for k in ("name", "count", "metrics")} for r in rows]
        return gr.update(value=[r + [""] * (width - len(r)) for r in table], headers=headers), details

    e_inputs = by_name(
        evaluate,
        source=e_source,
        folder=e_folder,
        prompts=e_prompts,
        metrics=e_metrics,
        clip_model=e_clip_model,
        clip_checkpoint=e_clip_checkpoint,
        pickscore_model=e_pickscore,
        reference_images=e_reference,
        inception_weights=e_inception,
        gallery_entries=gallery_state,
    )
    e_btn.click(evaluate, e_inputs, [e_table, e_json], api_name="evaluate", preprocess=False, concurrency_limit=None)

    @ctx.readable
    def eval_report(run: str):
        return ev.load_eval_report(roots, run)

    r_btn.click(eval_report, r_run, [r_md, r_gallery], api_name="eval_report", preprocess=False)
    return SimpleNamespace()
