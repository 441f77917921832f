"""
Train the shapes testbed: `python -m headpag.testbed.train [--out FOLDER] [--checkpoints FOLDER] [--hours H]
[--quick]`.

Stages, each a fixed number of seeded steps: the VAE (on 32×32 crops of freshly drawn images; it is fully
convolutional), the judge (fresh images, augmented), then the transformer with rectified flow on a pool of encoded
scenes (logit-normal timesteps, 10% empty prompts for classifier-free guidance; an EMA of the weights is what ships).
The SD3 transformer trains with the windowed T5 that ships from its first step (`t5_steps`); an optional CLIP-only
first stage before it (`transformer_steps`, default 0: it teaches the model to ignore direction words, see
`headpag.testbed.model`) is kept to reproduce that finding. The FLUX transformer (`--model flux`) has one stage.
Writes a stock diffusers `StableDiffusion3Pipeline` folder, `judge.safetensors`, `training.json` (steps, losses,
seconds, judge accuracy) and `loss.png`.

Resumable: every finished stage, and the transformer every `checkpoint_every` steps (and on Ctrl-C), is saved to the
checkpoint folder (safetensors and JSON: weights, EMA, optimizer moments, random generator states, losses). Run the
same command again to continue; the result is the same, bit for bit, as an uninterrupted run. `--hours` stops at a
checkpoint once that much time has passed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils import logging
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..pipelines.model_config import CONFIG_FILE
from .data import ATTRIBUTES, IMAGE_SIZE, ONE_OBJECT, TWO_OBJECTS, all_prompts, batch
from .flux import PAD_TOKENS, build_flux_transformer, build_text_stack
from .model import (
    ZERO_TOKENS,
    Judge,
    ZeroTokenMultiplicity,
    build_null_t5,
    build_scheduler,
    build_sd3_t5,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae,
)
from .t5 import T5_WINDOW, KeyBias, content_length, multiplicity_bias


logger = logging.get_logger(__name__)
DEFAULT_OUT = Path(__file__).parent / "weights"
DEFAULT_CHECKPOINTS = Path("runs") / "testbed-train"


@dataclass
class Schedule:
    """Step counts and batch sizes of the stages."""

    vae_steps: int = 1200
    vae_batch: int = 64
    judge_steps: int = 1200
    judge_batch: int = 128
    latent_pool: int = 40960
    transformer_steps: int = 0  # the optional CLIP-only first SD3 stage (0: left out, as in the shipped run)
    transformer_batch: int = 64
    t5_steps: int = 8000  # the SD3 stage with the windowed T5
    flux_steps: int = 3000
    flux_batch: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200


QUICK = Schedule(
    vae_steps=4,
    vae_batch=8,
    judge_steps=4,
    judge_batch=16,
    latent_pool=64,
    transformer_steps=0,
    transformer_batch=8,
    t5_steps=4,
    flux_steps=6,
    flux_batch=8,
    checkpoint_every=2,
)


class Stopped(Exception):
    """Training stopped at a checkpoint (time limit or Ctrl-C); run again to continue."""


class Checkpoints:
    r"""
    The checkpoint folder of one training run: JSON for numbers and states, safetensors for tensors, each file written
    under a temporary name and renamed, so a killed run leaves the last complete checkpoint.

    Args:
        folder (`Path`): Where checkpoints live (created).
        schedule (`Schedule`): The run's schedule; a folder made with another one is refused. Fields the saved
            schedule lacks (added to `Schedule` since, like `flux_steps`) are taken from this one and recorded.
    """

    def __init__(self, folder: str | os.PathLike, schedule: Schedule):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "schedule.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if set(asdict(schedule)) - set(saved):
                saved = {**asdict(schedule), **saved}
                self._write_json("schedule.json", saved)
            if saved != asdict(schedule):
                changed = sorted(
                    k for k in set(saved) | set(asdict(schedule)) if saved.get(k) != asdict(schedule).get(k)
                )
                raise ValueError(
                    f"The checkpoints in {self.folder} were made with another schedule (differs in {changed}); "
                    "use another --checkpoints folder or the same settings."
                )
        else:
            self._write_json("schedule.json", asdict(schedule))

    def _write_json(self, name: str, value) -> None:
        partial = self.folder / f".{name}.partial"
        partial.write_text(json.dumps(value, indent=1) + "\n")
        os.replace(partial, self.folder / name)

    def add_seconds(self, name: str, seconds: float) -> float:
        """Add `seconds` to the time stage `name` has taken over all the calls that ran it; returns the total."""
        path = self.folder / f"{name}-seconds.json"
        total = (json.loads(path.read_text()) if path.exists() else 0.0) + seconds
        self._write_json(path.name, total)
        return total

    def save(self, name: str, tensors: dict[str, torch.Tensor], record: dict) -> None:
        """Save a stage's tensors and record (the record last: it marks the checkpoint complete)."""
        partial = self.folder / f".{name}.safetensors.partial"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(partial))
        os.replace(partial, self.folder / f"{name}.safetensors")
        self._write_json(f"{name}.json", record)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        record = self.folder / f"{name}.json"
        if not record.exists():
            return None
        return load_file(str(self.folder / f"{name}.safetensors")), json.loads(record.read_text())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{key}": value for index, slots in state["state"].items() for key, value in slots.items()
    }
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur and brightness changes, so the judge reads generated images as well as drawn ones."""
    n = pixels.shape[0]
    blurred = torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.4).float()
    pixels = blur * blurred + (1 - blur) * pixels
    pixels = pixels * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5))
    pixels = pixels + torch.randn(pixels.shape, generator=generator) * 0.06 * torch.rand(
        n, 1, 1, 1, generator=generator
    )
    return pixels.clamp(0, 1)


def _drawn(scene) -> tuple[str, ...]:
    """The attributes an image of `scene` shows (a one-object image shows its position even when unnamed)."""
    return TWO_OBJECTS if scene.two else ONE_OBJECT


def judge_accuracy(judge: Judge, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh procedural images (half with held-out pairs), over the images that show
    the attribute."""
    rng = np.random.default_rng(seed)
    correct = {name: 0 for name in ATTRIBUTES}
    total = {name: 0 for name in ATTRIBUTES}
    with torch.no_grad():
        for start in range(0, n, 250):
            m = min(250, n - start)
            scenes, pixels = batch(rng, m, held_out=bool(start // 250 % 2))
            out = judge(torch.from_numpy(pixels))
            for name in ATTRIBUTES:
                for row, scene in enumerate(scenes):
                    if name in _drawn(scene):
                        total[name] += 1
                        correct[name] += int(out[name][row].argmax() == scene.labels()[name])
    return {name: correct[name] / max(1, total[name]) for name in ATTRIBUTES}


def train_vae(schedule: Schedule, progress: bool) -> tuple[torch.nn.Module, list[float]]:
    vae = build_vae(schedule.seed)
    rng = np.random.default_rng(schedule.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in tqdm(range(schedule.vae_steps), desc="vae", disable=not progress):
        _, pixels = batch(rng, schedule.vae_batch, held_out=bool(step % 5 == 0))
        x, y = rng.integers(0, pixels.shape[-1] - 32 + 1, 2)
        crop = torch.from_numpy(pixels[:, :, y : y + 32, x : x + 32]) * 2 - 1
        posterior = vae.encode(crop).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / crop[0].numel()
        loss = (recon - crop).abs().mean() + 0.5 * (recon - crop).pow(2).mean() + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / schedule.vae_steps))
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latent statistics: the standard scaling/shift convention of SD3 VAEs
        _, pixels = batch(np.random.default_rng(schedule.seed + 2), 512)
        latents = vae.encode(torch.from_numpy(pixels) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return vae, losses


def train_judge(schedule: Schedule, progress: bool) -> tuple[Judge, list[float]]:
    torch.manual_seed(schedule.seed + 3)
    judge = Judge()
    rng = np.random.default_rng(schedule.seed + 4)
    generator = torch.Generator().manual_seed(schedule.seed + 5)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    losses = []
    for step in tqdm(range(schedule.judge_steps), desc="judge", disable=not progress):
        scenes, pixels = batch(rng, schedule.judge_batch, held_out=bool(step % 4 == 0))
        out = judge(_augment(torch.from_numpy(pixels), generator))
        loss = 0.0
        for name in ATTRIBUTES:
            rows = [i for i, s in enumerate(scenes) if name in _drawn(s)]
            if rows:
                target = torch.tensor([scenes[i].labels()[name] for i in rows])
                loss = loss + torch.nn.functional.nll_loss(out[name][rows], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / schedule.judge_steps))
        losses.append(loss.item())
    return judge.eval().requires_grad_(False), losses


def _pad_counts(rng: np.random.Generator, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Per row, a number of zero pads from 1 to `total` minus its content, log-uniform: every `max_sequence_length`
    that keeps a zero pad."""
    room = (total - lengths).double()
    return torch.from_numpy(np.exp(rng.uniform(0, 1, len(lengths)) * np.log(room.numpy()))).round().clamp(min=1)


def _sd3_forward(transformer, noisy: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, sigma: torch.Tensor):
    """The SD3 transformer's velocity prediction, as the pipeline calls it (timesteps on the 0–1000 scale)."""
    return transformer(
        hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma * 1000
    ).sample


class _SD3Task:
    """The optional CLIP-only first SD3 stage (`Schedule.transformer_steps`, off by default): the prompt table and one
    prediction with `max_sequence_length` drawn (null T5: one zero token)."""

    name, folder, seeds, steps_field = "transformer", "shapes-sd3", (11, 7), "transformer_steps"
    key_bias_mode = True  # its key bias is a `TorchFunctionMode` (see `train_transformer`)

    def __init__(self, pipe: StableDiffusion3Pipeline, schedule: Schedule):
        self.steps, self.batch = getattr(schedule, self.steps_field), schedule.transformer_batch
        self.index, self.embeds, self.pooled = sd3_prompt_table(pipe)

    def predict(self, transformer, noisy: torch.Tensor, rows: list[int], sigma: torch.Tensor, rng) -> torch.Tensor:
        # any number of zero tokens from 1 to 256: the model serves every `max_sequence_length`
        count = float(np.exp(rng.uniform(0, math.log(ZERO_TOKENS))))
        with ZeroTokenMultiplicity(1, count):
            return _sd3_forward(transformer, noisy, self.embeds[rows], self.pooled[rows], sigma)


class _SD3T5Task:
    """The SD3 stage that ships (from the fresh transformer, or from the optional first stage's weights): the CLIP
    tokens, the prompt's windowed-T5 tokens and one zero pad standing for a drawn number of pads (SD3's joint order:
    `[image, CLIP, T5]`)."""

    name, folder, seeds, steps_field = "transformer-t5", "shapes-sd3", (15, 16), "t5_steps"
    key_bias_mode = True

    def __init__(self, pipe: StableDiffusion3Pipeline, schedule: Schedule):
        self.steps, self.batch = getattr(schedule, self.steps_field), schedule.transformer_batch
        self.index, self.embeds, self.pooled, self.lengths = sd3_t5_prompt_table(pipe)
        self.clip_tokens = pipe.tokenizer_max_length

    def predict(self, transformer, noisy: torch.Tensor, rows: list[int], sigma: torch.Tensor, rng) -> torch.Tensor:
        lengths = self.lengths[rows]
        patch = transformer.config.patch_size
        image_tokens = noisy.shape[-2] // patch * (noisy.shape[-1] // patch)
        t5_tokens = self.embeds.shape[1] - self.clip_tokens
        counts = _pad_counts(rng, lengths, ZERO_TOKENS)
        bias = multiplicity_bias(lengths, t5_tokens, counts, 0, leading=image_tokens + self.clip_tokens)
        with KeyBias(bias.to(noisy.dtype)):
            return _sd3_forward(transformer, noisy, self.embeds[rows], self.pooled[rows], sigma)


class _FluxTask:
    """The FLUX transformer stage: compact T5 sequences whose one zero pad stands for a drawn number of pads."""

    name, folder, seeds, steps_field = "flux", "shapes-flux", (11, 7), "flux_steps"

    def __init__(self, pipe: FluxPipeline, schedule: Schedule):
        self.steps, self.batch = getattr(schedule, self.steps_field), schedule.flux_batch
        self.index, self.embeds, self.pooled, self.lengths = flux_prompt_table(pipe)
        self.scale = pipe.vae_scale_factor
        side = IMAGE_SIZE // self.scale // 2
        self.image_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
        self.text_ids = torch.zeros(self.embeds.shape[1], 3)

    def predict(self, transformer, noisy: torch.Tensor, rows: list[int], sigma: torch.Tensor, rng) -> torch.Tensor:
        b, c, h, w = noisy.shape
        lengths = self.lengths[rows]
        counts = _pad_counts(rng, lengths, PAD_TOKENS)
        bias = multiplicity_bias(lengths, self.embeds.shape[1], counts, h * w // 4).to(noisy.dtype)
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        out = transformer(
            hidden_states=packed,
            encoder_hidden_states=self.embeds[rows],
            pooled_projections=self.pooled[rows],
            timestep=sigma,
            txt_ids=self.text_ids,
            img_ids=self.image_ids,
            joint_attention_kwargs={"attention_mask": bias},
        ).sample
        return FluxPipeline._unpack_latents(out, h * self.scale, w * self.scale, self.scale)


# the transformer stages of each model, in order (each starts from the previous one's weights; a stage whose step
# count the schedule sets to 0 is left out, so the next one starts from the fresh transformer)
STAGES = {"sd3": (_SD3Task, _SD3T5Task), "flux": (_FluxTask,)}


def _quiet_encode(encode, *args, **kwargs):
    """Run a pipeline's `encode_prompt` without the truncation warnings that short sequences make on purpose."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity(), logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    logging.set_verbosity_error()
    try:
        with torch.no_grad():
            return encode(*args, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity[0])
        logging.set_verbosity(verbosity[1])


def sd3_prompt_table(pipe: StableDiffusion3Pipeline) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
    """Text embeddings of every grammar prompt and of `""` (one zero token), computed as the pipeline does."""
    prompts = [""] + all_prompts()
    # the null T5 sees one token: its truncation warnings say nothing
    embeds, _, pooled, _ = _quiet_encode(
        pipe.encode_prompt, prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=1, device="cpu"
    )
    return {p: i for i, p in enumerate(prompts)}, embeds, pooled


def _t5_lengths(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, int]:
    """Each prompt's T5 content length ([`~headpag.testbed.t5.content_length`]) and the compact sequence length: one
    token after the longest content, so that every row has a zero pad."""
    ids = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id
    lengths = content_length(torch.nn.functional.pad(ids, (0, T5_WINDOW + 1), value=pad), pad)
    return lengths, int(lengths.max()) + 1


def sd3_t5_prompt_table(
    pipe: StableDiffusion3Pipeline,
) -> tuple[dict[str, int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Embeddings of every grammar prompt and of `""` as the pipeline computes them (CLIP tokens, then T5 tokens cut one
    token after the longest content: the rest are zero pads), the pooled vectors, and each row's T5 content length.
    """
    prompts = [""] + all_prompts()
    lengths, tokens = _t5_lengths(pipe.tokenizer_3, prompts)
    embeds, _, pooled, _ = _quiet_encode(
        pipe.encode_prompt,
        prompts,
        None,
        None,
        do_classifier_free_guidance=False,
        max_sequence_length=tokens,
        device="cpu",
    )
    return {p: i for i, p in enumerate(prompts)}, embeds, pooled, lengths


def flux_prompt_table(pipe: FluxPipeline) -> tuple[dict[str, int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    T5 embeddings of every grammar prompt and of `""`, cut one token after the longest content (the rest are zero
    pads, [`~headpag.testbed.t5.content_length`]), the pooled CLIP vectors, and each row's content length.
    """
    prompts = [""] + all_prompts()
    lengths, tokens = _t5_lengths(pipe.tokenizer_2, prompts)
    embeds, pooled, _ = _quiet_encode(pipe.encode_prompt, prompts, None, device="cpu", max_sequence_length=tokens)
    return {p: i for i, p in enumerate(prompts)}, embeds, pooled, lengths


def latent_pool(vae, n: int, rng: np.random.Generator, progress: bool):
    """`n` training scenes with their VAE posteriors (mean, std): drawing and encoding once, not every step."""
    scenes, means, stds = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, n, 256), desc="latents", disable=not progress):
            chunk, pixels = batch(rng, min(256, n - start))
            posterior = vae.encode(torch.from_numpy(pixels) * 2 - 1).latent_dist
            scenes += chunk
            means.append(posterior.mean)
            stds.append(posterior.std)
    return scenes, torch.cat(means), torch.cat(stds)


def train_transformer(
    pipe: StableDiffusion3Pipeline | FluxPipeline,
    stage: type,
    schedule: Schedule,
    progress: bool,
    checkpoints: Checkpoints,
    pool: tuple,
    deadline: float | None = None,
    stop_at_step: int | None = None,
    ema_start: torch.nn.Module | None = None,
):
    r"""
    Rectified-flow training of `pipe.transformer` in one stage of `STAGES`, from its current weights.

    Args:
        pipe: The pipeline (its text encoders make the stage's prompt table).
        stage (`type`): One of `STAGES`' task classes.
        schedule (`Schedule`), progress (`bool`), checkpoints (`Checkpoints`): As for [`train`].
        pool (`tuple`): `(scenes, means, stds)` from [`latent_pool`].
        deadline (`float`, *optional*), stop_at_step (`int`, *optional*): When to stop at a checkpoint.
        ema_start (`torch.nn.Module`, *optional*): The EMA's starting value (the previous stage's), else the
            weights. The EMA's warm-up restarts with the stage (decay `(1 + step) / (10 + step)`, capped), so it soon
            follows the new stage's weights; the stage itself continues from the raw weights, with a fresh optimizer
            and learning-rate warm-up.

    Returns:
        `(ema, losses)`; the final step is checkpointed too, so that a later stage can start from it.

    Raises:
        `Stopped`: at a checkpoint, when `deadline` passed or `stop_at_step` was reached.
    """
    transformer, vae = pipe.transformer, pipe.vae
    if getattr(stage, "key_bias_mode", False) and transformer.is_gradient_checkpointing:
        # the mode is active in the forward pass only; backward's recomputation would attend without the key bias
        # (torch then fails with a CheckpointError that does not say why)
        raise ValueError(
            f"The {stage.name} stage applies its key bias with a TorchFunctionMode, which gradient checkpointing's "
            "recomputation would run without; disable gradient checkpointing on the transformer."
        )
    task = stage(pipe, schedule)
    transformer.train()
    ema = copy.deepcopy(ema_start if ema_start is not None else transformer).eval().requires_grad_(False)
    rng = np.random.default_rng(schedule.seed + task.seeds[0])
    generator = torch.Generator().manual_seed(schedule.seed + task.seeds[1])
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=schedule.lr, weight_decay=0.01)
    warmup = max(1, min(100, task.steps // 10))
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    losses, first = [], 0
    saved = checkpoints.load(task.name)
    if saved is not None:
        tensors, record = saved
        transformer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_optimizer(optimizer, tensors, record["param_groups"])
        generator.set_state(tensors["generator"])
        rng.bit_generator.state = record["rng"]
        losses, first = record["losses"], record["step"]
        logger.info(f"Continuing the {task.name} stage from step {first} of {task.steps}.")
    pool, means, stds = pool

    def save(step: int) -> None:
        tensors, groups = _optimizer_tensors(optimizer)
        tensors.update({f"model.{k}": v for k, v in transformer.state_dict().items()})
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        tensors["generator"] = generator.get_state()
        record = {"step": step, "losses": losses, "rng": rng.bit_generator.state, "param_groups": groups}
        checkpoints.save(task.name, tensors, record)

    bar = tqdm(range(first, task.steps), desc=task.name, disable=not progress)
    step = first
    try:
        for step in bar:
            if step > first and step % schedule.checkpoint_every == 0:
                save(step)
                if (deadline is not None and time.time() > deadline) or step == stop_at_step:
                    raise Stopped(f"{task.name}: stopped at step {step} of {task.steps}")
            picks = rng.integers(0, len(pool), task.batch)
            scenes = [pool[i] for i in picks]
            latents = means[picks] + stds[picks] * torch.randn(means[picks].shape, generator=generator)
            latents = (latents - shift) * scale
            rows = [0 if rng.random() < 0.1 else task.index[s.prompt] for s in scenes]
            sigma = torch.sigmoid(torch.randn(len(rows), generator=generator))
            noise = torch.randn(latents.shape, generator=generator)
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
            prediction = task.predict(transformer, noisy, rows, sigma, rng)
            loss = (prediction - (noise - latents)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            progress_fraction = max(0.0, (step + 1 - warmup) / max(1, task.steps - warmup))
            factor = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_fraction)))
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr * factor
            decay = min(schedule.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), transformer.parameters()):
                    e.lerp_(p, 1 - decay)
            losses.append(loss.item())
        if first < task.steps:
            save(task.steps)
    except KeyboardInterrupt:
        # the step in flight may be half applied: continue from the last checkpoint, not from here
        raise Stopped(
            f"interrupted; continues from the last checkpoint (every {schedule.checkpoint_every} steps)"
        ) from None
    finally:
        bar.close()
    return ema, losses


def _smooth(values: list[float], window: int = 25) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3))
    for ax, (name, values) in zip(axes, losses.items()):
        ax.plot(values, alpha=0.3, lw=0.5)
        ax.plot(np.arange(len(_smooth(values))) + min(24, len(values) - 1), _smooth(values), lw=1.5)
        ax.set_title(f"{name} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# What a new model folder's `headpag_config.json` advises the CLI and the UI until the experiments write their findings
ADVICE = {
    "sd3": {"steps": 20, "size": IMAGE_SIZE, "guidance": 5.0, "prompt": "a large red square on a yellow background"},
    "flux": {"steps": 20, "size": IMAGE_SIZE, "true_cfg": 5.0, "prompt": "a large red square on a yellow background"},
}


def write_weights(
    pipe: StableDiffusion3Pipeline | FluxPipeline, judge: Judge, out: Path, folder_name: str, model: str = "sd3"
) -> None:
    """
    Write the shipped files: `folder_name/` (transformer and VAE in float16, which diffusers loads back as float32;
    the small text encoders stay float32 so that stock loading gives a float32 pipeline; a `headpag_config.json`
    already there is kept, else one with the sampler advice of `ADVICE[model]` is written) and `judge.safetensors`
    (float16; a FLUX run writes it only where there is none: the SD3 model's results are measured with the one there).
    Each is written under a temporary name and renamed.
    """
    import shutil

    folder, staging = out / folder_name, out / f".{folder_name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
    finally:
        pipe.transformer.to(torch.float32)
        pipe.vae.to(torch.float32)
    if (folder / CONFIG_FILE).is_file():
        shutil.copy2(folder / CONFIG_FILE, staging / CONFIG_FILE)
    else:
        (staging / CONFIG_FILE).write_text(json.dumps({"sampler": ADVICE[model]}, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    if model == "sd3" or not (out / "judge.safetensors").exists():
        save_file({k: v.half() for k, v in judge.state_dict().items()}, out / ".judge.partial")
        (out / ".judge.partial").replace(out / "judge.safetensors")


def _stage_vae(schedule: Schedule, progress: bool, checkpoints: Checkpoints):
    saved = checkpoints.load("vae")
    if saved is None:
        start = time.perf_counter()
        vae, losses = train_vae(schedule, progress)
        record = {"losses": losses, "seconds": time.perf_counter() - start, "config": {
            "shift_factor": vae.config.shift_factor, "scaling_factor": vae.config.scaling_factor}}  # fmt: skip
        checkpoints.save("vae", vae.state_dict(), record)
        return vae, record
    tensors, record = saved
    vae = build_vae(schedule.seed)
    vae.load_state_dict(tensors)
    vae.register_to_config(**record["config"])
    return vae.eval().requires_grad_(False), record


def _stage_judge(schedule: Schedule, progress: bool, checkpoints: Checkpoints):
    saved = checkpoints.load("judge")
    if saved is None:
        start = time.perf_counter()
        judge, losses = train_judge(schedule, progress)
        record = {"losses": losses, "seconds": time.perf_counter() - start}
        checkpoints.save("judge", judge.state_dict(), record)
        return judge, record
    tensors, record = saved
    judge = Judge()
    judge.load_state_dict(tensors)
    return judge.eval().requires_grad_(False), record


MODELS = tuple(STAGES)


def _pipeline(model: str, vae, seed: int) -> StableDiffusion3Pipeline | FluxPipeline:
    """An untrained pipeline of `model` around the trained VAE (the text encoders are frozen as built)."""
    if model == "flux":
        return FluxPipeline(
            transformer=build_flux_transformer(seed + 12), scheduler=build_scheduler(), vae=vae,
            **build_text_stack(seed + 13),
        )  # fmt: skip
    tokenizer = build_tokenizer()
    t5, t5_tokenizer = build_null_t5()
    return StableDiffusion3Pipeline(
        transformer=build_transformer(seed + 8),
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=build_text_encoder(tokenizer, seed + 9),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer, seed + 10),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def train(
    out: str | Path = DEFAULT_OUT,
    schedule: Schedule | None = None,
    progress: bool = True,
    checkpoints: str | Path = DEFAULT_CHECKPOINTS,
    hours: float | None = None,
    stop_at_step: int | None = None,
    model: str = "sd3",
) -> dict:
    r"""
    Train the testbed networks of `model` and write them to `out`, continuing from the checkpoints a stopped run left.

    Args:
        out (`str` or `Path`): Output folder; gets `shapes-sd3/` or `shapes-flux/` (a diffusers folder),
            `judge.safetensors`, and `training.json` + `loss.png` (`training-flux.json` + `loss-flux.png` for FLUX).
            Files are written to a temporary name and renamed.
        schedule (`Schedule`, *optional*): Step counts; the default is the shipped run, `QUICK` a smoke test.
        progress (`bool`): Show progress bars.
        checkpoints (`str` or `Path`): The checkpoint folder (default `runs/testbed-train`); both models share its
            VAE and judge stages.
        hours (`float`, *optional*): Stop at the first transformer checkpoint (of any stage) after this much time
            in this call.
        stop_at_step (`int`, *optional*): Stop at the checkpoint of this step, in every transformer stage (tests).
        model (`str`): `"sd3"` (`headpag-shapes`) or `"flux"` (`headpag-shapes-flux`).

    Returns:
        The training record (also in `training.json` / `training-flux.json`).

    Raises:
        `Stopped`: when `hours` or `stop_at_step` stopped the run, or on Ctrl-C; the checkpoints are complete.
    """
    if model not in MODELS:
        raise ValueError(f"Unknown testbed model {model!r}; allowed: {', '.join(MODELS)}.")
    schedule = schedule or Schedule()
    stages = [stage for stage in STAGES[model] if getattr(schedule, stage.steps_field) != 0]
    for stage in STAGES[model]:
        if getattr(schedule, stage.steps_field) < 0:
            raise ValueError(f"{stage.steps_field} must be >= 0, got {getattr(schedule, stage.steps_field)}")
    if not stages:
        fields = ", ".join(stage.steps_field for stage in STAGES[model])
        raise ValueError(f"The schedule trains no {model} transformer stage: {fields} are all 0.")
    out = Path(out)
    deadline = None if hours is None else time.time() + hours * 3600
    store = Checkpoints(checkpoints, schedule)
    torch.manual_seed(schedule.seed)
    vae, vae_record = _stage_vae(schedule, progress, store)
    judge, judge_record = _stage_judge(schedule, progress, store)
    pipe = _pipeline(model, vae, schedule.seed)
    losses = {"vae": vae_record["losses"], "judge": judge_record["losses"]}
    times = {"vae": vae_record["seconds"], "judge": judge_record["seconds"]}
    start = time.perf_counter()
    pool = latent_pool(vae, schedule.latent_pool, np.random.default_rng(schedule.seed + 6), progress)
    # encoded again by every call; counted per model (both models may share a checkpoint folder)
    times["latents"] = store.add_seconds(f"{model}-latents", time.perf_counter() - start)
    ema = None
    for stage in stages:
        if stage is _SD3T5Task:  # the second SD3 stage reads the windowed T5 (the first a null one)
            t5, t5_tokenizer = build_sd3_t5(schedule.seed + 14)
            pipe.register_modules(text_encoder_3=t5, tokenizer_3=t5_tokenizer)
        start = time.perf_counter()
        try:
            ema, losses[stage.name] = train_transformer(
                pipe, stage, schedule, progress, store, pool, deadline, stop_at_step, ema
            )
        finally:
            times[stage.name] = store.add_seconds(stage.name, time.perf_counter() - start)
    pipe.transformer = ema  # the EMA of the last stage is what ships

    accuracy = judge_accuracy(judge, n=2000 if schedule.judge_steps > 100 else 100)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(pipe, judge, out, STAGES[model][-1].folder, model)
    record = {
        "model": model,
        "schedule": asdict(schedule),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "final_loss": {k: float(np.mean(v[-50:])) for k, v in losses.items()},
        "judge_accuracy": accuracy,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    suffix = "" if model == "sd3" else "-flux"
    (out / f"training{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_losses(losses, out / f"loss{suffix}.png")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m headpag.testbed.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the package's weights)")
    parser.add_argument(
        "--checkpoints", default=str(DEFAULT_CHECKPOINTS), help="checkpoint folder (default: runs/testbed-train)"
    )
    parser.add_argument("--hours", type=float, default=None, help="stop at a checkpoint after this many hours")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the script end to end")
    parser.add_argument(
        "--model", choices=MODELS, default="sd3", help="sd3 (headpag-shapes, default) or flux (headpag-shapes-flux)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hours is not None and not (math.isfinite(args.hours) and args.hours > 0):
        parser.error(f"--hours must be a positive number, got {args.hours}")
    schedule = dataclasses.replace(QUICK, seed=args.seed) if args.quick else Schedule(seed=args.seed)
    try:
        record = train(args.out, schedule, checkpoints=args.checkpoints, hours=args.hours, model=args.model)
    except Stopped as stop:
        print(f"{stop}; run the same command again to continue from {args.checkpoints}.", file=sys.stderr)
        return 3
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
