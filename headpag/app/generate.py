"""Generation for the UI: the PAG image and the same seed without PAG, saved as PNGs with their settings."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .._io import save_png
from ..options import Limits
from ..pipelines.settings import GenerationSettings
from . import inputs
from .host import ModelHost


class Cancelled(Exception):
    """Raised inside the denoising loop when the user cancels a generation."""


@dataclass
class Result:
    """One UI generation: the two PNG paths and the settings (JSON, also in each PNG's metadata)."""

    pag_path: Path
    nopag_path: Path
    settings: GenerationSettings
    model: str

    def caption(self) -> str:
        s = self.settings
        heads = s.pag_heads or "default heads"
        return f"seed {s.seed}, PAG {s.pag_scale:g} on {heads}, u={s.pag_identity_weight:g}: {s.prompt[:60]}"


def check_settings(host: ModelHost, settings: GenerationSettings, limits: Limits | None = None) -> None:
    r"""
    Every check before work, with messages that name the bad value and what is allowed: the server's limits, the
    head spec against the model's grid (before it is expanded), then the settings' and the pipeline's own checks.

    Args:
        host ([`ModelHost`]): The loaded model.
        settings ([`GenerationSettings`]): What to generate.
        limits ([`~headpag.options.Limits`], *optional*): The server's limits (default: `Limits()`).
    """
    limits = limits or Limits()
    layout = host.layout
    limits.check_settings(settings)
    if settings.pag_heads:
        inputs.head_spec(settings.pag_heads, layout.num_layers, layout.num_heads, limits)
    settings.validate(layout.family)  # with the pipeline's own checks of u, scope, target, scales, interval, reuse
    for name in ("height", "width"):
        value = getattr(settings, name)
        if value is not None and (value < 16 or value % 16):
            raise ValueError(f"{name} must be a multiple of 16 (at least 16), got {value}.")
    if settings.num_inference_steps is not None and settings.num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {settings.num_inference_steps}.")


def generate_pair(
    host: ModelHost,
    settings: GenerationSettings,
    image: Image.Image | None = None,
    randomize_seed: bool = False,
    session: str = "",
    progress: Callable[[float, str], None] | None = None,
    limits: Limits | None = None,
    on_saved: Callable[[Path], None] | None = None,
) -> Result:
    r"""
    Generate `settings` with PAG and the same seed without PAG (img2img when `image` is given).

    Args:
        host ([`ModelHost`]): The loaded model.
        settings ([`GenerationSettings`]): What to generate (one image).
        image (`PIL.Image.Image`, *optional*): Input image for img2img (`settings.strength` applies).
        randomize_seed (`bool`): Draw a new seed (recorded in the settings).
        session (`str`): The browser session, for cancellation: a cancel request of `session` stops the call at its
            next step (the caller clears stale requests before, see [`ModelHost.clear_cancel`]).
        progress (`Callable[[float, str], None]`, *optional*): Called with (fraction done, description).
        limits ([`~headpag.options.Limits`], *optional*): The server's limits, checked before any work.
        on_saved (`Callable[[Path], None]`, *optional*): Called with each file as soon as it is written (the disk
            quota charges it, also when the call fails later).

    Raises:
        `ValueError`: bad settings (message names the value); [`Cancelled`] when the session cancels.
    """
    host.require()
    if randomize_seed:
        settings.seed = random.randint(0, 2**31 - 1)
    if image is not None and settings.strength is None:
        settings.strength = 0.6
    check_settings(host, settings, limits)
    report = progress or (lambda fraction, text: None)

    def waiting(holder: str) -> None:
        report(0.0, f"Waiting for the {holder} job to finish its current batch...")

    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:16]}"  # served by name: not guessable
    paths = [
        host.output_dir / f"{stamp}-seed{settings.seed}.png",
        host.output_dir / f"{stamp}-seed{settings.seed}-nopag.png",
    ]
    with host.lock.held_by("generate", waiting):
        pipe = host.img2img() if image is not None else host.require()
        check_settings(host, settings.with_model_defaults(pipe), limits)  # the model's values are within the limits
        runs = [("with PAG", settings), ("without PAG", settings.without_pag())]
        family = host.layout.family
        for index, ((label, run), path) in enumerate(zip(runs, paths)):
            kwargs = run.call_kwargs(family, image=image)
            steps = kwargs.get("num_inference_steps") or 28

            def on_step(pipeline, step, timestep, tensors, index=index, label=label, steps=steps):
                if host.take_cancel(session):
                    raise Cancelled("Generation cancelled.")
                report((index + (step + 1) / steps) / len(runs), f"{label}: step {step + 1}/{steps}")
                return tensors

            out = pipe(**kwargs, callback_on_step_end=on_step).images[0]
            meta = {"headpag": run.to_json(), "model": host.model_name or "", "prompt": run.prompt}
            save_png(out, path, meta)
            if on_saved is not None:
                on_saved(path)
    return Result(paths[0], paths[1], settings, host.model_name or "")
