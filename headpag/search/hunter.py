"""HeadHunter: greedy, resumable, batched and multi-process search for the attention heads to perturb."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .._io import atomic_write_json
from ..guidance import HeadSet
from ..runtime import describe_transformer
from .config import SearchConfig
from .journal import Journal
from .objectives import Objective, load_objective


logger = logging.get_logger(__name__)
Head = tuple[int, int]


@dataclass
class SearchResult:
    r"""
    Args:
        order (`list[tuple[int, int]]`): Heads in the order they were added.
        rounds (`list[dict]`): Per round: `{"scores": {(layer, head): mean score}, "chosen": [...]}`.
        family, num_layers, num_heads: The model's.
        config ([`SearchConfig`]): The settings.
    """

    order: list[Head]
    rounds: list[dict[str, Any]]
    family: str
    num_layers: int
    num_heads: int
    config: SearchConfig
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> HeadSet:
        return HeadSet(self.order)

    def save_heads(self, path: str | os.PathLike) -> Path:
        """Save the selected heads as a head-set JSON file with the search settings as metadata."""
        return self.selected.save(
            path,
            model_family=self.family,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            recommended_scale=self.config.pag_scale,
            identity_weight=self.config.pag_identity_weight,
            provenance={"method": "HeadHunter", "order": [list(h) for h in self.order], **self.provenance},
        )


class HeadHunter:
    r"""
    The paper's Algorithm 1: in round t, every head still in the pool is tried with the heads selected so far, images
    are generated for the M prompt-seed pairs, scored by the objective and averaged; the top-k heads join the
    selected set. Ties break by (layer, head) ascending.

    Candidates are batched (several candidate head sets in one transformer call), text embeddings are computed once
    per prompt, images reach the objective in memory, every finished candidate is journaled at once, and under
    `accelerate launch` / `torchrun` the candidates are split across processes.

    Args:
        pipe: A head-PAG pipeline (`StableDiffusion3HeadPAGPipeline` or `FluxHeadPAGPipeline`).
        objective (`str` or callable): `"clip"`, `"pickscore"` or `f(images, prompts) -> list[float]`.
        config ([`SearchConfig`]): The settings.
        output_dir (`str`): Run directory (journal, round results, selected heads, report).
        objective_model, objective_arch (`str`, *optional*): See [`load_objective`].
        model_name (`str`, *optional*): Recorded in the config hash and the head-set file.
        progress (`Callable[[int, int], None]`, *optional*): Called with (candidates done, total) in this process.
        lock (context manager, *optional*): Held around every pipeline call, so that other users of the same
            pipeline (the web UI's generations) never run at the same time as a search batch.
    """

    def __init__(
        self,
        pipe,
        objective: str | Objective = "clip",
        config: SearchConfig | None = None,
        output_dir: str | os.PathLike = "runs/headhunter",
        objective_model: str | None = None,
        objective_arch: str | None = None,
        model_name: str = "",
        progress: Callable[[int, int], None] | None = None,
        lock: contextlib.AbstractContextManager | None = None,
    ):
        from accelerate import PartialState

        self.pipe = pipe
        self.config = config or SearchConfig(prompts=["a photo"])
        self.state = PartialState()
        self.layout = describe_transformer(pipe.transformer)
        self.family = self.layout.family
        if self.family == "sd3" and self.config.true_cfg_scale not in (None, 1.0):
            raise ValueError("true_cfg_scale applies to FLUX only; SD3's CFG scale is guidance_scale.")
        self.output_dir = Path(output_dir)
        self.model_name = model_name
        self.journal = Journal(self.output_dir, self.config.config_hash(model_name), self.config.to_dict())
        self.objective = load_objective(objective, objective_model, objective_arch, device=self.state.device)
        self.progress = progress
        self.lock = lock or contextlib.nullcontext()
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ generation
    def _cfg(self) -> bool:
        c = self.config
        return (
            c.guidance_scale > 1 if self.family == "sd3" else (c.true_cfg_scale > 1 and c.negative_prompt is not None)
        )

    def _embed(self, prompt: str) -> dict[str, torch.Tensor]:
        """Text embeddings of one prompt, computed once per prompt."""
        if prompt not in self._embeddings:
            pipe, c, cfg = self.pipe, self.config, self._cfg()
            msl = {"max_sequence_length": c.max_sequence_length} if c.max_sequence_length else {}
            with torch.no_grad():
                if self.family == "sd3":
                    pe, npe, pp, npp = pipe.encode_prompt(
                        prompt,
                        prompt,
                        prompt,
                        negative_prompt=c.negative_prompt or "",
                        do_classifier_free_guidance=cfg,
                        **msl,
                    )
                    emb = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
                    if cfg:
                        emb.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
                else:
                    pe, pp, _ = pipe.encode_prompt(prompt, prompt, **msl)
                    emb = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
                    if cfg:
                        npe, npp, _ = pipe.encode_prompt(c.negative_prompt, c.negative_prompt, **msl)
                        emb.update(negative_prompt_embeds=npe, negative_pooled_prompt_embeds=npp)
            self._embeddings[prompt] = emb
        return self._embeddings[prompt]

    def generate(self, items: list[tuple[HeadSet, str, int]], pag: bool = True, output_type: str = "pil"):
        """Images for `(head set, prompt, seed)` items in one pipeline call (one transformer call per step)."""
        c = self.config
        with self.lock:
            embeddings = [self._embed(prompt) for _, prompt, _ in items]
        kwargs: dict[str, Any] = {k: torch.cat([e[k] for e in embeddings]) for k in embeddings[0]}
        kwargs.update(
            generator=[torch.Generator().manual_seed(seed) for _, _, seed in items],
            pag_heads=[heads for heads, _, _ in items],
            pag_scale=c.pag_scale if pag else 0.0,
            pag_identity_weight=c.pag_identity_weight,
            pag_identity_scope=c.pag_identity_scope,
            guidance_scale=c.guidance_scale,
            num_inference_steps=c.num_inference_steps,
            height=c.height,
            width=c.width,
            output_type=output_type,
        )
        if c.max_sequence_length:
            kwargs["max_sequence_length"] = c.max_sequence_length
        if self.family == "flux":
            kwargs["true_cfg_scale"] = c.true_cfg_scale
        with self.lock:
            return self.pipe(**kwargs).images

    # ------------------------------------------------------------------ scoring
    def _score_candidates(self, round_index: int, candidates: list[Head], selected: list[Head]) -> dict[Head, float]:
        pairs = self.config.pairs()
        work = [(cand, j) for cand in candidates for j in range(len(pairs))]
        per_candidate: dict[Head, list[float | None]] = {cand: [None] * len(pairs) for cand in candidates}
        finished: dict[Head, float] = {}
        bs = self.config.batch_size
        for start in range(0, len(work), bs):
            chunk = work[start : start + bs]
            items = [(HeadSet([*selected, cand]), pairs[j][0], pairs[j][1]) for cand, j in chunk]
            images = self.generate(items)
            scores = list(self.objective(images, [prompt for _, prompt, _ in items]))
            for (cand, j), score in zip(chunk, scores):
                per_candidate[cand][j] = float(score)
                if all(s is not None for s in per_candidate[cand]):
                    mean = sum(per_candidate[cand]) / len(pairs)
                    finished[cand] = mean
                    self.journal.append(
                        {
                            "round": round_index,
                            "layer": cand[0],
                            "head": cand[1],
                            "score": mean,
                            "scores": per_candidate[cand],
                        }
                    )
                    if self.progress:
                        self.progress(len(finished), len(candidates))
        return finished

    # ------------------------------------------------------------------ the search
    def pool(self) -> list[Head]:
        pool = HeadSet.parse(self.config.pool) if self.config.pool else HeadSet(range(self.layout.num_layers))
        return pool.resolve(self.layout.num_layers, self.layout.num_heads).pairs()

    def run(self) -> SearchResult:
        """Run (or resume) the search; every process returns the same result."""
        from accelerate.utils import gather_object

        c, state = self.config, self.state
        pool = self.pool()
        selected: list[Head] = []
        rounds: list[dict[str, Any]] = []
        for r in range(c.rounds):
            if not pool:
                break
            round_file = self.output_dir / "rounds" / f"round_{r}.json"
            if round_file.exists():
                scores, chosen = read_round(round_file)
            else:
                done = self.journal.scores(r)
                todo = [h for h in pool if h not in done]
                mine = todo[state.process_index :: state.num_processes]
                if self.progress:
                    self.progress(0, len(mine))
                new = self._score_candidates(r, mine, selected)
                gathered = gather_object([new]) if state.num_processes > 1 else [new]
                scores = dict(done)
                for part in gathered:
                    scores.update(part)
                ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
                chosen = [head for head, _ in ranked[: c.top_k]]
                if state.is_main_process:
                    atomic_write_json(
                        round_file,
                        {
                            "round": r,
                            "scores": [[l, h, s] for (l, h), s in sorted(scores.items())],
                            "chosen": [list(h) for h in chosen],
                            "selected": [list(h) for h in selected + chosen],
                        },
                    )
                state.wait_for_everyone()
            rounds.append({"scores": scores, "chosen": chosen})
            selected += chosen
            pool = [h for h in pool if h not in set(chosen)]
        result = SearchResult(
            selected,
            rounds,
            self.family,
            self.layout.num_layers,
            self.layout.num_heads,
            c,
            {"output_dir": str(self.output_dir), "model": self.model_name},
        )
        if state.is_main_process:
            result.save_heads(self.output_dir / "selected_heads.json")
        state.wait_for_everyone()
        return result

    def validation_images(self, count: int = 4):
        """Baseline (no PAG) and selected-heads images for the first `count` pairs, same seeds."""
        pairs = self.config.pairs()[:count]
        selected = HeadSet(json.loads((self.output_dir / "selected_heads.json").read_text())["heads"])
        baseline = self.generate([(selected, p, s) for p, s in pairs], pag=False)
        guided = self.generate([(selected, p, s) for p, s in pairs])
        return pairs, baseline, guided


def read_round(path: Path) -> tuple[dict[Head, float], list[Head]]:
    doc = json.loads(path.read_text())
    return {(l, h): s for l, h, s in doc["scores"]}, [tuple(h) for h in doc["chosen"]]
