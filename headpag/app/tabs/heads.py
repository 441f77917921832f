"""The Heads tab: the clickable layer x head grid, head-set files, and a search run's scores on the grid."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import gradio as gr

from ...guidance import HeadSet
from ...guidance.presets import list_presets, load_preset
from ...search.rundir import RunDirectory
from .. import inputs
from ..heads_grid import cell_at, selected_pairs, toggle
from ..search import run_scores
from .common import AppContext, client, scores_from_state


MAX_HEADSET_FILE_BYTES = 1 << 20  # a head-set file is a few kB; anything larger is not one


def search_runs(ctx: AppContext) -> list[str]:
    """Names of the search runs (folders of the search root with a `config.json`)."""
    return ctx.roots.names("search", folder=True, predicate=lambda p: RunDirectory(p).exists())


def build(ctx: AppContext, pag_heads: gr.Textbox) -> SimpleNamespace:
    r"""
    Lay out the tab and wire its events (all UI-only: none is callable by name through the API).

    Args:
        ctx ([`AppContext`]): The app.
        pag_heads (`gr.Textbox`): The head-set field shared by the tabs.

    Returns:
        The components other tabs use (`grid`, `scores_state`, `runs`).
    """
    host, limits, roots = ctx.host, ctx.limits, ctx.roots
    with gr.Tab("Heads", id="heads") as heads_tab:
        gr.Markdown(
            "Click a cell to toggle that head (rows: layers, columns: heads). FLUX: the blue line separates "
            "double-stream from single-stream layers. With a search loaded, cells show its scores."
        )
        with gr.Row():
            with gr.Column(scale=3):
                grid = gr.Image(
                    value=ctx.grid_image(""),
                    label="Layer × head grid",
                    interactive=False,
                    type="pil",
                    elem_id="head-grid",
                    buttons=[],
                )
            with gr.Column(scale=2):
                with gr.Row():
                    presets = gr.Dropdown(
                        [(f"{p.name}: {p.description}", p.name) for p in list_presets()],
                        value=None,
                        label="Ready-made head set (from the HeadHunter paper's figures)",
                        elem_id="heads-preset",
                    )
                    preset_btn = gr.Button("Use preset", scale=0)
                heads_upload = gr.File(label="Load head-set file", file_types=[".json"], height=80)
                save_btn = gr.Button("Save head set")
                saved_file = gr.File(label="Head-set file", interactive=False, height=80)
                runs = gr.Dropdown(
                    search_runs(ctx), value="", label="Search run (colours the grid)", allow_custom_value=True
                )
                with gr.Row():
                    load_report_btn = gr.Button("Load search scores")
                    top_k = gr.Number(label="top-k", value=3, precision=0, minimum=1)
                    apply_btn = gr.Button("Apply top-k")
                scores_state = gr.State(None)

    def redraw(spec: str, scores_state):
        return ctx.grid_image(spec, scores_from_state(scores_state))

    pag_heads.input(redraw, [pag_heads, scores_state], grid, api_visibility="private")
    heads_tab.select(redraw, [pag_heads, scores_state], grid, api_visibility="private")  # hidden tabs miss updates
    heads_tab.select(lambda: gr.update(choices=search_runs(ctx)), None, runs, api_visibility="private")

    def click_cell(spec: str, scores_state, evt: gr.SelectData):
        layout = host.layout
        index = evt.index
        if layout is None or not isinstance(index, (list, tuple)) or len(index) != 2:
            return gr.update(), gr.update()
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in index):
            return gr.update(), gr.update()
        cell = cell_at(index[0], index[1], layout.num_layers, layout.num_heads)
        if cell is None:
            return gr.update(), gr.update()
        try:
            spec = toggle(spec, *cell, layout.num_layers, layout.num_heads)
        except ValueError:  # the text held a bad spec: start again from this head
            spec = toggle("", *cell, layout.num_layers, layout.num_heads)
        return spec, ctx.grid_image(spec, scores_from_state(scores_state))

    grid.select(click_cell, [pag_heads, scores_state], [pag_heads, grid], api_visibility="private")

    @ctx.readable
    def load_heads_file(file):
        if file is None:
            return gr.update(), gr.update()
        path = file if isinstance(file, str) else file.name
        if os.path.getsize(path) > MAX_HEADSET_FILE_BYTES:
            raise ValueError(f"The uploaded file is over {MAX_HEADSET_FILE_BYTES} bytes: not a head-set file.")
        try:
            heads = HeadSet.load(path)
        except ValueError as e:
            raise ValueError(str(e).replace(str(path), "the uploaded file")) from None
        spec = str(heads)
        if host.layout is not None:
            inputs.head_spec(spec, host.layout.num_layers, host.layout.num_heads, limits)
        return spec, ctx.grid_image(spec)

    heads_upload.upload(load_heads_file, heads_upload, [pag_heads, grid], api_visibility="private")

    @ctx.readable
    def use_preset(name):
        if not isinstance(name, str) or not name:
            raise ValueError("Choose a ready-made head set first.")
        layout = host.layout
        if layout is None:
            raise ValueError("Load a model first.")
        heads = load_preset(name, num_layers=layout.num_layers, num_heads=layout.num_heads, family=layout.family)
        spec = str(heads)
        return spec, ctx.grid_image(spec)

    preset_btn.click(use_preset, presets, [pag_heads, grid], api_visibility="private")

    @ctx.readable
    def save_heads(spec: str, request: gr.Request = None):
        layout = host.layout
        if layout is None:
            raise ValueError("Load a model first.")
        heads = HeadSet(sorted(selected_pairs(spec, layout.num_layers, layout.num_heads, limits)))
        if not len(heads.pairs()):
            raise ValueError("The head set is empty: click cells in the grid or type a spec.")
        who = client(request)
        with ctx.store.reserve(who, 64 * 1024) as saved:  # a head-set file is a few kB
            path = roots.output / f"heads-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(6).hex()}.json"
            heads.save(
                path,
                model_family=layout.family,
                model_name=host.model_name,
                num_layers=layout.num_layers,
                num_heads=layout.num_heads,
                provenance={"method": "headpag ui"},
            )
            saved(path)
        return str(path)

    save_btn.click(save_heads, pag_heads, saved_file, api_visibility="private")

    @ctx.readable
    def load_scores(run: str, spec: str):
        folder = roots.path("search", run, "search run", folder=True)
        roots.check_tree("search", folder, f"search run {run!r}")
        _, scores, _ = run_scores(folder, name=run, limits=ctx.limits)
        if not scores:
            raise ValueError(f"Search run {run!r} has no scored candidates yet.")
        state = {f"{layer}.{head}": score for (layer, head), score in scores.items()}
        return state, ctx.grid_image(spec, scores)

    load_report_btn.click(load_scores, [runs, pag_heads], [scores_state, grid], api_visibility="private")

    @ctx.readable
    def apply_top_k(scores_state, k):
        scores = scores_from_state(scores_state)
        if not scores:
            raise ValueError("Load a search's scores first.")
        k = min(inputs.integer(1 if k is None else k, "top-k", minimum=1), len(scores))
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        spec = str(HeadSet(sorted(h for h, _ in ranked)))
        return spec, ctx.grid_image(spec, scores)

    apply_btn.click(apply_top_k, [scores_state, top_k], [pag_heads, grid], api_visibility="private")
    return SimpleNamespace(grid=grid, scores_state=scores_state, runs=runs)
