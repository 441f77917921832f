"""
The Gradio app: a model box and four tabs (Generate, Heads, Search, Evaluate), with named API endpoints
`generate`, `search` and `evaluate` whose arguments carry the pipeline's names.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time

import gradio as gr
from diffusers.utils import logging

from ..guidance import HeadSet
from ..pipelines.settings import GenerationSettings
from ..pipelines.tiny import TINY_MODELS
from . import evaluate as ev
from .generate import Cancelled, generate_pair
from .heads_grid import cell_at, render_grid, selected_pairs, toggle
from .host import ModelHost
from .search import SearchJob, config_from_run_dir, run_scores


logger = logging.get_logger(__name__)

KNOWN_MODELS = [
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell",
    *TINY_MODELS,
]
CSS = """
#head-grid img { image-rendering: pixelated; cursor: pointer; }
.field-error { color: #b42318; font-size: 0.9em; }
.field-ok { color: #067647; font-size: 0.9em; }
"""


def readable_errors(fn):
    """Turn exceptions into `gr.Error` messages (no stack trace in the UI); the app keeps serving."""

    def convert(e: Exception) -> gr.Error:
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, (ValueError, Cancelled)):
            return gr.Error(str(e))
        logger.exception("request failed")
        return gr.Error(f"{type(e).__name__}: {e}")

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise convert(e) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise convert(e) from None

    return wrapper


def family_defaults(host: ModelHost) -> dict:
    """Control defaults for the loaded family (tiny models: few steps, small images)."""
    tiny = host.model_name in TINY_MODELS or host.pipe is None  # nothing loaded: the tiny models are offered
    if host.family == "flux":
        return dict(
            steps=4 if tiny else 28,
            size=64 if tiny else 1024,
            guidance=3.5,
            guidance_label="Guidance embedding (FLUX)",
            flux=True,
        )
    return dict(
        steps=8 if tiny else 28,
        size=64 if tiny else 1024,
        guidance=7.0,
        guidance_label="CFG scale (off at <= 1)",
        flux=False,
    )


def spec_check(host: ModelHost, spec: str) -> str:
    """A one-line verdict on a head spec, shown next to the field."""
    if host.layout is None:
        return ""
    if not (spec or "").strip():
        return "<span class='field-ok'>Empty: the pipeline's default heads.</span>"
    try:
        pairs = selected_pairs(spec, host.layout.num_layers, host.layout.num_heads)
    except ValueError as e:
        return f"<span class='field-error'>⚠ {e}</span>"
    layers = sorted({l for l, _ in pairs})
    return f"<span class='field-ok'>✓ {len(pairs)} heads on layer(s) {', '.join(map(str, layers))}.</span>"


def grid_image(host: ModelHost, spec: str, scores: dict | None = None):
    if host.layout is None:
        return None
    layout = host.layout
    try:
        chosen = selected_pairs(spec, layout.num_layers, layout.num_heads)
    except ValueError:
        chosen = set()
    return render_grid(layout.num_layers, layout.num_heads, chosen, scores, layout.num_double_blocks)


def _scores_from_state(state) -> dict | None:
    return None if not state else {tuple(map(int, k.split("."))): v for k, v in state.items()}


def build_app(host: ModelHost, search_dir: str | os.PathLike = "runs/ui-search") -> gr.Blocks:
    r"""
    Build the app around a [`ModelHost`].

    Args:
        host ([`ModelHost`]): The model (may hold a start-up error instead).
        search_dir (`str`): Default run directory of the Search tab.
    """
    jobs: dict[str, SearchJob] = {}
    d = family_defaults(host)

    with gr.Blocks(title="headpag", analytics_enabled=False) as demo:
        gr.Markdown(
            "## headpag: head-level perturbed-attention guidance\n"
            "Pick attention heads to perturb (SoftPAG `A ← (1−u)A + uI`), compare with the same seed without PAG, "
            "search heads with HeadHunter and score the results."
        )
        with gr.Row(equal_height=True):
            model_box = gr.Dropdown(
                KNOWN_MODELS,
                value=host.model_name or (TINY_MODELS[0] if host.error else None),
                allow_custom_value=True,
                label="Model (hub id, local diffusers folder, or an offline tiny model)",
                scale=4,
                elem_id="model-box",
            )
            load_btn = gr.Button("Load model", scale=1, elem_id="load-model")
        model_status = gr.Markdown(host.status_markdown(), elem_id="model-status")
        with gr.Row(equal_height=True):
            pag_heads = gr.Textbox(
                value="",
                label="Head set (used by Generate; type a spec, or click the grid in the Heads tab)",
                placeholder="e.g. 7 (whole layer), 11.15, 3.0-5; empty = the pipeline's default heads",
                elem_id="pag-heads",
                scale=4,
            )
            pag_heads_check = gr.HTML(spec_check(host, ""), elem_id="pag-heads-check")

        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox(value="", label="Prompt", lines=2, elem_id="prompt")
                        negative_prompt = gr.Textbox(value="", label="Negative prompt", elem_id="negative-prompt")
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                            randomize = gr.Checkbox(label="Randomize seed", value=False)
                        with gr.Row():
                            steps = gr.Slider(1, 100, value=d["steps"], step=1, label="Steps")
                            width = gr.Slider(16, 2048, value=d["size"], step=16, label="Width")
                            height = gr.Slider(16, 2048, value=d["size"], step=16, label="Height")
                        with gr.Row():
                            guidance = gr.Slider(0, 20, value=d["guidance"], step=0.1, label=d["guidance_label"])
                            true_cfg = gr.Slider(
                                1, 10, value=1.0, step=0.1, label="True CFG (FLUX)", visible=d["flux"]
                            )
                        with gr.Row():
                            pag_scale = gr.Slider(0, 15, value=3.0, step=0.1, label="PAG scale")
                            identity_weight = gr.Slider(0, 1, value=1.0, step=0.05, label="Identity weight u")
                        with gr.Row():
                            scope = gr.Radio(["joint", "image"], value="joint", label="Identity scope")
                            target = gr.Radio(["identity", "uniform", "query_mean"], value="identity", label="Target")
                        with gr.Row():
                            interval_start = gr.Slider(0, 1, value=0.0, step=0.05, label="PAG from (fraction)")
                            interval_stop = gr.Slider(0, 1, value=1.0, step=0.05, label="PAG until (fraction)")
                        with gr.Accordion("Input image (img2img)", open=False):
                            input_image = gr.Image(label="Input image", type="pil")
                            strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                            stop = gr.Button("Cancel", elem_id="cancel-btn")
                    with gr.Column(scale=3):
                        with gr.Row():
                            out_pag = gr.Image(
                                label="With PAG", type="filepath", format="png", height=360, elem_id="out-pag"
                            )
                            out_nopag = gr.Image(
                                label="Without PAG (same seed)",
                                type="filepath",
                                format="png",
                                height=360,
                                elem_id="out-nopag",
                            )
                        settings_box = gr.Code(label="Settings (also in each PNG's metadata)", language="json")
                        gallery = gr.Gallery(label="This session", columns=4, height=260, elem_id="gallery")
                        files = gr.File(label="PNG files with their settings", file_count="multiple")
                gallery_state = gr.State([])

            # ---------------------------------------------------------------- Heads
            with gr.Tab("Heads", id="heads") as heads_tab:
                gr.Markdown(
                    "Click a cell to toggle that head (rows: layers, columns: heads). FLUX: the blue line separates "
                    "double-stream from single-stream layers. With a search loaded, cells show its scores."
                )
                with gr.Row():
                    with gr.Column(scale=3):
                        grid = gr.Image(
                            value=grid_image(host, ""),
                            label="Layer × head grid",
                            interactive=False,
                            type="pil",
                            elem_id="head-grid",
                            buttons=[],
                        )
                    with gr.Column(scale=2):
                        heads_upload = gr.File(label="Load head-set file", file_types=[".json"], height=80)
                        save_btn = gr.Button("Save head set")
                        saved_file = gr.File(label="Head-set file", interactive=False, height=80)
                        report_dir = gr.Textbox(label="Search run directory (colours the grid)", value=str(search_dir))
                        with gr.Row():
                            load_report_btn = gr.Button("Load search scores")
                            top_k = gr.Number(label="top-k", value=3, precision=0, minimum=1)
                            apply_btn = gr.Button("Apply top-k")
                        scores_state = gr.State(None)

            # ---------------------------------------------------------------- Search
            with gr.Tab("Search", id="search"):
                with gr.Row():
                    with gr.Column(scale=2):
                        s_prompts = gr.Textbox(label="Prompts (one per line)", lines=4, value="a cat\na lighthouse")
                        with gr.Row():
                            s_seeds = gr.Textbox(label="Seeds", value="0-1")
                            s_style = gr.Textbox(value="", label="Style prompt (optional)")
                        with gr.Row():
                            s_rounds = gr.Number(label="Rounds", value=1, precision=0, minimum=1)
                            s_top_k = gr.Number(label="Top-k per round", value=3, precision=0, minimum=1)
                            s_pool = gr.Textbox(value="", label="Pool (head spec; empty = all)")
                        with gr.Row():
                            s_objective = gr.Dropdown(["clip", "pickscore"], value="clip", label="Objective")
                            s_objective_model = gr.Textbox(value="", label="Objective weights (file or folder)")
                            s_objective_arch = gr.Textbox(label="CLIP model (name or config JSON)", value="ViT-L-14")
                        with gr.Row():
                            s_steps = gr.Number(label="Steps", value=d["steps"], precision=0, minimum=1)
                            s_size = gr.Number(label="Size", value=d["size"], precision=0, minimum=16)
                            s_pag_scale = gr.Number(label="PAG scale", value=3.0)
                            s_u = gr.Slider(0, 1, value=1.0, step=0.05, label="Identity weight u")
                            s_batch = gr.Number(label="Batch size", value=8, precision=0, minimum=1)
                        s_dir = gr.Textbox(label="Run directory (an existing one resumes)", value=str(search_dir))
                        with gr.Row():
                            s_start = gr.Button("Start search", variant="primary", elem_id="search-btn")
                            s_resume = gr.Button("Resume run directory")
                    with gr.Column(scale=2):
                        s_status = gr.Markdown("No search yet.", elem_id="search-status")
                        s_heatmap = gr.Image(label="Scores of the current round", interactive=False, type="pil")
                        s_selected = gr.Textbox(value="", label="Selected heads", interactive=False)
                        s_use = gr.Button("Use these heads")
                s_timer = gr.Timer(2.0)

            # ---------------------------------------------------------------- Evaluate
            with gr.Tab("Evaluate", id="evaluate"):
                with gr.Row():
                    with gr.Column():
                        e_source = gr.Radio(["gallery", "folder"], value="gallery", label="Score")
                        e_folder = gr.Textbox(value="", label="Image folder (or a folder of sub-folders)")
                        e_prompts = gr.Textbox(
                            value="", label="Prompts for images without metadata (one per line)", lines=2
                        )
                        e_metrics = gr.CheckboxGroup(
                            ["clip", "pickscore", "fid", "kid"], value=["clip"], label="Metrics"
                        )
                        e_clip_model = gr.Textbox(label="CLIP model (name or config JSON)", value="ViT-L-14")
                        e_clip_checkpoint = gr.Textbox(value="", label="CLIP weights file")
                        e_pickscore = gr.Textbox(value="", label="PickScore folder or hub id")
                        e_reference = gr.Textbox(value="", label="Reference images folder (FID/KID)")
                        e_inception = gr.Textbox(value="", label="Inception weights file (FID/KID)")
                        e_btn = gr.Button("Score", variant="primary", elem_id="evaluate-btn")
                    with gr.Column():
                        e_table = gr.Dataframe(label="Scores", interactive=False, wrap=True)
                        e_json = gr.JSON(label="Details")
                        r_dir = gr.Textbox(value="", label="`headpag eval` run directory")
                        r_btn = gr.Button("Show comparison report")
                        r_md = gr.Markdown()
                        r_gallery = gr.Gallery(label="Plots and grids", columns=2)

        # -------------------------------------------------------------------- model box
        family_outputs = [model_status, grid, steps, width, height, guidance, true_cfg, s_steps, s_size, pag_heads]

        def family_updates(spec: str):
            d = family_defaults(host)
            return [
                host.status_markdown(),
                grid_image(host, spec),
                gr.update(value=d["steps"]),
                gr.update(value=d["size"]),
                gr.update(value=d["size"]),
                gr.update(value=d["guidance"], label=d["guidance_label"]),
                gr.update(visible=d["flux"]),
                gr.update(value=d["steps"]),
                gr.update(value=d["size"]),
                spec,
            ]

        def load_model(model: str, spec: str, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc=f"Loading {model}...")
            try:
                host.load(model)
            except Exception as e:  # noqa: BLE001 - shown in the status line; the previous model stays loaded
                message = host.describe_load_error(model, e)
                return [f"**Could not load** `{model}`. {message}\n\n{host.status_markdown()}"] + [gr.update()] * 9
            try:
                selected_pairs(spec, host.layout.num_layers, host.layout.num_heads)
            except ValueError:
                spec = ""
            return family_updates(spec)

        load_btn.click(load_model, [model_box, pag_heads], family_outputs, api_name="load_model")

        # -------------------------------------------------------------------- generate
        @readable_errors
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
            pag_scale: float = 3.0,
            pag_identity_weight: float = 1.0,
            pag_identity_scope: str = "joint",
            pag_target: str = "identity",
            pag_interval_start: float = 0.0,
            pag_interval_stop: float = 1.0,
            pag_heads: str = "",
            image=None,
            strength: float = 0.6,
            gallery_entries: list | None = None,
            request: gr.Request = None,
            progress=gr.Progress(),
        ):
            if not (prompt or "").strip():
                raise ValueError("Write a prompt first.")
            settings = GenerationSettings(
                prompt=prompt,
                negative_prompt=negative_prompt or None,
                pag_heads=(pag_heads or "").strip() or None,
                pag_scale=float(pag_scale),
                pag_identity_weight=float(pag_identity_weight),
                pag_identity_scope=pag_identity_scope,
                pag_target=pag_target,
                pag_interval=(float(pag_interval_start), float(pag_interval_stop)),
                guidance_scale=float(guidance_scale),
                true_cfg_scale=float(true_cfg_scale) if host.family == "flux" else None,
                num_inference_steps=int(num_inference_steps),
                height=int(height),
                width=int(width),
                seed=int(seed or 0),
                strength=float(strength) if image is not None else None,
            )
            session = request.session_hash if request is not None else ""
            result = generate_pair(
                host,
                settings,
                image=image,
                randomize_seed=bool(randomize_seed),
                session=session or "",
                progress=lambda fraction, text: progress(fraction, desc=text),
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
            return (
                str(result.pag_path),
                str(result.nopag_path),
                settings_text,
                items,
                all_files,
                entries,
                settings.seed,
            )

        gen_inputs = [
            prompt,
            negative_prompt,
            seed,
            randomize,
            steps,
            width,
            height,
            guidance,
            true_cfg,
            pag_scale,
            identity_weight,
            scope,
            target,
            interval_start,
            interval_stop,
            pag_heads,
            input_image,
            strength,
            gallery_state,
        ]
        gen_outputs = [out_pag, out_nopag, settings_box, gallery, files, gallery_state, seed]
        gen_event = go.click(generate, gen_inputs, gen_outputs, api_name="generate")
        prompt.submit(generate, gen_inputs, gen_outputs, api_visibility="private")

        def cancel(request: gr.Request):
            host.cancel(request.session_hash)
            gr.Info("Cancelling after the current step.")

        stop.click(cancel, None, None, cancels=[gen_event], api_name="cancel")

        def show_entry(entries: list, evt: gr.SelectData):
            index = len(entries) - 1 - evt.index  # the gallery shows the newest first
            return json.dumps(entries[index]["settings"], indent=2)

        gallery.select(show_entry, gallery_state, settings_box, api_visibility="private")

        # -------------------------------------------------------------------- head set (one field) <-> grid
        def redraw(spec: str, scores_state):
            return grid_image(host, spec, _scores_from_state(scores_state))

        pag_heads.input(redraw, [pag_heads, scores_state], grid, api_visibility="private")
        pag_heads.change(lambda s: spec_check(host, s), pag_heads, pag_heads_check, api_visibility="private")
        heads_tab.select(redraw, [pag_heads, scores_state], grid, api_visibility="private")  # hidden tabs miss updates

        def click_cell(spec: str, scores_state, evt: gr.SelectData):
            layout = host.layout
            if layout is None or evt.index is None:
                return gr.update(), gr.update()
            cell = cell_at(evt.index[0], evt.index[1], layout.num_layers, layout.num_heads)
            if cell is None:
                return gr.update(), gr.update()
            try:
                spec = toggle(spec, *cell, layout.num_layers, layout.num_heads)
            except ValueError:  # the text held a bad spec: start again from this head
                spec = toggle("", *cell, layout.num_layers, layout.num_heads)
            return spec, grid_image(host, spec, _scores_from_state(scores_state))

        grid.select(click_cell, [pag_heads, scores_state], [pag_heads, grid], api_visibility="private")

        @readable_errors
        def load_heads_file(file):
            if file is None:
                return gr.update(), gr.update()
            heads = HeadSet.load(file if isinstance(file, str) else file.name)
            if host.layout is not None:
                heads.resolve(host.layout.num_layers, host.layout.num_heads)
            spec = str(heads)
            return spec, grid_image(host, spec)

        heads_upload.upload(load_heads_file, heads_upload, [pag_heads, grid], api_visibility="private")

        @readable_errors
        def save_heads(spec: str):
            layout = host.layout
            if layout is None:
                raise ValueError("Load a model first.")
            heads = HeadSet(sorted(selected_pairs(spec, layout.num_layers, layout.num_heads)))
            if not len(heads.pairs()):
                raise ValueError("The head set is empty: click cells in the grid or type a spec.")
            path = host.output_dir / f"heads-{time.strftime('%Y%m%d-%H%M%S')}.json"
            heads.save(
                path,
                model_family=layout.family,
                model_name=host.model_name,
                num_layers=layout.num_layers,
                num_heads=layout.num_heads,
                provenance={"method": "headpag ui"},
            )
            return str(path)

        save_btn.click(save_heads, pag_heads, saved_file, api_visibility="private")

        @readable_errors
        def load_scores(run_dir: str, spec: str):
            _, scores, _ = run_scores(run_dir or "")
            if not scores:
                raise ValueError(f"{run_dir} has no scored candidates yet.")
            state = {f"{layer}.{head}": score for (layer, head), score in scores.items()}
            return state, grid_image(host, spec, scores)

        load_report_btn.click(load_scores, [report_dir, pag_heads], [scores_state, grid], api_visibility="private")

        @readable_errors
        def apply_top_k(scores_state, k):
            scores = _scores_from_state(scores_state)
            if not scores:
                raise ValueError("Load a search's scores first.")
            ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[: max(1, int(k or 1))]
            spec = str(HeadSet(sorted(h for h, _ in ranked)))
            return spec, grid_image(host, spec, scores)

        apply_btn.click(apply_top_k, [scores_state, top_k], [pag_heads, grid], api_visibility="private")

        # -------------------------------------------------------------------- search
        def job_view(job: SearchJob | None):
            if job is None:
                return "No search yet.", None, ""
            return job.markdown(), job.heatmap(), job.summary()["selected"]

        def start_job(config, output_dir, objective, objective_model, objective_arch) -> SearchJob:
            current = jobs.get("current")
            if current is not None and current.running:
                raise ValueError(f"A search is already running in {current.output_dir}; wait for it to finish.")
            host.require()
            job = SearchJob(host, config, output_dir, objective, objective_model, objective_arch)
            jobs["current"] = job
            return job.start()

        def follow(job: SearchJob):
            while job.running:
                yield job_view(job)
                time.sleep(0.5)
            yield job_view(job)
            if job.status == "failed":
                raise ValueError(f"Search failed: {job.error}")

        @readable_errors
        def search(
            prompts: str,
            seeds: str = "0",
            style_prompt: str = "",
            rounds: int = 1,
            top_k: int = 3,
            pool: str = "",
            objective: str = "clip",
            objective_model: str = "",
            objective_arch: str = "ViT-L-14",
            num_inference_steps: int = 8,
            size: int = 64,
            pag_scale: float = 3.0,
            pag_identity_weight: float = 1.0,
            batch_size: int = 8,
            output_dir: str = str(search_dir),
        ):
            from ..options import parse_seeds

            lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
            seed_list = parse_seeds(seeds or "0")
            pairing = "zip" if len(seed_list) in (1, len(lines)) else "product"
            from ..search.config import SearchConfig

            if pool and host.layout is not None:
                selected_pairs(pool, host.layout.num_layers, host.layout.num_heads)
            config = SearchConfig(
                prompts=lines,
                seeds=seed_list,
                pairing=pairing,
                rounds=int(rounds),
                top_k=int(top_k),
                pool=(pool or "").strip() or None,
                pag_scale=float(pag_scale),
                pag_identity_weight=float(pag_identity_weight),
                num_inference_steps=int(num_inference_steps),
                height=int(size),
                width=int(size),
                style_prompt=(style_prompt or "").strip() or None,
                batch_size=int(batch_size),
            )
            job = start_job(config, output_dir, objective, objective_model or None, objective_arch or None)
            yield from follow(job)

        s_inputs = [
            s_prompts,
            s_seeds,
            s_style,
            s_rounds,
            s_top_k,
            s_pool,
            s_objective,
            s_objective_model,
            s_objective_arch,
            s_steps,
            s_size,
            s_pag_scale,
            s_u,
            s_batch,
            s_dir,
        ]
        s_outputs = [s_status, s_heatmap, s_selected]
        s_start.click(search, s_inputs, s_outputs, api_name="search")

        @readable_errors
        def resume(output_dir: str, objective: str, objective_model: str, objective_arch: str):
            job = start_job(
                config_from_run_dir(output_dir), output_dir, objective, objective_model or None, objective_arch or None
            )
            yield from follow(job)

        s_resume.click(
            resume, [s_dir, s_objective, s_objective_model, s_objective_arch], s_outputs, api_name="resume_search"
        )

        def refresh(seen):
            """Timer: redraw only when the current search moved on since this page last saw it."""
            job = jobs.get("current")
            key = None if job is None else [id(job), job.status, job.done, job.total]
            if key == seen:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return (*job_view(job), key)

        s_seen = gr.State(None)
        s_timer.tick(refresh, s_seen, [*s_outputs, s_seen], show_progress="hidden", api_visibility="private")

        def use_selected(selected: str):
            spec = (selected or "").strip()
            return spec, grid_image(host, spec)

        s_use.click(use_selected, s_selected, [pag_heads, grid], api_visibility="private")

        # -------------------------------------------------------------------- evaluate
        @readable_errors
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
            progress=gr.Progress(),
        ):
            progress(0, desc="Scoring...")
            if source == "folder":
                sets = ev.folder_sets(folder, prompts)
            elif source == "gallery":
                sets = ev.gallery_sets(gallery_entries or [])
            else:
                raise ValueError(f"Unknown source {source!r}; allowed: 'gallery', 'folder'.")
            rows = ev.evaluate_sets(
                host,
                sets,
                metrics or ["clip"],
                clip_model or "ViT-L-14",
                clip_checkpoint or None,
                pickscore_model or None,
                reference_images or None,
                inception_weights or None,
            )
            table = ev.table(rows)
            width = max(len(r) for r in table)
            headers = ["images", "count"] + [f"metric {i + 1}" for i in range(width - 2)]
            details = [{k: r[k] for k in ("name", "count", "metrics")} for r in rows]
            return gr.update(value=[r + [""] * (width - len(r)) for r in table], headers=headers), details

        e_inputs = [
            e_source,
            e_folder,
            e_prompts,
            e_metrics,
            e_clip_model,
            e_clip_checkpoint,
            e_pickscore,
            e_reference,
            e_inception,
            gallery_state,
        ]
        e_btn.click(evaluate, e_inputs, [e_table, e_json], api_name="evaluate")

        @readable_errors
        def show_report(run_dir: str):
            text, pictures = ev.load_eval_report(run_dir)
            return text, pictures

        r_btn.click(show_report, r_dir, [r_md, r_gallery], api_name="eval_report")

    return demo


def launch(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    output_dir: str | None = None,
    search_dir: str = "runs/ui-search",
    block: bool = True,
):
    r"""
    Load `model` (the app starts even when that fails, and says why) and serve the UI.

    Args:
        model (`str`, *optional*): Hub id, local folder or tiny model name.
        host (`str`, defaults to `"127.0.0.1"`), port (`int`, defaults to 7860), share (`bool`): Where to serve.
        device, dtype (`str`, *optional*): As for `headpag generate`.
        output_dir (`str`, *optional*): Where generated PNGs go (default: a temporary folder).
        search_dir (`str`): Default run directory of the Search tab.
        block (`bool`): Block the calling thread (the CLI) or return at once (tests).

    Returns:
        `(demo, url)`.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    model_host = ModelHost(model, device=device, dtype=dtype, output_dir=output_dir)
    if model_host.pipe is not None:
        model_host.pipe.set_progress_bar_config(disable=True)
    demo = build_app(model_host, search_dir)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        allowed_paths=[str(model_host.output_dir)],
        css=CSS,
        footer_links=["api"],
        quiet=not block,
    )
    return demo, url


__all__ = ["build_app", "launch"]
