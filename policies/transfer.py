"""Transfer sets: the prompts a passage is distilled on, and their knobs.

Learning by reading (Caccia et al. 2025's deep context distillation; Padmanabhan et
al. 2023): the *teacher* is the model with the passage in its prompt; the *student* is
the same model closed book, with the trial adapter. The student is trained to answer
the way the teacher answers, on many diverse prompts about the passage: its own
questions (the self-edit the writer wrote), "what do you know about TITLE", and
"explain X" for the names, numbers and phrases the passage mentions. This module is
pure: it says which prompts a transfer set has, for both sides; the agent asks the
teacher (``agent.teacher``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .questions import answer_prompt
from .reward import normalize
from .self_edit import ABOUT, ENTITY, parse_qa, sentences


@dataclass(frozen=True)
class DistillConfig:
    top_k: int = field(default=32, metadata={"help": "teacher tokens kept per position (the rest of its mass is one tail bucket)"})
    answer_tokens: int = field(default=40, metadata={"help": "longest teacher answer of a transfer prompt, in tokens"})
    samples: int = field(default=1, metadata={"help": "sampled teacher answers per prompt, beside the greedy one (self-verification)"})
    temperature: float = field(default=0.7, metadata={"help": "temperature of the sampled teacher answers"})
    agree: float = field(default=0.5, metadata={"help": "a prompt is kept when a sampled answer and the greedy one agree this much (token F1)"})
    entities: int = field(default=6, metadata={"help": "'explain X' prompts per passage (names, numbers and phrases it mentions)"})
    keep_passage: bool = field(default=True, metadata={"help": "also train on the passage text itself (with goldfish masking)"})
    goldfish: int = field(default=0, metadata={"help": "drop 1 in k tokens of raw text from the loss (passage in a self-edit's mix, dreams); 0 = off (on the tune split, 4 halved accuracy: README)"})
    epochs: int = field(default=0, metadata={"help": "passes over a transfer set; 0 = lora.epochs"})

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError("distill.top_k must be >= 1")
        if self.answer_tokens < 1:
            raise ValueError("distill.answer_tokens must be >= 1")
        if self.samples < 0:
            raise ValueError("distill.samples must be >= 0")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("distill.temperature must be > 0")
        if not 0 <= self.agree <= 1:
            raise ValueError("distill.agree must be between 0 and 1")
        if self.entities < 0 or self.epochs < 0:
            raise ValueError("distill.entities and distill.epochs must be >= 0")
        if self.goldfish < 0 or self.goldfish == 1:
            raise ValueError("distill.goldfish must be 0 (off) or >= 2")


@dataclass(frozen=True)
class Prompt:
    """One transfer prompt: the same request closed book (``student``) and with the
    passage in view (``teacher``); user messages, not yet chat-formatted."""

    kind: str  # question | about | explain
    student: str
    teacher: str
    written: str = ""  # the writer's own answer (a question's), when it wrote one


def open_book(request: str, title: str, text: str) -> str:
    """The teacher's side of a request: the passage first, then the same request."""
    return f"Read this passage about {title}:\n{text}\n\n{request}" if title else f"Read this passage:\n{text}\n\n{request}"


def entities(title: str, text: str, limit: int) -> list[str]:
    """Names, numbers and capitalised phrases of the passage, in order of first
    appearance, without the title itself or repeats (the "explain X" prompts)."""
    seen = {normalize(title)}
    out = []
    for sentence in sentences(text):
        for i, m in enumerate(ENTITY.finditer(sentence)):
            phrase = m.group(0).strip(" ,.")
            if i == 0 and m.start() == 0 and " " not in phrase and not phrase[0].isdigit():
                continue  # a capital at the start of a sentence is not a name
            key = normalize(phrase)
            if len(key) < 3 or key in seen or any(key in s or s in key for s in seen if s):
                continue
            seen.add(key)
            out.append(phrase)
            if len(out) >= limit:
                return out
    return out


def prompts(title: str, text: str, edit: str, cfg: DistillConfig, exclude: frozenset[str] = frozenset()) -> list[Prompt]:
    """The transfer prompts of one passage and one self-edit (the writer's Q/A list):
    its questions, then "what do you know about TITLE" and "explain X" prompts. A
    question in ``exclude`` (normalised: the reward questions) is not taught, so that a
    reward measured on it stays a held-out measurement."""
    out = [Prompt("question", answer_prompt(q, title=title), answer_prompt(q, title=title, context=text), a)
           for q, a in questions(edit) if normalize(q) not in exclude]
    topic = title or "this topic"
    for request in (r.format(topic=topic) for r in ABOUT):
        out.append(Prompt("about", request, open_book(request, title, text)))
    for x in entities(title, text, cfg.entities):
        request = f"Topic: {topic}\nWhat is {x}? Explain briefly." if title else f"What is {x}? Explain briefly."
        out.append(Prompt("explain", request, open_book(f"What is {x}? Explain briefly.", title, text)))
    return out


def questions(edit: str) -> list[tuple[str, str]]:
    """The writer's question/answer pairs, without repeats."""
    seen: set[str] = set()
    out = []
    for q, a in parse_qa(edit):
        if normalize(q) and normalize(q) not in seen:
            seen.add(normalize(q))
            out.append((q, a))
    return out
