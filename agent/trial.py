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

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters import lora
from adapters.names import KNOWLEDGE, TRIAL
from policies import reward as rewards
from policies import selection as selections
from policies import self_edit as self_edits
from policies.config import PolicyConfig
from policies.reward import Scores, normalize

from . import teacher, tracking
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
    transfer: tuple = ()  # a distillation candidate's answered prompts (agent.teacher.Answered)

    @property
    def ok(self) -> bool:
        """Trained to the end and scored: it may be selected."""
        return self.scores is not None

    def as_trial(self, idx: int) -> selections.Trial:
        """What selection needs to know of it."""
        return selections.Trial(idx, self.candidate.policy, self.reward, self.other, ok=self.ok)


def fixed_of(policies: PolicyConfig) -> list[Candidate]:
    """The candidates of the mix's policies that write nothing (``passage_chat``):
    one each, however many samples the mix asks for; passage-only is not one of them
    (``include_passage`` says whether it competes)."""
    return [Candidate(n) for n in dict.fromkeys(policies.self_edits) if self_edits.fixed(n)]


def candidates_of(policies: PolicyConfig, edits: list[Candidate]) -> list[Candidate]:
    """The candidates of one passage: the passage alone (when the policy trains it,
    or when there is nothing else), then the self-edits (the written ones, and one of
    each policy that writes nothing), each alone (SEAL's best-of-N) and/or all
    together (``policies.augment``)."""
    edits = [*fixed_of(policies), *edits]
    together = [Candidate(self_edits.AUGMENTED, self_edits.pack([(e.policy, e.text) for e in edits]),
                          sum(e.n_tokens for e in edits))] if policies.augment != "off" and len(edits) > 1 else []
    alone = list(edits) if policies.augment != "only" or not together else []
    return ([Candidate(PASSAGE)] if policies.include_passage or not edits else []) + alone + together


def rewards_of(scores: Scores, baseline: Scores, selecting: str, teacher: Scores | None = None) -> tuple[float, float]:
    """(selecting reward, the other reward) of a trial: the other breaks ties. A reward
    relative to the teacher (``teacher_agreement``) is measured against ``teacher``
    (the reward questions asked open book, before the update)."""
    if rewards.relative_to(selecting) == "teacher":
        if teacher is None:
            raise ValueError(f"reward {selecting} needs the teacher's scores")
        return rewards.REWARDS.get(selecting)(scores, teacher), rewards.answer_logprob(scores, baseline)
    primary = rewards.REWARDS.get(selecting)(scores, baseline)
    other = rewards.qa_accuracy(scores, baseline) if selecting == "answer_logprob" else \
        rewards.answer_logprob(scores, baseline)
    return primary, other


def parts_of(cand: Candidate) -> list[Candidate]:
    """The self-edits a candidate trains on: itself, or those an augmented one holds."""
    if cand.policy != self_edits.AUGMENTED:
        return [cand]
    return [Candidate(policy, text) for policy, text in self_edits.parts(cand.text)]


