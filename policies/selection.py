"""Selection: which trial update, if any, becomes the new knowledge adapter.

Best-of-N with margins. The no-update baseline must be beaten by ``min_gain``; and
when the passage-only update is among the trials (seal always trains it: it is cheap
and it is what a self-edit must improve on), a self-edit is preferred over it only
if it beats it by ``edit_margin``. Rewards on 2-3 questions are noisy; the margin is
what keeps a lucky draw from replacing a sound update. Ties go to the other reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class Trial:
    idx: int
    policy: str
    reward: float  # the selecting reward (gain over the no-update baseline)
    other: float  # the other reward, for ties
    ok: bool = True  # False when the trial failed a guard (NaN loss)


@dataclass(frozen=True)
class Choice:
    idx: int | None  # None: keep the current adapter
    reason: str


def best_of_n(trials: list[Trial], min_gain: float, edit_margin: float) -> Choice:
    ok = [t for t in trials if t.ok]
    if not ok:
        return Choice(None, "every trial failed a guard")
    best = max(ok, key=lambda t: (t.reward, t.other))
    if best.reward <= min_gain:
        return Choice(None, f"best gain {best.reward:+.3f} does not clear min_gain {min_gain:+.3f}")
    reference = next((t for t in ok if t.policy == "passage"), None)
    if reference is not None and best is not reference:
        if best.reward - reference.reward <= edit_margin:
            if reference.reward > min_gain:
                return Choice(
                    reference.idx,
                    f"self-edit {best.policy}#{best.idx} beat passage-only by "
                    f"{best.reward - reference.reward:+.3f}, within edit_margin {edit_margin}: passage-only kept",
                )
            return Choice(None, "no self-edit beat passage-only by the margin, and passage-only gained too little")
    return Choice(best.idx, f"{best.policy}#{best.idx} gained {best.reward:+.3f}")


def _reference_and_best(trials: list[Trial]) -> tuple[Trial | None, Trial | None]:
    """The passage-only trial and the best self-edit trial (by reward, ties by the
    other reward), each None when it did not train."""
    ok = [t for t in trials if t.ok]
    reference = next((t for t in ok if t.policy == "passage"), None)
    edits = [t for t in ok if t is not reference]
    return reference, max(edits, key=lambda t: (t.reward, t.other)) if edits else None


def floor(trials: list[Trial], min_gain: float, edit_margin: float) -> Choice:
    """Passage-only is the floor: it is committed whenever it trained (learning the
    passage is the job, and a reward on 2-3 questions is too noisy to veto it); a
    self-edit replaces it only if it beats it by more than ``edit_margin``. Without a
    passage-only trial, as ``best_of_n``."""
    reference, best = _reference_and_best(trials)
    if reference is None:
        return best_of_n(trials, min_gain, edit_margin)
    if best is not None and best.reward - reference.reward > edit_margin:
        return Choice(best.idx, f"{best.policy}#{best.idx} beat passage-only by {best.reward - reference.reward:+.3f}")
    return Choice(reference.idx, "passage-only kept (the floor): no self-edit beat it by the margin")


def prefer_edit(trials: list[Trial], min_gain: float, edit_margin: float) -> Choice:
    """The best self-edit is committed (its examples include the passage) unless
    passage-only beats it by more than ``edit_margin``; passage-only when no self-edit
    trained. Without a passage-only trial, as ``best_of_n``."""
    reference, best = _reference_and_best(trials)
    if reference is None:
        return best_of_n(trials, min_gain, edit_margin)
    if best is None:
        return Choice(reference.idx, "no self-edit trained: passage-only")
    if reference.reward - best.reward > edit_margin:
        return Choice(reference.idx, f"passage-only beat the best self-edit by {reference.reward - best.reward:+.3f}")
    return Choice(best.idx, f"{best.policy}#{best.idx}: best self-edit, within the margin of passage-only or above it")


def always(trials: list[Trial], min_gain: float, edit_margin: float) -> Choice:
    """The best trial by reward is committed, whatever its gain: learning the passage is
    the job, and on the tune split the rewards on a passage's two reward questions
    picked the better of two candidates no more often than a coin (README). With one
    fixed candidate (the default: ``passage_recall`` alone) it is that one. Only a
    failed guard (a non-finite loss) keeps the current adapter."""
    ok = [t for t in trials if t.ok]
    if not ok:
        return Choice(None, "every trial failed a guard")
    best = max(ok, key=lambda t: (t.reward, t.other))
    return Choice(best.idx, f"{best.policy}#{best.idx} committed (gain {best.reward:+.3f}; selection always)")


SelectionFn = Callable[[list[Trial], float, float], Choice]

SELECTIONS: Registry[SelectionFn] = Registry(
    "selection policy", {"best_of_n": best_of_n, "floor": floor, "prefer_edit": prefer_edit, "always": always}
)


def get(name: str) -> SelectionFn:
    return SELECTIONS.get(name)
