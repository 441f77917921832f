"""HeadHunter: greedy, resumable, batched and multi-process search for the attention heads to perturb."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging

from .._lock import FolderLock
from ..guidance import HeadSet
from ..pipelines.policy import encode_prompt, uses_cfg
from ..runtime import describe_transformer
from .config import SearchConfig
from .cost import Cost, RowCounter
from .gradient import gradient_ranking, require_differentiable
from .journal import Journal
from .objectives import Objective, load_objective
from .records import journal_cost
from .replay import replay_round
from .result import SearchResult, stage_summary
from .rundir import RunDirectory
from .strategies import RoundOutcome, head_hunter, make_strategy


logger = logging.get_logger(__name__)
Head = tuple[int, int]


class HeadHunter:
    r"""
    The paper's Algorithm 1 ([`~search.strategies.head_hunter`]): in round t, every head still in the pool is tried
    with the heads selected so far, images are generated for the M prompt-seed pairs, scored by the objective and
    averaged; the top-k heads join the selected set. Ties break by (layer, head) ascending. The config's `strategy`
    decides which candidates are scored on which pairs: `"exhaustive"` (all on all), `"halving"` (successive
    halving within each round, see [`~search.strategies.successive_halving`]) or `"gradient"` (each round ranks the
    pool by d objective / d head weight with a differentiable objective, see [`~search.gradient.head_gradients`],
    and halves over the best `prefilter_keep`; the ranking is written to `rounds/round_R_gradients.json` before the
    exact stages, validated when read back, so a resumed round keeps its prefilter and does not pay for it again;
    its cost, backward counted as two forward passes, joins the round's).

    Rendering lives behind the `score(candidates, pairs)` callable that Algorithm 1 is given: journaled scores are
    reused (a score on a pair never depends on the stage that asked for it), the rest is rendered. Candidates are
    batched (several candidate head sets in one transformer call), text embeddings are computed once per prompt,
    images reach the objective in memory, every candidate is journaled as soon as its stage's pairs are scored
    (with the work it took: row-evaluations, images, seconds), and under `accelerate launch` / `torchrun` each
    stage's candidates are split across processes.

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
        progress (`Callable[[int, int], None]`, *optional*): Called with (candidates done, total) of the stage under
            way in this process (one stage per round for the exhaustive strategy).
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
        self.run_dir = RunDirectory(self.output_dir)
        self.model_name = model_name
        pool = self.pool()  # a pool outside the model fails here, before anything is written
        self.num_pairs = len(self.config.pairs())
        self.strategy = make_strategy(
            self.config.strategy,
            self.config.halving_min_pairs,
            self.config.halving_eta,
            self.config.has_proxy,
            prefilter_keep=self.config.prefilter_keep,
        )
        # Nothing is written here: config.json is written by run() once every check has passed.
        self.journal = Journal(
            self.run_dir,
            self.config.config_hash(model_name),
            self.config.to_dict(),
            rounds=self.config.rounds,
            pool=frozenset(pool),
            num_layers=self.layout.num_layers,
            num_heads=self.layout.num_heads,
            verbose=self.state.is_main_process,
            num_pairs=self.num_pairs,
        )
        self._all_agree(self._check_unlocked)  # another live run on the folder: refused before loading anything
        self.objective = load_objective(objective, objective_model, objective_arch, device=self.state.device)
        if self.config.strategy == "gradient":
            require_differentiable(self.objective)
        self.progress = progress
        self.lock = lock or contextlib.nullcontext()
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}
        self.counter = RowCounter(pipe, self.config.height, self.config.width)
        self._replayed: set[int] = set()

    def _check_unlocked(self) -> None:
        self.run_dir.lock().check()

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
        return uses_cfg(self.family, c.guidance_scale, c.true_cfg_scale, c.negative_prompt)

    def _embed(self, prompt: str) -> dict[str, torch.Tensor]:
        """Text embeddings of one prompt, computed once per prompt."""
        if prompt not in self._embeddings:
            c = self.config
            with torch.no_grad():
                self._embeddings[prompt] = encode_prompt(
                    self.pipe, self.family, prompt, c.negative_prompt, self._cfg(), c.max_sequence_length
                )
        return self._embeddings[prompt]

    def generate(
        self,
        items: list[tuple[HeadSet, str, int]],
        pag: bool = True,
        output_type: str = "pil",
        counter: RowCounter | None = None,
        proxy: bool = False,
    ):
        """
        Images for `(head set, prompt, seed)` items in one pipeline call (one transformer call per step).

        Args:
            items (`list[tuple[HeadSet, str, int]]`): What to render.
            pag (`bool`, defaults to `True`): `False` renders without PAG.
            output_type (`str`, defaults to `"pil"`): The pipeline's.
            counter ([`~search.cost.RowCounter`], *optional*): Counts the transformer rows of this call.
            proxy (`bool`, defaults to `False`): Render at the config's proxy fidelity (size and steps).
        """
        c = self.config
        fidelity = c.fidelity(proxy)
        with self.lock:
            embeddings = [self._embed(prompt) for _, prompt, _ in items]
        kwargs: dict[str, Any] = {k: torch.cat([e[k] for e in embeddings]) for k in embeddings[0]}
        kwargs.update(
            generator=[torch.Generator().manual_seed(seed) for _, _, seed in items],
            pag_heads=[heads for heads, _, _ in items],
            pag_scale=c.pag_scale if pag else 0.0,
            pag_identity_weight=c.pag_identity_weight,
            pag_identity_scope=c.pag_identity_scope,
            pag_reuse=c.pag_reuse,
            guidance_scale=c.guidance_scale,
            num_inference_steps=fidelity["steps"],
            height=fidelity["height"],
            width=fidelity["width"],
            output_type=output_type,
        )
        if c.max_sequence_length:
            kwargs["max_sequence_length"] = c.max_sequence_length
        if self.family == "flux":
            kwargs["true_cfg_scale"] = c.true_cfg_scale
        with self.lock, counter or contextlib.nullcontext():
            return self.pipe(**kwargs).images

    # ------------------------------------------------------------------ scoring
    def _render(
        self,
        round_index: int,
        stage: int,
        units: list[tuple[Head, list[int]]],
        selected: list[Head],
        proxy: bool = False,
    ) -> dict[Head, dict[int, float]]:
        """
        Render and score `(candidate, pair indices)` units in batches (at the proxy fidelity when `proxy`); journal
        each unit (one record) as soon as its pairs are scored, with its share of the work (row-evaluations, weighted
        by image tokens relative to the configured size, and seconds split evenly over a batch's images) and, in runs
        with a proxy, the fidelity of its scores.
        """
        pairs = self.config.pairs()
        all_pairs = list(range(len(pairs)))
        wanted = dict(units)
        work = [(cand, j) for cand, missing in units for j in missing]
        got: dict[Head, dict[int, float]] = {cand: {} for cand, _ in units}
        spent: dict[Head, Cost] = {cand: Cost() for cand, _ in units}
        finished = 0
        if self.progress:
            self.progress(0, len(units))
        bs = self.config.batch_size
        for start in range(0, len(work), bs):
            chunk = work[start : start + bs]
            items = [(HeadSet([*selected, cand]), pairs[j][0], pairs[j][1]) for cand, j in chunk]
            began, rows = time.perf_counter(), self.counter.rows
            images = self.generate(items, counter=self.counter, proxy=proxy)
            scores = list(self.objective(images, [prompt for _, prompt, _ in items]))
            if len(scores) != len(items):
                raise ValueError(f"The objective returned {len(scores)} scores for {len(items)} images.")
            share = Cost((self.counter.rows - rows) / len(chunk), 1.0, (time.perf_counter() - began) / len(chunk))
            for (cand, j), score in zip(chunk, scores):
                score = float(score)
                if not math.isfinite(score):
                    raise ValueError(
                        f"The objective returned a non-finite score ({score}) for head {cand[0]}.{cand[1]} on "
                        f"{pairs[j][0]!r} seed {pairs[j][1]}; it would corrupt the ranking."
                    )
                got[cand][j] = score
                spent[cand] = spent[cand] + share
                if len(got[cand]) < len(wanted[cand]):
                    continue
                values = [got[cand][p] for p in wanted[cand]]
                record: dict[str, Any] = {
                    "round": round_index,
                    "layer": cand[0],
                    "head": cand[1],
                    "score": sum(values) / len(values),
                    "scores": values,
                    "cost": spent[cand].to_dict(),
                }
                if stage or wanted[cand] != all_pairs:  # exhaustive records keep the original format
                    record.update(stage=stage, pairs=wanted[cand])
                if self.config.has_proxy:
                    record["fidelity"] = {"proxy": proxy, **self.config.fidelity(proxy)}
                self.journal.append(record)
                finished += 1
                if self.progress:
                    self.progress(finished, len(units))
        return got

    def _known(self, round_index: int, selected: list[Head]) -> dict[bool, dict[Head, dict[int, float]]]:
        """
        The journaled `{proxy: {head: {pair: score}}}` of a round, per fidelity (records of heads selected earlier
        are skipped).
        """
        done: dict[bool, dict[Head, dict[int, float]]] = {False: {}, True: {}}
        chosen = set(selected)
        for proxy in (False, True):
            for head, known in self.journal.pair_scores(round_index, proxy).items():
                if head not in chosen:
                    done[proxy][head] = known
                elif proxy is False and self.state.is_main_process:
                    logger.warning(
                        "%s: round %d holds head %d.%d, already selected in an earlier round; ignored.",
                        self.journal.path,
                        round_index,
                        *head,
                    )
        return done

    def _score_for(self, round_index: int, selected: list[Head]) -> _RoundScore:
        """The `score(candidates, pairs)` callable of a round, for Algorithm 1."""
        known = self._known(round_index, selected)
        if self.state.num_processes > 1:
            self.state.wait_for_everyone()  # every process has read the journal before any appends to it
        return _RoundScore(self, round_index, selected, known)

    def _gradient_cost(self, round_index: int | None = None) -> Cost:
        """The cost of the gradient files of one round (or of all rounds), as written."""
        if self.config.strategy != "gradient":
            return Cost()
        return self.run_dir.gradients_cost(range(self.config.rounds) if round_index is None else [round_index])

    # ------------------------------------------------------------------ the search
    def pool(self) -> list[Head]:
        return self.config.pool_heads(self.layout.num_layers, self.layout.num_heads)

    def run(self) -> SearchResult:
        """
        Run (or resume) the search; every process returns the same result.

        The run folder is locked for the run ([`~search.rundir.RunDirectory.lock`], `output_dir/.lock`): only the
        main process takes the lock and writes `config.json`, round files and the selected heads; the other
        processes of the same run (under `accelerate launch` / `torchrun`) only append their candidates to the
        journal, serialized with the main process by the journal's `flock`, and stop with the main process's error
        when it cannot start. The lock is released when `run` returns or raises; a run that fails before journaling
        anything removes the
        `config.json` it wrote (and the folder, when it created it and left it empty).

        Raises:
            [`~headpag._lock.FolderLocked`]: when another live run writes the folder (naming it and the owner's pid).
        """
        run_lock = self.run_dir.lock()
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
                    self.run_dir.remove_config()  # nothing journaled: leave nothing
                run_lock.release()
                if not finished and created_dir:
                    self.run_dir.remove_if_empty()

    def _start(self, run_lock: FolderLock, created_dir: bool) -> bool:
        """Main process: take the lock, then write `config.json`; whether it was written now."""
        run_lock.acquire()
        try:
            return self.journal.start()
        except BaseException:
            run_lock.release()
            if created_dir:
                self.run_dir.remove_if_empty()
            raise

    def _replay(self, r: int, pool: list[Head], selected: list[Head]) -> RoundOutcome | None:
        """A round file's outcome when it is exactly what this run would write, else `None` (see [`replay_round`])."""
        outcome = replay_round(self, r, pool, selected)
        if outcome is not None:
            self._replayed.add(r)
        return outcome

    def _finish_round(self, r: int, selected: list[Head], outcome: RoundOutcome) -> None:
        """Main process: write the round file (unless it was replayed); then every process waits for it."""
        if r in self._replayed:
            return
        if self.state.is_main_process:
            self.run_dir.write_round(
                r,
                {
                    "round": r,
                    "strategy": self.config.strategy,
                    "scores": [[l, h, s] for (l, h), s in sorted(outcome.scores.items())],
                    "chosen": [list(h) for h in outcome.chosen],
                    "selected": [list(h) for h in selected + outcome.chosen],
                    "stages": [stage.to_json() for stage in outcome.stages],
                    "cost": (self.journal.cost(r) + self._gradient_cost(r)).to_dict(),
                },
            )
        self.state.wait_for_everyone()

    def _search(self) -> SearchResult:
        c = self.config
        self._replayed = set()
        outcomes = head_hunter(
            self._score_for,
            self.pool(),
            c.rounds,
            c.top_k,
            self.num_pairs,
            self.strategy,
            replay=self._replay,
            on_round=self._finish_round,
        )
        records = self.journal.records()
        rounds = [
            {
                "scores": outcome.scores,
                "chosen": outcome.chosen,
                "pairs_scored": outcome.pairs_scored(),
                "stages": stage_summary(outcome),
                "cost": (journal_cost(records, r) + self._gradient_cost(r)).to_dict(),
                **({"prefilter": outcome.prefilter} if outcome.prefilter is not None else {}),
            }
            for r, outcome in enumerate(outcomes)
        ]
        selected = [head for outcome in outcomes for head in outcome.chosen]
        cost = (journal_cost(records) + self._gradient_cost()).to_dict()
        result = SearchResult(
            selected,
            rounds,
            self.family,
            self.layout.num_layers,
            self.layout.num_heads,
            c,
            {"output_dir": str(self.output_dir), "model": self.model_name, "strategy": c.strategy},
            cost,
        )
        if self.state.is_main_process:
            result.save_heads(self.run_dir.confined(self.run_dir.selected_heads_path))
        self.state.wait_for_everyone()
        return result

    def validation_images(self, count: int = 4):
        """Baseline (no PAG) and selected-heads images for the first `count` pairs, same seeds."""
        pairs = self.config.pairs()[:count]
        selected = HeadSet.load(self.run_dir.selected_heads_path)
        baseline = self.generate([(selected, p, s) for p, s in pairs], pag=False)
        guided = self.generate([(selected, p, s) for p, s in pairs])
        return pairs, baseline, guided