def examples_of(learner: Learner, passage: dict, cand: Candidate, seed: int = 0,
                answered: list | None = None, held_out: list[dict] = ()) -> tuple[list[lora.Example], tuple]:
    """A candidate's training examples, and its answered transfer set when it distils
    (the teacher answers and scores it here, once; ``answered``, a stored transfer set,
    is re-distilled instead of answered anew). An augmented candidate trains on all its
    self-edits at once, the passage once. Where the passage stays in the mix of a
    self-edit, it is goldfish-masked (``distill.goldfish``); passage-only stays SEAL's
    plain reference. ``held_out`` questions (the reward's) are never taught."""
    title, text, cfg = passage["title"], passage["text"], learner.distill
    out: list[lora.Example] = []
    items: list = []
    distils = False
    for j, part in enumerate(parts_of(cand)):
        policy = self_edits.get(part.policy)
        if not policy.distills:
            out += policy.examples(title, text, part.text, learner.runtime.chat)
            continue
        distils = True
        if cfg.keep_passage:
            out.append(lora.Example("", self_edits.passage_text(title, text)))
        if answered is None:
            items += teacher.answer(learner, passage, part.text, cfg, seed + 7 * j, onpolicy=policy.distills == "student",
                                    exclude=frozenset(normalize(q["question"]) for q in held_out))
    if answered is not None:
        items = list(answered)
    if distils:
        out += teacher.targets(learner, items, cfg.top_k)
    raw = lora.Example("", self_edits.passage_text(title, text))
    if cand.policy != PASSAGE and cfg.goldfish:
        out = [dataclasses.replace(e, goldfish=cfg.goldfish) if e == raw and e.teacher is None else e for e in out]
    unique: list[lora.Example] = []
    for e in out:  # the passage (or a line) written twice is trained once
        if e.teacher is not None or e not in unique:
            unique.append(e)
    return unique, tuple(items)


def try_candidate(learner: Learner, passage: dict, cand: Candidate, seed: int, reward_qs: list[dict],
                  baseline: Scores, *, idx: int = 0, beside_passage: bool = False,
                  beat: Callable[[], None] | None = None, on_event: OnEvent = ignore,
                  teacher_scores: Scores | None = None) -> TrialOutcome:
    """Train one candidate in the ``trial`` adapter and score it on ``reward_qs``
    (closed book) against ``baseline`` (and ``teacher_scores``, for a reward relative
    to the teacher; the trial's drift from the base is then measured too). ``beat`` is
    called after every optimiser step (a claim's heartbeat; it may raise to abandon
    the trial)."""
    examples, items = examples_of(learner, passage, cand, seed, held_out=reward_qs)
    plain = [dataclasses.replace(e, goldfish=0) for e in examples]
    if beside_passage and cand.policy != PASSAGE and self_edits.adds_nothing(plain, passage["title"], passage["text"]):
        return _untrained(cand, len(examples), SAME_AS_PASSAGE, None)
    tag = {"candidate": idx, "policy": cand.policy}
    on_event(Event("train", START, f"trial {idx + 1}: {cand.policy}", **tag))

    def progress(step: int, total: int, loss: float) -> None:
        on_event(Event("train", ADVANCE, done=step, total=total, loss=loss, **tag))
        if beat is not None:
            beat()

    distilled = any(self_edits.get(p.policy).distills for p in parts_of(cand))
    result = learner.trial(examples, seed, progress=progress, epochs=learner.distill.epochs if distilled else None)
    on_event(Event("train", END, tokens=result.tokens, steps=result.steps, loss=result.final_loss, **tag))
    if result.nan:
        return _untrained(cand, len(examples), NON_FINITE, result, items)
    on_event(Event("score", START, **tag))
    t0 = time.perf_counter()
    scores = learner.score(TRIAL, passage["title"], reward_qs)
    if rewards.relative_to(learner.policies.reward) == "teacher":
        scores = dataclasses.replace(scores, kl=tracking.kl_from_base(learner, TRIAL)[0])
        learner.model.set_adapter(KNOWLEDGE)
    score_seconds = time.perf_counter() - t0
    on_event(Event("score", END, **tag))
    primary, other = rewards_of(scores, baseline, learner.policies.reward, teacher_scores)
    return TrialOutcome(cand, len(examples), None, result, scores, primary, other,
                        rewards.answer_logprob(scores, baseline), rewards.qa_accuracy(scores, baseline),
                        scores.f1 - baseline.f1, score_seconds, items)


def _untrained(cand: Candidate, n_examples: int, note: str, result: lora.TrainResult | None,
               items: tuple = ()) -> TrialOutcome:
    return TrialOutcome(cand, n_examples, note, result, None, float("-inf"), float("-inf"),
                        None, None, None, 0.0, items)
