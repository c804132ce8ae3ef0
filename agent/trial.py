"""One trial: a candidate update, trained and scored. The shared step of the wake
cycle, the benchmarks and the editor's ReST-EM rounds.

A *candidate* is what the model wrote to learn a passage from (a self-edit of some
policy; ``passage`` is the passage alone). ``try_candidate`` turns it into training
examples, trains the ``trial`` adapter on them (from the current knowledge), scores
the reward questions closed book and computes both rewards against the no-update
baseline. The trained weights stay in the ``trial`` adapter until the next trial, so
a caller may measure more (a benchmark's probe questions) or snapshot them to commit.

A self-edit whose examples are exactly the passage-only update's is not trained
again when a passage-only trial is in the same set (``beside_passage``): it would
repeat that trial, and it cannot win selection over it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters import lora
from adapters.names import TRIAL
from policies import reward as rewards
from policies import selection as selections
from policies import self_edit as self_edits
from policies.config import PolicyConfig
from policies.reward import Scores

from .events import ADVANCE, END, START, Event, OnEvent, ignore
from .learner import Learner

PASSAGE = "passage"  # the candidate with no self-edit: the passage alone (the reference)
SAME_AS_PASSAGE = "no usable example beyond the passage: same as passage-only, not trained"
NON_FINITE = "non-finite training loss: trial aborted"


@dataclass(frozen=True)
class Candidate:
    policy: str
    text: str = ""  # the self-edit ("" for passage-only)
    n_tokens: int = 0  # tokens generated to write it


@dataclass(frozen=True)
class TrialOutcome:
    candidate: Candidate
    n_examples: int
    note: str | None  # why it did not train (same as passage-only) or did not finish (non-finite loss)
    result: lora.TrainResult | None  # None: not trained
    scores: Scores | None  # closed book, on the reward questions, after the update
    reward: float  # the selecting reward (-inf when there are no scores)
    other: float  # the other reward: selection's tie-break
    reward_logprob: float | None
    reward_acc: float | None
    reward_f1: float | None
    score_seconds: float

    @property
    def ok(self) -> bool:
        """Trained to the end and scored: it may be selected."""
        return self.scores is not None

    def as_trial(self, idx: int) -> selections.Trial:
        """What selection needs to know of it."""
        return selections.Trial(idx, self.candidate.policy, self.reward, self.other, ok=self.ok)


def candidates_of(policies: PolicyConfig, edits: list[Candidate]) -> list[Candidate]:
    """The candidates of one passage: the passage alone (when the policy trains it,
    or when no self-edit was written) and then the self-edits."""
    return ([Candidate(PASSAGE)] if policies.include_passage or not edits else []) + list(edits)


def rewards_of(scores: Scores, baseline: Scores, selecting: str) -> tuple[float, float]:
    """(selecting reward, the other reward) of a trial: the other breaks ties."""
    primary = rewards.REWARDS.get(selecting)(scores, baseline)
    other = rewards.qa_accuracy(scores, baseline) if selecting == "answer_logprob" else \
        rewards.answer_logprob(scores, baseline)
    return primary, other


def examples_of(learner: Learner, passage: dict, cand: Candidate) -> list[lora.Example]:
    return self_edits.get(cand.policy).examples(passage["title"], passage["text"], cand.text, learner.runtime.chat)


def try_candidate(learner: Learner, passage: dict, cand: Candidate, seed: int, reward_qs: list[dict],
                  baseline: Scores, *, idx: int = 0, beside_passage: bool = False,
                  beat: Callable[[], None] | None = None, on_event: OnEvent = ignore) -> TrialOutcome:
    """Train one candidate in the ``trial`` adapter and score it on ``reward_qs``
    (closed book) against ``baseline``. ``beat`` is called after every optimiser step
    (a claim's heartbeat; it may raise to abandon the trial)."""
    examples = examples_of(learner, passage, cand)
    if beside_passage and cand.policy != PASSAGE and self_edits.adds_nothing(examples, passage["title"], passage["text"]):
        return _untrained(cand, len(examples), SAME_AS_PASSAGE, None)
    tag = {"candidate": idx, "policy": cand.policy}
    on_event(Event("train", START, f"trial {idx + 1}: {cand.policy}", **tag))

    def progress(step: int, total: int, loss: float) -> None:
        on_event(Event("train", ADVANCE, done=step, total=total, loss=loss, **tag))
        if beat is not None:
            beat()

    result = learner.trial(examples, seed, progress=progress)
    on_event(Event("train", END, tokens=result.tokens, steps=result.steps, loss=result.final_loss, **tag))
    if result.nan:
        return _untrained(cand, len(examples), NON_FINITE, result)
    on_event(Event("score", START, **tag))
    t0 = time.perf_counter()
    scores = learner.score(TRIAL, passage["title"], reward_qs)
    score_seconds = time.perf_counter() - t0
    on_event(Event("score", END, **tag))
    primary, other = rewards_of(scores, baseline, learner.policies.reward)
    return TrialOutcome(cand, len(examples), None, result, scores, primary, other,
                        rewards.answer_logprob(scores, baseline), rewards.qa_accuracy(scores, baseline),
                        scores.f1 - baseline.f1, score_seconds)


def _untrained(cand: Candidate, n_examples: int, note: str, result: lora.TrainResult | None) -> TrialOutcome:
    return TrialOutcome(cand, n_examples, note, result, None, float("-inf"), float("-inf"),
                        None, None, None, 0.0)