class _RoundScore:
    r"""
    The `score(candidates, pairs, proxy=False)` callable of one round: scores known from the journal (or from an
    earlier stage) at the same fidelity are reused, the rest is rendered (split across processes by candidate, then
    gathered), and each call is one stage of the round's journal records.
    """

    def __init__(
        self,
        hunter: HeadHunter,
        round_index: int,
        selected: list[Head],
        known: dict[bool, dict[Head, dict[int, float]]],
    ):
        self.hunter = hunter
        self.round = round_index
        self.selected = list(selected)
        self.known = known
        self.stage = 0

    def __call__(
        self, candidates: Sequence[Head], pairs: Sequence[int], proxy: bool = False
    ) -> dict[Head, list[float]]:
        state = self.hunter.state
        stage, self.stage = self.stage, self.stage + 1
        known = self.known[proxy]  # a score of one fidelity is never reused at the other
        units = []
        for cand in candidates:
            have = known.get(cand, {})
            missing = [j for j in pairs if j not in have]
            if missing:
                units.append((cand, missing))
        mine = units[state.process_index :: state.num_processes]
        new = self.hunter._render(self.round, stage, mine, self.selected, proxy)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([new])
        else:
            gathered = [new]
        for part in gathered:
            for cand, scores in part.items():
                known.setdefault(cand, {}).update(scores)
        return {cand: [known[cand][j] for j in pairs] for cand in candidates}

    def prefilter(self, candidates: Sequence[Head]) -> dict[Head, float]:
        """The gradient strategy's ranking values of `candidates` (see [`~search.gradient.gradient_ranking`])."""
        return gradient_ranking(self.hunter, self.round, self.selected, list(candidates))


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
