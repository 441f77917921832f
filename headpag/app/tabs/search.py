"""The Search tab: HeadHunter runs by name, with the `/search`, `/resume_search` and `/cancel_search` endpoints."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from ...eval.registry import pair_metric_names
from ...search.config import SearchConfig
from ...search.rundir import RunDirectory
from .. import inputs, models
from ..search import SearchJob, check_search, config_from_run_dir, read_run_meta
from .common import AppContext, by_name, client
from .heads import search_runs


OBJECTIVES = ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", *pair_metric_names())


def build(ctx: AppContext, pag_heads: gr.Textbox, grid: gr.Image, default_run: str = "") -> SimpleNamespace:
    r"""
    Lay out the tab and wire its events.

    Args:
        ctx ([`AppContext`]): The app.
        pag_heads (`gr.Textbox`), grid (`gr.Image`): The shared head-set field and the Heads tab's grid.
        default_run (`str`): The run name offered at start (empty: a new timestamped name per search).

    Returns:
        The components other tabs use (`steps`, `size`).
    """
    host, limits, roots = ctx.host, ctx.limits, ctx.roots
    d = ctx.family_defaults()
    with gr.Tab("Search", id="search") as tab:
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
                    s_objective = gr.Dropdown(list(OBJECTIVES), value="clip", label="Objective")
                    s_objective_model = gr.Textbox(
                        value="", label="Objective weights (a file or folder name in the models folder, or a hub id)"
                    )
                    s_objective_arch = gr.Textbox(
                        label="CLIP model (open_clip name, or a config .json in the models folder)", value="ViT-L-14"
                    )
                with gr.Row():
                    s_steps = gr.Number(label="Steps", value=d["steps"], precision=0, minimum=1)
                    s_size = gr.Number(label="Size", value=d["size"], precision=0, minimum=16)
                    s_pag_scale = gr.Number(label="PAG scale", value=3.0)
                    s_u = gr.Slider(0, 1, value=1.0, step=0.05, label="Identity weight u")
                    s_batch = gr.Number(label="Batch size", value=min(8, limits.max_images), precision=0, minimum=1)
                s_run = gr.Dropdown(
                    search_runs(ctx),
                    value=default_run,
                    allow_custom_value=True,
                    label="Run name (a new name starts a run; an existing run with the same settings resumes)",
                    elem_id="search-run",
                )
                with gr.Row():
                    s_start = gr.Button("Start search", variant="primary", elem_id="search-btn")
                    s_resume = gr.Button("Resume run")
                    s_cancel = gr.Button("Cancel search", elem_id="cancel-search-btn")
            with gr.Column(scale=2):
                s_status = gr.Markdown("No search yet.", elem_id="search-status")
                s_heatmap = gr.Image(label="Scores of the current round", interactive=False, type="pil")
                s_selected = gr.Textbox(value="", label="Selected heads", interactive=False)
                s_use = gr.Button("Use these heads")
        s_timer = gr.Timer(2.0)

    tab.select(lambda: gr.update(choices=search_runs(ctx)), None, s_run, api_visibility="private")

    def job_view(job: SearchJob | None):
        if job is None:
            return "No search yet.", None, ""
        return job.markdown(), job.heatmap(), job.summary()["selected"]

    def objective_weights(objective, objective_model, objective_arch) -> tuple[str, str | None, str | None]:
        objective = inputs.choice(objective or "clip", "objective", OBJECTIVES)
        if objective == "clip":
            arch = models.clip_model(objective_arch, roots)
            return objective, models.weights_file(objective_model, roots, "CLIP weights file"), arch
        if objective in pair_metric_names():  # a registered metric ships its weights
            return objective, None, None
        if objective in ("aesthetic", "hpsv2", "imagereward"):  # a file of the models folder, else the server's env
            weights = models.weights_file(objective_model, roots, f"{objective} weights file")
            tokenizer = (
                models.hub_or_folder(objective_arch, roots, "BERT tokenizer") if objective == "imagereward" else None
            )
            return objective, weights, tokenizer
        return objective, models.hub_or_folder(objective_model, roots, "PickScore model"), None

    def run_folder(run) -> tuple[str, object]:
        run = inputs.text(run, "run", limits) or f"search-{time.strftime('%Y%m%d-%H%M%S')}"  # names are not trimmed
        folder = roots.path("search", run, "search run", must_exist=False, folder=True)
        roots.check_tree("search", folder, f"search run {run!r}")
        return run, folder

    def start_job(config: SearchConfig, folder, run: str, weights, request) -> SearchJob:
        objective, objective_model, objective_arch = weights
        with ctx.search_lock:
            current = ctx.jobs.get("current")
            if current is not None and current.running:
                whose = "you" if current.owner == client(request) else "another client"
                raise ValueError(
                    f"A search is already running (run {current.name!r}, started by {whose}); one search runs at a "
                    "time: wait for it to finish or cancel it."
                )
            ticket = ctx.admission.enter(client(request), "search")
            try:
                job = SearchJob(
                    host,
                    config,
                    folder,
                    objective,
                    objective_model,
                    objective_arch,
                    name=run,
                    owner=client(request),
                    on_end=ticket.release,
                    roots=roots,
                    max_hours=limits.max_search_hours,
                    grace_s=limits.search_grace_min * 60,
                )
                ctx.jobs["current"] = job
                job.start()
            except BaseException:
                ticket.release()
                raise
        return job

    def follow(job: SearchJob):
        job.watched()
        try:  # a client that leaves closes this generator: the job's grace period starts when nobody follows it
            while job.running:
                yield job_view(job)
                time.sleep(0.5)
        finally:
            job.unwatched()
        yield job_view(job)
        if job.status == "failed":
            raise ValueError(f"Search failed: {job.error}")

    @ctx.readable
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
        run: str = default_run,
        request: gr.Request = None,
    ):
        host.require()
        layout = host.layout
        lines = inputs.lines(prompts, "prompts", limits)
        seed_list = inputs.seeds(seeds, limits)
        pairing = "zip" if len(seed_list) in (1, len(lines)) else "product"
        values = dict(
            prompts=lines,
            seeds=seed_list,
            pairing=pairing,
            rounds=rounds,
            top_k=top_k,
            pool=inputs.text(pool, "pool", limits).strip() or None,
            pag_scale=pag_scale,
            pag_identity_weight=pag_identity_weight,
            num_inference_steps=num_inference_steps,
            height=size,
            width=size,
            style_prompt=inputs.text(style_prompt, "style_prompt", limits).strip() or None,
            batch_size=batch_size,
        )
        check_search(values, layout.num_layers, layout.num_heads, limits)  # before the pool is ever expanded
        for key in ("rounds", "top_k", "num_inference_steps", "height", "width", "batch_size"):
            values[key] = int(values[key])
        values["pag_scale"], values["pag_identity_weight"] = float(pag_scale), float(pag_identity_weight)
        config = SearchConfig(**values)
        weights = objective_weights(objective, objective_model, objective_arch)
        run, folder = run_folder(run)
        if folder.exists():
            if RunDirectory(folder).exists():
                meta = read_run_meta(folder, run, limits)
                if meta["config_hash"] != config.config_hash(host.model_name or ""):
                    raise ValueError(
                        f"Search run {run!r} holds a search with other settings (or another model): choose another "
                        "run name, or continue it with Resume run."
                    )
            elif any(folder.iterdir()):
                raise ValueError(f"Search run {run!r} exists and is not a HeadHunter run folder; choose another name.")
        job = start_job(config, folder, run, weights, request)
        yield from follow(job)

    s_inputs = by_name(
        search,
        prompts=s_prompts,
        seeds=s_seeds,
        style_prompt=s_style,
        rounds=s_rounds,
        top_k=s_top_k,
        pool=s_pool,
        objective=s_objective,
        objective_model=s_objective_model,
        objective_arch=s_objective_arch,
        num_inference_steps=s_steps,
        size=s_size,
        pag_scale=s_pag_scale,
        pag_identity_weight=s_u,
        batch_size=s_batch,
        run=s_run,
    )
    s_outputs = [s_status, s_heatmap, s_selected]
    common = dict(preprocess=False, concurrency_limit=None)
    s_start.click(search, s_inputs, s_outputs, api_name="search", **common)

    @ctx.readable
    def resume_search(
        run: str,
        objective: str = "clip",
        objective_model: str = "",
        objective_arch: str = "ViT-L-14",
        request: gr.Request = None,
    ):
        host.require()
        folder = roots.path("search", run, "search run", folder=True)
        roots.check_tree("search", folder, f"search run {run!r}")
        config = config_from_run_dir(folder, run, host.layout, limits)
        weights = objective_weights(objective, objective_model, objective_arch)
        job = start_job(config, folder, run, weights, request)
        yield from follow(job)

    s_resume.click(
        resume_search,
        by_name(
            resume_search,
            run=s_run,
            objective=s_objective,
            objective_model=s_objective_model,
            objective_arch=s_objective_arch,
        ),  # fmt: skip
        s_outputs,
        api_name="resume_search",
        **common,
    )

    @ctx.readable
    def cancel_search(request: gr.Request = None):
        job = ctx.jobs.get("current")
        if job is None or not job.running:
            raise ValueError("No search is running.")
        who = client(request)
        if job.owner != who and who not in ctx.admins:
            raise ValueError(
                "The running search was started by another client; only that client (or an admin) can cancel it."
            )
        if job.owner == who:
            job.cancel()
        else:
            job.stop(f"cancelled by the admin {who.removeprefix('user:')}")
        return f"Cancelling search run {job.name!r} after its current batch (finished candidates stay journaled)."

    s_cancel.click(cancel_search, None, s_status, api_name="cancel_search")

    @ctx.readable
    def jobs(request: gr.Request = None):
        """Admins only: the current search (owner, status, progress) and the requests each client has admitted."""
        if client(request) not in ctx.admins:
            raise ValueError("Only an admin (headpag ui --admin USER) may list the jobs.")
        job = ctx.jobs.get("current")
        return {"search": None if job is None else job.summary(), "requests": ctx.admission.clients()}

    with tab:  # hidden: the endpoint is for admins' scripts
        jobs_view = gr.JSON(visible=False)
        jobs_button = gr.Button(visible=False)
    jobs_button.click(jobs, None, jobs_view, api_name="jobs")

    def refresh(seen):
        """Timer: redraw only when the current search moved on since this page last saw it."""
        job = ctx.jobs.get("current")
        key = None if job is None else [id(job), job.status, job.done, job.total]
        if key == seen:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return (*job_view(job), key)

    s_seen = gr.State(None)
    s_timer.tick(refresh, s_seen, [*s_outputs, s_seen], show_progress="hidden", api_visibility="private")

    def use_selected(selected: str):
        spec = selected.strip() if isinstance(selected, str) else ""
        return spec, ctx.grid_image(spec)

    s_use.click(use_selected, s_selected, [pag_heads, grid], api_visibility="private")
    return SimpleNamespace(steps=s_steps, size=s_size)
