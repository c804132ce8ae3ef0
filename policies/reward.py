"""Grading and rewards.

Grading follows SQuAD's evaluation script: answers are normalised (lower case,
punctuation deleted, no articles, single spaces); an answer is *correct* when the normalised
gold answer is contained in the normalised prediction, and token F1 is recorded too.
``normalize`` is the one normaliser of the project: ingest finds an answer's passage
with it and the self-edit policies check grounding with it, so what grading accepts
as contained is what they accept.

A reward is a plain callable (TRL's habit): it maps the scores of a trial and of the
no-update baseline to one number, higher is better. Both rewards are recorded for
every candidate; ``policies.reward`` in the config picks the one that selects.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .registry import Registry

_ARTICLES = re.compile(r"\b(a|an|the)\b")


class _PunctTable(dict):
    """A ``str.translate`` table filled on demand: a punctuation or symbol character
    (Unicode categories P* and S*: on ASCII exactly SQuAD's ``string.punctuation``,
    beyond it « » ‘ ’ “ ” – — … and the like) maps to ``replacement``, any other
    character to itself."""

    def __init__(self, replacement: str):
        super().__init__()
        self.replacement = replacement or None  # None: deleted

    def __missing__(self, code: int) -> str | int | None:
        out = self.replacement if unicodedata.category(chr(code))[0] in "PS" else code
        self[code] = out
        return out


_TABLES = {"": _PunctTable(""), " ": _PunctTable(" ")}


def normalize(text: str, punct: str = "") -> str:
    """SQuAD's normalisation: lower case, punctuation deleted (``«Paris»`` -> ``paris``,
    ``Levi's`` -> ``levis``), articles removed, single spaces. ``punct=" "`` turns
    punctuation into spaces instead (``Levi's`` -> ``levi s``): a looser match, which
    ingest tries second when it looks for an answer's passage."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_TABLES[punct])).split())


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def is_correct(prediction: str, gold: str) -> bool:
    """Normalised containment: the gold answer appears in the prediction."""
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(prediction)} "


@dataclass(frozen=True)
class Scores:
    """How a model did on a set of questions."""

    accuracy: float  # fraction correct (containment)
    f1: float  # mean token F1
    logprob: float  # mean over questions of the answer's mean per-token log-likelihood
    n: int
    answers: tuple[str, ...] = ()
    correct: tuple[bool, ...] = ()
    f1s: tuple[float, ...] = ()
    logprobs: tuple[float, ...] = ()  # per question: the answer's mean per-token log-likelihood
    kl: float | None = None  # drift from the base on generic text, when a reward needs it


def answer_logprob(trial: Scores, baseline: Scores) -> float:
    """Mean gain in per-token log-likelihood of the gold answers: dense and cheap."""
    return trial.logprob - baseline.logprob


def qa_accuracy(trial: Scores, baseline: Scores) -> float:
    """Gain in closed-book accuracy of greedy answers, with F1 as a small tie-breaker."""
    return (trial.accuracy - baseline.accuracy) + 1e-3 * (trial.f1 - baseline.f1)


DRIFT_WEIGHT = 1.0  # teacher_agreement: nats of answer log-likelihood one nat of drift KL costs


def teacher_agreement(trial: Scores, teacher: Scores) -> float:
    """Label-free: how closely the closed-book student now answers like the open-book
    teacher, on questions the model wrote itself and did not train on. The
    teacher-normalised answer log-likelihood ``log p_student(a|q) - log
    p_teacher(a|q, passage)`` (0: as sure as when reading), plus the share of answers
    that contain the teacher's, minus the drift from the base model on generic text
    (``Scores.kl``: RL's Razor, an update that moves the model far forgets more).
    ``teacher`` is the scores of the same questions asked open book, before the update."""
    return (trial.logprob - teacher.logprob) + trial.accuracy - DRIFT_WEIGHT * (trial.kl or 0.0)


teacher_agreement.relative_to = "teacher"  # type: ignore[attr-defined]

RewardFn = Callable[[Scores, Scores], float]

REWARDS: Registry[RewardFn] = Registry("reward", {
    "answer_logprob": answer_logprob,
    "qa_accuracy": qa_accuracy,
    "teacher_agreement": teacher_agreement,
})


def relative_to(name: str) -> str:
    """What a reward compares a trial's scores with: 'baseline' (the no-update
    model, closed book) or 'teacher' (the model reading the passage)."""
    return getattr(REWARDS.get(name), "relative_to", "baseline")
