"""HeadHunter search settings and the paper's presets."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any

from ..guidance import HeadSet


def read_prompts(name: str) -> list[str]:
    """A shipped prompt file (`headpag/search/prompts/NAME.txt`); lines starting with `#` are comments."""
    text = resources.files("headpag.search").joinpath("prompts", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class SearchConfig:
    r"""
    Settings of a HeadHunter search (paper: arXiv 2506.10978, Algorithm 1).

    Args:
        prompts (`list[str]`), seeds (`list[int]`): The M prompt-seed pairs, zipped (`pairing="zip"`, equal lengths,
            or one seed for all prompts) or crossed (`pairing="product"`).
        rounds (`int`): Greedy rounds R. top_k (`int`): heads added per round k.
        pool (`str`, *optional*): Head spec restricting the candidates (`None` = every head).
        pag_scale, pag_identity_weight, pag_identity_scope: PAG settings of every generation.
        pag_reuse (`int`, defaults to 1): The perturbed branch on steps 0, k, 2k, ... only (see `head_pag`); counts
            in the settings hash (and appears in `config.json`) only when not 1, so earlier runs resume.
        guidance_scale (`float`): SD3: CFG scale (<= 1 is off); FLUX: the distilled guidance embedding.
        true_cfg_scale (`float`): FLUX only: true CFG (with `negative_prompt`).
        num_inference_steps, height, width (`int`): Generation size.
        style_prompt (`str`, *optional*): Prompts become `"{style}, {prompt}"` (the paper's style search).
        negative_prompt (`str`, *optional*): For CFG.
        max_sequence_length (`int`, *optional*): T5 tokens (pipeline default when `None`).
        batch_size (`int`): Images per transformer call (candidates are batched; does not change results).
        strategy (`str`, defaults to `"exhaustive"`): Which candidates each round scores at which fidelity.
            `"exhaustive"` (the paper's Algorithm 1): every candidate on all M pairs. `"halving"`: successive
            halving within each round: every candidate on the first `halving_min_pairs` pairs, then only the top
            `max(top_k, ceil(n / halving_eta))` of the `n` scored (by mean over the pairs scored so far) go on to
            `halving_eta` times as many pairs, until the survivors are scored on all M pairs; the round chooses the
            top-k among them. Pairs are taken in the configured order (put representative pairs first). A score on a
            pair never depends on the stage that computed it, so later stages only render the new pairs.
        halving_min_pairs (`int`, defaults to 1): Pairs of the first halving stage.
        halving_eta (`int`, defaults to 3): Halving factor (>= 2): candidates kept `1 / eta`, pairs times `eta`.
        proxy_size (`int`, *optional*): `"halving"` only: the early stages (all but the last) render at
            `proxy_size` x `proxy_size` (a cheaper, lower-fidelity proxy); the last stage renders at `height` x
            `width`. Must suit the model like `height` and `width` do (e.g. a multiple of 16 for SD3).
        proxy_steps (`int`, *optional*): `"halving"` only: the early stages run `proxy_steps` sampling steps; the last
            stage runs `num_inference_steps`. With either proxy set, a score made at one fidelity is never reused at
            the other: the last stage scores its survivors at full fidelity on all M pairs (not only the pairs new to
            them), so the heads it ranks are compared on full-fidelity scores only, on the same pairs as an
            exhaustive round. Proxy fields count in the settings hash only when set.
        grad_steps (`int`, defaults to 4): `"gradient"` only: sampling steps of the differentiable run that ranks the
            pool (see [`~search.gradient.head_gradients`]).
        prefilter_keep (`int`, *optional*): `"gradient"` only: heads of the gradient ranking that go on to the exact
            halving stages (defaults to `4 * top_k`; at least `top_k`).

    `strategy="gradient"`: each round first ranks the whole pool by the mean gradient of a differentiable objective
    with respect to every head's identity weight (one `grad_steps`-step sampling run with backward per pair), keeps
    the top `prefilter_keep` and scores them exactly like `"halving"` (with `halving_min_pairs`, `halving_eta`).
    The gradient fields count in the settings hash (and appear in `config.json`) only with `strategy="gradient"`.
    """

    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    pairing: str = "zip"
    rounds: int = 1
    top_k: int = 24
    pool: str | None = None
    pag_scale: float = 3.0
    pag_identity_weight: float = 1.0
    pag_identity_scope: str = "joint"
    pag_reuse: int = 1
    guidance_scale: float = 0.0
    true_cfg_scale: float = 1.0
    num_inference_steps: int = 20
    height: int = 1024
    width: int = 1024
    style_prompt: str | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    batch_size: int = 8
    strategy: str = "exhaustive"
    halving_min_pairs: int = 1
    halving_eta: int = 3
    proxy_size: int | None = None
    proxy_steps: int | None = None
    grad_steps: int = 4
    prefilter_keep: int | None = None

    # Fields that do not change any result: excluded from the config hash, so a run may resume with other values.
    _NOT_HASHED = ("batch_size",)
    # Fields hashed only when the strategy is not the default: exhaustive runs keep the hash they had before the
    # strategies existed (and the halving settings, which an exhaustive run ignores, never change its hash).
    _STRATEGY_FIELDS = ("strategy", "halving_min_pairs", "halving_eta")
    # Fields hashed (and written to `config.json`) only when set, so runs without proxies keep their hash.
    _PROXY_FIELDS = ("proxy_size", "proxy_steps")
    # Fields hashed (and written to `config.json`) only with `strategy="gradient"`, so other runs keep their hash.
    _GRADIENT_FIELDS = ("grad_steps", "prefilter_keep")
    STRATEGIES = ("exhaustive", "halving", "gradient")

    def __post_init__(self):
        if isinstance(self.pool, HeadSet):
            self.pool = str(self.pool)
        if self.pool is not None:
            HeadSet.parse(self.pool)
        if not self.prompts:
            raise ValueError("SearchConfig needs at least one prompt.")
        if self.pairing not in ("zip", "product"):
            raise ValueError(f"pairing must be 'zip' or 'product', got {self.pairing!r}.")
        if self.pairing == "zip" and len(self.seeds) not in (1, len(self.prompts)):
            raise ValueError(
                f"pairing='zip' needs one seed per prompt (or a single seed): got {len(self.prompts)} prompts and "
                f"{len(self.seeds)} seeds; use pairing='product' for every prompt with every seed."
            )
        names = ("rounds", "top_k", "batch_size", "num_inference_steps", "height", "width", "halving_min_pairs")
        for name in (*names, "pag_reuse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.strategy not in self.STRATEGIES:
            allowed = ", ".join(map(repr, self.STRATEGIES))
            raise ValueError(f"strategy must be one of {allowed}, got {self.strategy!r}.")
        for name in self._PROXY_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}.")
        if self.has_proxy and self.strategy != "halving":
            raise ValueError(
                f"proxy_size and proxy_steps apply to strategy='halving' (its early stages), not {self.strategy!r}."
            )
        if isinstance(self.grad_steps, bool) or not isinstance(self.grad_steps, int) or self.grad_steps < 1:
            raise ValueError(f"grad_steps must be an integer >= 1, got {self.grad_steps!r}.")
        keep = self.prefilter_keep
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"prefilter_keep must be an integer >= 1 or None, got {keep!r}.")
        if isinstance(self.halving_eta, bool) or not isinstance(self.halving_eta, int) or self.halving_eta < 2:
            raise ValueError(f"halving_eta must be an integer >= 2, got {self.halving_eta!r}.")
        for name in ("pag_scale", "guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.pag_scale < 0:
            raise ValueError(f"pag_scale must be >= 0, got {self.pag_scale!r}.")
        if not 0 <= self.pag_identity_weight <= 1:  # also refuses nan
            raise ValueError(f"pag_identity_weight must be in [0, 1], got {self.pag_identity_weight!r}.")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in self.seeds):
            raise ValueError(f"seeds must be integers in [0, 2**63), got {self.seeds!r}.")
        self.seeds = [int(s) for s in self.seeds]

    def pool_heads(self, num_layers: int, num_heads: int) -> list[tuple[int, int]]:
        """The candidate heads on a model of `num_layers` x `num_heads`: the `pool` spec, or every head."""
        pool = HeadSet.parse(self.pool) if self.pool else HeadSet(range(num_layers))
        return pool.resolve(num_layers, num_heads).pairs()

    @property
    def has_proxy(self) -> bool:
        """Whether the early halving stages render at a proxy fidelity (`proxy_size` or `proxy_steps` set)."""
        return self.proxy_size is not None or self.proxy_steps is not None

    def fidelity(self, proxy: bool = False) -> dict[str, int]:
        """
        `{"height", "width", "steps"}` of the full fidelity, or of the proxy (unset proxy fields are the full ones).

        Args:
            proxy (`bool`, defaults to `False`): The proxy fidelity.
        """
        if proxy:
            size = self.proxy_size
            return {
                "height": size or self.height,
                "width": size or self.width,
                "steps": self.proxy_steps or self.num_inference_steps,
            }
        return {"height": self.height, "width": self.width, "steps": self.num_inference_steps}

    def pairs(self) -> list[tuple[str, int]]:
        """The M (prompt, seed) pairs, with the style prefix applied."""
        prompts = [f"{self.style_prompt}, {p}" if self.style_prompt else p for p in self.prompts]
        if self.pairing == "product":
            return [(p, s) for p in prompts for s in self.seeds]
        seeds = self.seeds * len(prompts) if len(self.seeds) == 1 else self.seeds
        return list(zip(prompts, seeds))

    def to_dict(self) -> dict[str, Any]:
        """
        The settings (as written to a run's `config.json`). The strategy fields appear only with a non-default
        strategy, so an exhaustive run's `config.json` reads exactly as before the strategies existed (readers that
        check its keys keep accepting it); [`~SearchConfig.from_dict`] restores the defaults.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.strategy == "exhaustive":
            for name in self._STRATEGY_FIELDS:
                del out[name]
        for name in self._PROXY_FIELDS:
            if out.get(name, 0) is None:
                del out[name]
        if self.strategy != "gradient":
            for name in self._GRADIENT_FIELDS:
                del out[name]
        if self.pag_reuse == 1:
            del out["pag_reuse"]
        return out

    @property
    def kept_by_prefilter(self) -> int:
        """`"gradient"`: how many heads of the gradient ranking go on to the exact stages (before the pool's size)."""
        return max(self.top_k, 4 * self.top_k if self.prefilter_keep is None else self.prefilter_keep)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchConfig:
        """
        The settings of a `config.json`'s `"config"` (keys that are no field are ignored, missing ones default).

        Args:
            values (`dict`): Field values.
        """
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def config_hash(self, model: str = "") -> str:
        """
        Hash of everything that changes a result (and the model's identity). The strategy fields count only when
        the strategy is not `"exhaustive"`, so exhaustive runs keep their hash from before the strategies existed;
        the proxy fields only when set.
        """
        skip = set(self._NOT_HASHED)
        if self.strategy == "exhaustive":
            skip.update(self._STRATEGY_FIELDS)
        skip.update(name for name in self._PROXY_FIELDS if getattr(self, name) is None)
        if self.strategy != "gradient":
            skip.update(self._GRADIENT_FIELDS)
        if self.pag_reuse == 1:
            skip.add("pag_reuse")
        doc = {k: v for k, v in asdict(self).items() if k not in skip}
        doc["model"] = model
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def preset(name: str, family: str) -> dict[str, Any]:
    """The paper's settings: `"general"` (PickScore, M=20, R=1, k=24, u=0.25) or `"style"` (R=5, k=3)."""
    if name == "general":
        prompts = read_prompts("general")
        girl = "a photo of beautiful girl"
        return dict(
            prompts=prompts + [girl] * 10,
            seeds=[0] * len(prompts) + list(range(10)),
            rounds=1,
            top_k=24,
            pag_identity_weight=0.25,
            pag_scale=3.0,
            num_inference_steps=20,
        )
    if name == "style":
        common = dict(prompts=read_prompts("content"), seeds=[0, 1, 2, 3, 4], rounds=5, top_k=3)
        if family == "flux":
            return {**common, "pag_scale": 8.0, "num_inference_steps": 15, "height": 512, "width": 512}
        return {**common, "pag_scale": 3.0, "num_inference_steps": 20, "height": 1024, "width": 1024}
    raise ValueError(f"Unknown preset {name!r}; allowed: 'general', 'style'.")
