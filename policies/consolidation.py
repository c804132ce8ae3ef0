"""Consolidation policies: what a sleep phase trains on, or merges.

A policy is a pure strategy: from the learned passages (in the order they were
committed) and the committed adapter versions, it decides the *mix* of one sleep —
which passages' committed self-edits are replayed, how many free generations of the
base model ("dreams") are mixed in, or which adapter versions are merged and with
what weights. The agent does the work (``agent/sleep.py``).

- ``replay``: the most recent passages and a seeded sample of older ones are
  retrained together, so that early passages are rehearsed (experience replay);
- ``dream``: the replay mix plus free generations of the base model from BOS (no
  prompt), to anchor general behaviour and dilute the verbatim text of the passages;
- ``merge``: the last few knowledge versions combined with peft's weighted/TIES/DARE
  merging (checkpoint averaging along the learning trajectory: the older versions
  still hold what the newer ones began to forget).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .registry import Registry

# peft's add_weighted_adapter combination types whose result has the rank of its inputs
# (``cat`` is left out: its rank is the sum of the inputs', which no longer fits the
# knowledge adapter). The *_svd types rebuild each update exactly and truncate to rank r.
MERGE_TYPES = (
    "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)


class Knobs(Protocol):
    """The settings a policy reads (``agent.sleep.SleepConfig`` has them all)."""

    recent: int
    old_sample: int
    dreams: int
    merge_versions: int
    merge_type: str


@dataclass(frozen=True)
class Mix:
    """What one sleep consolidates. Training policies fill ``replay``/``dreams``;
    ``merge`` fills ``versions``/``weights``."""

    replay: tuple[int, ...] = ()  # passage ids whose committed self-edits are retrained, oldest first
    dreams: int = 0  # free generations of the base model mixed in
    versions: tuple[str, ...] = ()  # adapter versions to merge, oldest first
    weights: tuple[float, ...] = ()  # one per version
    note: str = ""  # why the mix is empty, when it is

    @property
    def empty(self) -> bool:
        return not (self.replay or self.versions)


class Consolidation(Protocol):
    name: str
    trains: bool  # True: retrain the knowledge adapter on a mix; False: merge versions

    def plan(self, learned: Sequence[int], versions: Sequence[str], knobs: Knobs, seed: int) -> Mix: ...


def replay_sample(learned: Sequence[int], recent: int, old_sample: int, seed: int) -> tuple[int, ...]:
    """The ``recent`` last passages and a seeded sample of ``old_sample`` earlier ones,
    in commit order. A different seed (each sleep has its own) rehearses other old ones."""
    learned = list(learned)
    cut = max(len(learned) - max(recent, 0), 0)
    older, newest = learned[:cut], learned[cut:]
    k = min(max(old_sample, 0), len(older))
    picked = set(random.Random(seed).sample(older, k)) if k else set()
    return tuple(p for p in older if p in picked) + tuple(newest)


def measured_sample(learned: Sequence[int], budget: int, recent: int, round_: int, seed: int) -> list[int]:
    """The learned passages one sleep measures (before and after, for the gate): all of
    them while they fit in ``budget`` (0: no limit); beyond it, the ``recent`` newest
    (the ones replayed) and a window of a fixed, seeded order of the rest that moves on
    by its own size every sleep (``round_``), so that every passage is measured again
    within ceil(N / window) sleeps and a sleep's cost stays bounded at 10,000 passages."""
    if not budget or len(learned) <= budget:
        return list(learned)
    newest = list(learned[len(learned) - min(recent, budget):]) if recent else []
    taken = set(newest)
    rest = sorted((p for p in learned if p not in taken), key=lambda p: (zlib.crc32(f"{seed}:{p}".encode()), p))
    width = budget - len(newest)
    start = (round_ * width) % len(rest) if rest and width else 0
    window = (rest[start:] + rest[:start])[:width]
    return sorted(taken | set(window))


class Replay:
    """Retrain on recent and sampled old committed self-edits (experience replay)."""

    name = "replay"
    trains = True

    def plan(self, learned: Sequence[int], versions: Sequence[str], knobs: Knobs, seed: int) -> Mix:
        mix = replay_sample(learned, knobs.recent, knobs.old_sample, seed)
        return Mix(replay=mix, note="" if mix else "no learned passage to replay")


class Dream:
    """The replay mix plus free generations of the base model from BOS."""

    name = "dream"
    trains = True

    def plan(self, learned: Sequence[int], versions: Sequence[str], knobs: Knobs, seed: int) -> Mix:
        mix = replay_sample(learned, knobs.recent, knobs.old_sample, seed)
        return Mix(replay=mix, dreams=max(knobs.dreams, 0) if mix else 0,
                   note="" if mix else "no learned passage to replay")


def merge_weights(merge_type: str, k: int) -> tuple[float, ...]:
    """Uniform weights under which merging k copies of one adapter gives that adapter
    back (so that merging similar versions averages them), for each way peft combines:

    - the TIES family averages the values that agree in sign: weights of 1;
    - the other *_svd types add the exact updates B·A, weighted: 1/k;
    - ``linear``, ``dare_linear`` and ``magnitude_prune`` add the A and the B factors
      separately, each scaled by the square root of its weight, so the update is the
      product of two weighted sums: 1/k² makes it the product of two means."""
    if "ties" in merge_type:
        w = 1.0
    elif merge_type.endswith("svd"):
        w = 1.0 / k
    else:
        w = 1.0 / (k * k)
    return (w,) * k


class Merge:
    """Combine the last ``merge_versions`` knowledge versions (peft's merging)."""

    name = "merge"
    trains = False

    def plan(self, learned: Sequence[int], versions: Sequence[str], knobs: Knobs, seed: int) -> Mix:
        chosen = tuple(versions)[-max(knobs.merge_versions, 0):] if knobs.merge_versions > 0 else ()
        if len(chosen) < 2:
            return Mix(note=f"{len(chosen)} committed version(s) to merge (merge_versions {knobs.merge_versions}): "
                            "nothing to merge")
        return Mix(versions=chosen, weights=merge_weights(knobs.merge_type, len(chosen)))


CONSOLIDATIONS: Registry[type] = Registry("consolidation policy")


def register(cls: type) -> type:
    """Register a policy class under its ``name``; a duplicate name is refused."""
    return CONSOLIDATIONS.register(cls.name, cls)


for _cls in (Replay, Dream, Merge):
    register(_cls)


def get(name: str) -> Consolidation:
    return CONSOLIDATIONS.get(name)()
