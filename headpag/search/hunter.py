"""HeadHunter: greedy, resumable, batched and multi-process search for the attention heads to perturb."""

from __future__ import annotations

import contextlib
import json
import math
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
from .journal import CONFIG_NAME, Journal, RunLock, remove_if_empty
from .journal import read_round as read_round_file
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

    The run folder is safe against careless use: the constructor writes nothing (a failed check, such as an
    unknown objective or `true_cfg_scale` on SD3, leaves no `config.json` to block the corrected rerun), a folder
    held by another live run is refused, and the journal is read back through a validating reader (see
    [`~search.journal.Journal`]); [`~HeadHunter.run`] explains the lock.

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
        self.pipe = pipe
        self.config = config or SearchConfig(prompts=["a photo"])
        self.state = process_state()
        self.layout = describe_transformer(pipe.transformer)
        self.family = self.layout.family
        if self.family == "sd3" and self.config.true_cfg_scale not in (None, 1.0):
            raise ValueError("true_cfg_scale applies to FLUX only; SD3's CFG scale is guidance_scale.")
        self.output_dir = Path(output_dir)
        self.model_name = model_name
        pool = self.pool()  # a pool outside the model fails here, before anything is written
        # Nothing is written here: config.json is written by run() once every check has passed.
        self.journal = Journal(
            self.output_dir,
            self.config.config_hash(model_name),
            self.config.to_dict(),
            rounds=self.config.rounds,
            pool=frozenset(pool),
            num_layers=self.layout.num_layers,
            num_heads=self.layout.num_heads,
            verbose=self.state.is_main_process,
        )
        self._all_agree(self._check_unlocked)  # another live run on the folder: refused before loading anything
        self.objective = load_objective(objective, objective_model, objective_arch, device=self.state.device)
        self.progress = progress
        self.lock = lock or contextlib.nullcontext()
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}

    def _check_unlocked(self) -> None:
        RunLock(self.output_dir).check()

    def _all_agree(self, step: Callable[[], Any]) -> Any:
        """
        Run `step` on the main process only; when it raises, every process raises (the main one its own error, the
        others a `RuntimeError` quoting it), so no process is left waiting in a collective.
        """
        error: BaseException | None = None
        out = None
        if self.state.is_main_process:
            try:
                out = step()
            except Exception as e:  # noqa: BLE001 - re-raised below on every process
                error = e
        if self.state.num_processes > 1:
            from accelerate.utils import gather_object

            messages = gather_object([None if error is None else f"{type(error).__name__}: {error}"])
            failed = next((m for m in messages if m is not None), None)
            if error is None and failed is not None:
                raise RuntimeError(f"the main process refused to start: {failed}")
        if error is not None:
            raise error
        return out

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
            if len(scores) != len(items):
                raise ValueError(f"The objective returned {len(scores)} scores for {len(items)} images.")
            for (cand, j), score in zip(chunk, scores):
                score = float(score)
                if not math.isfinite(score):
                    raise ValueError(
                        f"The objective returned a non-finite score ({score}) for head {cand[0]}.{cand[1]} on "
                        f"{pairs[j][0]!r} seed {pairs[j][1]}; it would corrupt the ranking."
                    )
                per_candidate[cand][j] = score
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
        """
        Run (or resume) the search; every process returns the same result.

        The run folder is locked for the run ([`RunLock`], `output_dir/.lock`): only the main process takes the lock
        and writes `config.json`, round files and the selected heads; the other processes of the same run (under
        `accelerate launch` / `torchrun`) only append their candidates to the journal, serialized with the main
        process by the journal's `flock`, and stop with the main process's error when it cannot start. The lock is
        released when `run` returns or raises; a run that fails before journaling anything removes the
        `config.json` it wrote (and the folder, when it created it and left it empty).

        Raises:
            [`RunDirectoryLocked`]: when another live run writes the folder (naming it and the owner's pid).
        """
        run_lock = RunLock(self.output_dir)
        created_dir = not self.output_dir.exists()
        wrote_config = self._all_agree(lambda: self._start(run_lock, created_dir))
        finished = False
        try:
            result = self._search()
            finished = True
            return result
        finally:
            if run_lock.held:
                if not finished and wrote_config and not self.journal.path.exists():
                    (self.output_dir / CONFIG_NAME).unlink(missing_ok=True)  # nothing journaled: leave nothing
                run_lock.release()
                if not finished and created_dir:
                    remove_if_empty(self.output_dir)

    def _start(self, run_lock: RunLock, created_dir: bool) -> bool:
        """Main process: take the lock, then write `config.json`; whether it was written now."""
        run_lock.acquire()
        try:
            return self.journal.start()
        except BaseException:
            run_lock.release()
            if created_dir:
                remove_if_empty(self.output_dir)
            raise

    def _done(self, round_index: int, pool: list[Head]) -> dict[Head, float]:
        """The journaled scores of a round's candidates (records of heads no longer in its pool are skipped)."""
        in_pool = set(pool)
        done = {}
        for head, score in self.journal.scores(round_index).items():
            if head in in_pool:
                done[head] = score
            elif self.state.is_main_process:
                logger.warning(
                    "%s: round %d holds head %d.%d, already selected in an earlier round; ignored.",
                    self.journal.path,
                    round_index,
                    *head,
                )
        return done

    def _read_round(self, round_file: Path, r: int, pool: list[Head], selected: list[Head]):
        """A round file's `(scores, chosen)` when it is exactly what this run would write, else `None` (warned)."""
        parsed = read_round_file(round_file, r)
        if parsed is None:
            return None
        scores, chosen, recorded_selected = parsed
        problem = None
        if set(scores) != set(pool):
            problem = "its scored heads are not this round's candidates"
        elif chosen != self._rank(scores):
            problem = "its chosen heads are not the top-k of its scores"
        elif recorded_selected != selected + chosen:
            problem = "its selected heads do not follow the earlier rounds"
        if problem:
            logger.warning("%s: %s; the round is recomputed from the journal.", round_file, problem)
            return None
        return scores, chosen

    def _rank(self, scores: dict[Head, float]) -> list[Head]:
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [head for head, _ in ranked[: self.config.top_k]]

    def _search(self) -> SearchResult:
        from accelerate.utils import gather_object

        c, state = self.config, self.state
        pool = self.pool()
        selected: list[Head] = []
        rounds: list[dict[str, Any]] = []
        for r in range(c.rounds):
            if not pool:
                break
            round_file = self.output_dir / "rounds" / f"round_{r}.json"
            known = self._read_round(round_file, r, pool, selected) if round_file.exists() else None
            if known is not None:
                scores, chosen = known
            else:
                done = self._done(r, pool)
                if state.num_processes > 1:
                    state.wait_for_everyone()  # every process has read the journal before any appends to it
                todo = [h for h in pool if h not in done]
                mine = todo[state.process_index :: state.num_processes]
                if self.progress:
                    self.progress(0, len(mine))
                new = self._score_candidates(r, mine, selected)
                gathered = gather_object([new]) if state.num_processes > 1 else [new]
                scores = dict(done)
                for part in gathered:
                    scores.update(part)
                chosen = self._rank(scores)
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


def process_state():
    """
    accelerate's `PartialState`. Launched as several processes (`torchrun`, `accelerate launch`) on a machine without
    CUDA, it asks accelerate to join them on CPU (`cpu=True`, the gloo backend): left alone, accelerate leaves each
    process on its own, and each would run the whole search on the same folder (the second refused by the run lock).
    Call it before anything else creates a `PartialState` (the state is shared by the whole process).
    """
    from accelerate import PartialState

    world_size = os.environ.get("WORLD_SIZE", "1")
    multi = world_size.isdigit() and int(world_size) > 1
    return PartialState(cpu=True) if multi and not torch.cuda.is_available() else PartialState()


def read_round(path: Path) -> tuple[dict[Head, float], list[Head]]:
    """`(scores, chosen)` of a round file (kept for callers of the old helper; see [`journal.read_round`])."""
    parsed = read_round_file(path)
    if parsed is None:
        raise ValueError(f"{path} is missing or invalid.")
    return parsed[0], parsed[1]
