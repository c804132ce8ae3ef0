"""Merging LoRA adapter versions with peft's ``add_weighted_adapter``.

The versions to merge are given as weight sets (``lora.snapshot`` or a saved file)
of the same structure as a target adapter. Each is put into a temporary adapter,
peft combines them (linear, TIES, DARE, magnitude pruning, or their SVD variants) into
one more, and the result is written into the target, which keeps its rank, alpha and
targets. The temporary adapters are removed whatever happens.

peft gives a merged adapter ``lora_alpha = r`` (its own scaling) and folds the input
adapters' scalings into the merged A and B; the result is rescaled here so that,
under the target's scaling, it is the same update.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import lora
from .lora import AdapterError

log = logging.getLogger(__name__)

TMP = "_merge_in_"
OUT = "_merge_out"
SAME_RANK = (
    "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)
NEEDS_DENSITY = ("ties", "dare", "magnitude_prune")


def _scaling(peft_model, adapter: str) -> float:
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter in scaling:
            return float(scaling[adapter])
    raise AdapterError(f"adapter {adapter!r} has no LoRA layer")


def merge_into(
    peft_model,
    into: str,
    states: Sequence[dict[str, Tensor]],
    weights: Sequence[float],
    combination_type: str = "linear",
    density: float | None = None,
    seed: int = 0,
) -> None:
    """Merge ``states`` (weight sets shaped like adapter ``into``) with ``weights`` and
    write the result into ``into``. DARE's random drops are seeded by ``seed`` and leave
    the global RNG alone. The active adapter is unchanged."""
    if combination_type not in SAME_RANK:
        raise ValueError(f"merge type {combination_type!r} is not supported (known: {', '.join(SAME_RANK)})")
    if len(states) != len(weights) or not states:
        raise ValueError("merge_into: give one weight per adapter state, and at least one state")
    pruned = any(t in combination_type for t in NEEDS_DENSITY)
    if pruned and not (density and 0 < density <= 1):
        raise ValueError(f"merge type {combination_type!r} needs a density in (0, 1]")
    if into not in peft_model.peft_config:
        raise AdapterError(f"no adapter named {into!r}")
    active = peft_model.active_adapter
    names = [f"{TMP}{i}" for i in range(len(states))]
    rank = peft_model.peft_config[into].r
    try:
        for name, state in zip(names, states, strict=True):
            peft_model.add_adapter(name, copy.deepcopy(peft_model.peft_config[into]))
            lora.restore(peft_model, name, state)
        kwargs: dict = {"density": density} if pruned else {}
        if combination_type.endswith("svd"):
            # the reduced SVD gives the same rank-r truncation, without the full U (n x n)
            kwargs.update(svd_rank=rank, svd_full_matrices=False)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            peft_model.add_weighted_adapter(names, list(map(float, weights)), OUT,
                                            combination_type=combination_type, **kwargs)
        merged = lora.snapshot(peft_model, OUT)
        # merged delta = s_out * B A; the target applies s_into: rescale A and B evenly
        factor = math.sqrt(_scaling(peft_model, OUT) / _scaling(peft_model, into))
        lora.restore(peft_model, into, {k: v * factor for k, v in merged.items()})
    finally:
        for name in [*names, OUT]:
            if name in peft_model.peft_config:
                peft_model.delete_adapter(name)
        peft_model.set_adapter(active if isinstance(active, str) else active[0])
        for p in peft_model.parameters():
            p.requires_grad_(False)
    log.info("merged %d adapter versions into %r (%s)", len(states), into, combination_type)
