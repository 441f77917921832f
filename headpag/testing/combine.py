"""Guidance arithmetic: classifier-free guidance plus perturbation guidance."""

from __future__ import annotations

import torch


def perturbation_guidance(
    v_uncond: torch.Tensor | None,
    v_cond: torch.Tensor,
    v_perturbed: torch.Tensor,
    guidance_scale: float,
    pag_scale: float,
) -> torch.Tensor:
    r"""
    `v = v_u + g (v_c - v_u) + s (v_c - v_p)` ([PAG](https://huggingface.co/papers/2403.17377), Eq. 5 of
    [HeadHunter](https://huggingface.co/papers/2506.10978)); without CFG (`v_uncond=None`): `v_c + s (v_c - v_p)`.

    Args:
        v_uncond (`torch.Tensor` or `None`): Unconditional prediction, `None` when CFG is off.
        v_cond (`torch.Tensor`): Conditional prediction.
        v_perturbed (`torch.Tensor`): Conditional prediction with perturbed heads.
        guidance_scale (`float`): CFG scale `g` (ignored without `v_uncond`).
        pag_scale (`float`): PAG scale `s`, typically 1-8 (the paper searches at 3).
    """
    pag = pag_scale * (v_cond - v_perturbed)
    if v_uncond is None:
        return v_cond + pag
    return v_uncond + guidance_scale * (v_cond - v_uncond) + pag
