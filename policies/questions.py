"""Question policies: where a passage's questions come from, how they are split into
reward and probe questions, and how a question is put to the model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from .registry import Registry


def answer_prompt(question: str, title: str | None = None, context: str | None = None) -> str:
    """The user message that asks a question: closed book (title as topic) or open book."""
    if context:
        head = f"Read this passage{f' about {title}' if title else ''}:\n{context}\n\n"
        return f"{head}Answer the question in a few words, using the passage.\nQuestion: {question}"
    topic = f"Topic: {title}\n" if title else ""
    return f"{topic}Answer the question in a few words.\nQuestion: {question}"


def split_roles(question_ids: list[int], reward_fraction: float, seed: int) -> dict[int, str]:
    """Split a passage's questions into *reward* (used to select a candidate) and
    *probe* (held out, only ever measured). Seeded, so a re-run splits the same way.
    With a single question there is no probe: it is a reward question."""
    ids = list(question_ids)
    random.Random(seed).shuffle(ids)
    if len(ids) <= 1:
        return dict.fromkeys(ids, "reward")
    n_reward = min(len(ids) - 1, max(1, round(len(ids) * reward_fraction)))
    return {qid: ("reward" if i < n_reward else "probe") for i, qid in enumerate(ids)}


class QuestionPolicy(Protocol):
    name: str

    def generates(self, n_given: int) -> bool: ...


@dataclass(frozen=True)
class Given:
    """The user's questions (from the ingested file or --questions). A passage without
    any falls back to self-generated questions, so that every passage has a reward."""

    name: str = "given"

    def generates(self, n_given: int) -> bool:
        return n_given == 0


@dataclass(frozen=True)
class SelfWritten:
    """Always the model's own verified questions (the user's, if any, are kept as probes
    only: they never steer selection)."""

    name: str = "self"

    def generates(self, n_given: int) -> bool:
        return True


QUESTION_POLICIES: Registry[type] = Registry("question policy", {"given": Given, "self": SelfWritten})


def get(name: str) -> QuestionPolicy:
    return QUESTION_POLICIES.get(name)()


def self_question_prompt(title: str, text: str, n: int) -> str:
    """Ask the model to write Q/A pairs about a passage it can see (open book)."""
    head = f"{title}\n{text}" if title else text
    return (
        f"{head}\n\nWrite {n} different questions about facts stated in the passage above, "
        "each with a short answer (a name, number, date or short phrase) copied from the "
        "passage. Write each question on a line starting with 'Q:' and its answer on the "
        "next line starting with 'A:'."
    )
