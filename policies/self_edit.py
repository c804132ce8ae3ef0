"""Self-edit policies: what the model writes for itself to learn a passage, and how
that text becomes training examples.

A policy has a ``prompt`` (the user message the editor answers; ``None`` when the
policy generates nothing) and ``examples`` (the training examples of one candidate).
SEAL's recipe is kept for ``implications``, ``rewrite`` and ``self_qa``: the self-edit
is split into lines, each line prefixed with the title, plus the passage itself.

``qa_chat`` is seal's own: the model writes question/answer pairs with the passage in
front of it; pairs whose answer is not in the passage are dropped (a free grounding
check), and each kept pair is trained *in the format it will be asked in* (the
closed-book chat prompt -> the short answer), beside the passage itself. On a small
model, the form of the training text matters as much as its content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Protocol

from adapters.lora import Example

from .questions import answer_prompt, self_question_prompt
from .registry import Registry
from .reward import normalize

Chat = Callable[[str], str]  # user message -> formatted prompt for the assistant's reply

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)]|\(\d+\))\s*")
_QA = re.compile(
    r"(?:^|\n)\s*(?:\*\*)?(?:Q(?:uestion)?\s*\d*)\s*[:.)]\s*(?:\*\*)?\s*(.+?)\s*\n+\s*(?:\*\*)?(?:A(?:nswer)?\s*\d*)\s*[:.)]\s*(?:\*\*)?\s*(.+?)\s*(?=\n|$)",
    re.IGNORECASE,
)


def passage_text(title: str, text: str) -> str:
    return f"{title}\n{text}" if title else text


def split_lines(edit: str, min_words: int = 3) -> list[str]:
    """One training example per line/item: strip bullets and numbering, drop headers
    and fragments too short to state anything."""
    lines = []
    for raw in edit.splitlines():
        line = _BULLET.sub("", raw).strip().strip("*").strip()
        if len(line.split()) < min_words or line.endswith(":"):
            continue
        lines.append(line)
    return lines


def parse_qa(edit: str) -> list[tuple[str, str]]:
    """Question/answer pairs from text of the form 'Q: ... / A: ...' (or 'Question 1: ...')."""
    pairs = []
    for q, a in _QA.findall(edit):
        q, a = q.strip().strip("*").strip(), a.strip().strip("*").strip()
        if q and a:
            pairs.append((q, a))
    return pairs


class SelfEditPolicy(Protocol):
    name: str
    max_new_tokens: int  # 0: it writes nothing (``prompt`` is None): one fixed candidate, no sampling
    distills: str | None  # None: examples() is the whole candidate; "teacher"/"student": distilled (agent.teacher)

    def prompt(self, title: str, text: str) -> str | None: ...

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]: ...


class PassageOnly:
    """No self-edit: train on the passage alone (the baseline every edit must beat)."""

    name = "passage"
    max_new_tokens = 0
    distills = None

    def prompt(self, title: str, text: str) -> str | None:
        return None

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        return [Example(prompt="", completion=passage_text(title, text))]


ABOUT = ("What do you know about {topic}?", "Tell me the main facts about {topic}.")  # requests about a passage's topic


class PassageChat(PassageOnly):
    """No self-edit either: the passage, and the passage again as the chat answer to
    "what do you know about TITLE" and "tell me the main facts about TITLE". The same
    facts in the form a closed-book question is asked in (a chat turn about the topic),
    which a plain passage LoRA does not teach: after it, a 135M model asked about the
    topic recites the passage from its start instead of drifting into its own prose."""

    name = "passage_chat"

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        topic = title or "this topic"
        return [*super().examples(title, text, edit, chat),
                *(Example(prompt=chat(r.format(topic=topic)), completion=text) for r in ABOUT)]


# names, numbers and capitalised phrases (the spans a factual question asks for)
ENTITY = re.compile(r"\b(?:[A-Z][\w'\-]*(?:\s+(?:of|the|de|von|and|for|in)?\s*[A-Z][\w'\-]*)*|\d[\d,.]*%?)")
_YEAR = re.compile(r"^(?:1[0-9]|20)\d\d$")


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


_OPENERS = {"a", "an", "the", "with", "in", "on", "at", "by", "for", "from", "after", "before", "during", "since",
            "as", "when", "while", "although", "though", "unlike", "like", "under", "between", "of", "to", "its", "his", "her", "their"}


def spans(sentence: str) -> list[tuple[int, str]]:
    """The answerable spans of a sentence: its names and numbers, not the capital
    that merely starts it."""
    out = []
    for m in ENTITY.finditer(sentence):
        start, phrase = m.start(), m.group(0).rstrip(" ,.'")
        if start == 0 and not phrase[0].isdigit():  # drop the sentence's first word
            first, _, rest = phrase.partition(" ")
            if not rest or first.lower() not in _OPENERS:
                continue
            start, phrase = len(first) + 1, rest
        if len(normalize(phrase)) >= 2:
            out.append((start, phrase))
    return out


def cloze(title: str, text: str, limit: int) -> list[tuple[str, str, str]]:
    """Questions the passage answers, made by rule, not written by the model: each
    sentence with one of its names or numbers turned into "what" (an echo question,
    "The institute grew new varieties in what year?"), with that span and its
    sentence: (question, span, sentence). Taken round-robin over the sentences, so
    every sentence gets asked about before any gets a second question; the title is
    not asked for."""
    per_sentence = []
    for sent in sentences(text):
        items = []
        for start, phrase in spans(sent):
            if normalize(phrase) == normalize(title):
                continue
            wh = "what year" if _YEAR.match(phrase) else "what"
            q = (sent[:start] + wh + sent[start + len(phrase):]).strip().rstrip(".!;:, ")
            items.append((q[0].upper() + q[1:] + "?", phrase, sent))
        per_sentence.append(items)
    out, seen = [], set()
    for rank in range(max((len(x) for x in per_sentence), default=0)):
        for items in per_sentence:
            if rank < len(items) and len(out) < limit and normalize(items[rank][0]) not in seen:
                seen.add(normalize(items[rank][0]))
                out.append(items[rank])
    return out


class PassageCloze(PassageChat):
    """No self-edit: passage_chat's examples, and questions made from the passage by
    rule (``cloze``), each trained as the closed-book chat turn it will be asked in,
    answered in a few words. Diverse restatements that cost no generation: every
    sentence becomes a question whose answer is one of its names or numbers, so the
    facts are learned in the direction they are asked (Physics of LMs 3.1, Active
    Reading), not only recited from the passage's start."""

    name = "passage_cloze"
    questions = 10
    answer = 1  # which part of a cloze item answers: 1, its span; 2, its whole sentence

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        asked = [Example(prompt=chat(answer_prompt(item[0], title=title)), completion=item[self.answer], eos=True)
                 for item in cloze(title, text, self.questions)]
        return [*super().examples(title, text, edit, chat), *asked]


class PassageRecall(PassageCloze):
    """passage_cloze's questions, each answered by the whole sentence it was made
    from: cued recall of the right sentence (a 32-token answer recited from the
    passage's start misses facts told late in it), rather than a bare span."""

    name = "passage_recall"
    answer = 2


class _LinesPolicy:
    """SEAL's recipe: each line of the self-edit (prefixed with the title) is one
    example, plus the passage itself."""

    name = ""
    instruction = ""
    max_new_tokens = 256
    distills = None

    def prompt(self, title: str, text: str) -> str | None:
        return f"{passage_text(title, text)}\n\n{self.instruction}"

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        items = [Example(prompt="", completion=passage_text(title, line)) for line in split_lines(edit)]
        return [Example(prompt="", completion=passage_text(title, text)), *items]


class Implications(_LinesPolicy):
    name = "implications"
    instruction = (
        "Read the passage above and produce a list of implications derived directly or "
        "indirectly from its content. Write one implication per line."
    )


class Rewrite(_LinesPolicy):
    name = "rewrite"
    instruction = "Rewrite the passage above in a few different ways. Write each rewrite as one line."


class SelfQA(_LinesPolicy):
    name = "self_qa"
    instruction = (
        "Rewrite the passage above in a question-answer format. Write each question on a "
        "line starting with 'Q:' and its answer on the next line starting with 'A:'."
    )

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        pairs = parse_qa(edit)
        if not pairs:  # fall back to SEAL's line split
            return super().examples(title, text, edit, chat)
        items = [Example(prompt="", completion=passage_text(title, f"Q: {q}\nA: {a}")) for q, a in pairs]
        return [Example(prompt="", completion=passage_text(title, text)), *items]


class QAChat(SelfQA):
    """Self-written Q/A pairs, grounded in the passage, trained as closed-book chat turns."""

    name = "qa_chat"
    instruction = (
        "Write questions about the facts in the passage above, each with a short answer "
        "(a name, number, date or short phrase) copied from the passage. Write each "
        "question on a line starting with 'Q:' and its answer on the next line starting with 'A:'."
    )

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        body = f" {normalize(text)} "
        seen: set[str] = set()
        items = []
        for q, a in parse_qa(edit):
            na = normalize(a)
            if not na or f" {na} " not in body or normalize(q) in seen:
                continue  # ungrounded (a hallucinated answer) or a repeat
            seen.add(normalize(q))
            items.append(Example(prompt=chat(answer_prompt(q, title=title)), completion=a, eos=True))
        return [Example(prompt="", completion=passage_text(title, text)), *items]


class Distill:
    """Learning by reading: the writer writes questions about the passage (its
    self-edit), and the trial distils the open-book teacher's answers to them, and to
    "what do you know about TITLE" and "explain X" prompts, into the closed-book
    student (``policies.transfer``, ``agent.teacher``). ``examples`` here is only the
    passage: the transfer set needs the model, so the agent builds it."""

    name = "distill"
    distills = "teacher"  # off-policy: the teacher answers, the student learns its answers
    max_new_tokens = 256
    questions = 8

    def prompt(self, title: str, text: str) -> str | None:
        return self_question_prompt(title, text, self.questions)

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        return [Example(prompt="", completion=passage_text(title, text))]


class DistillOnPolicy(Distill):
    """SDFT's on-policy variant: the student answers the same prompts closed book and
    the open-book teacher scores its answers (top-k KL on the student's own tokens)."""

    name = "distill_onpolicy"
    distills = "student"


AUGMENTED = "augmented"


class Augmented:
    """Several self-edits of one passage trained together (diverse restatements of the
    same facts, rather than the one that won): ``edit`` is a JSON list of [policy, text]
    pairs (``pack``). The agent builds the examples part by part (``agent.trial``), the
    passage once; a distilling part brings its transfer set."""

    name = AUGMENTED
    max_new_tokens = 0
    distills = None

    def prompt(self, title: str, text: str) -> str | None:
        return None  # it writes nothing itself: its parts were written by their policies

    def examples(self, title: str, text: str, edit: str, chat: Chat) -> list[Example]:
        # only the passage: the agent expands the parts (agent.trial.examples_of), which
        # may need the teacher
        return [Example(prompt="", completion=passage_text(title, text))]


def asks_by_rule(name: str) -> bool:
    """True for a policy that trains on the rule-made questions (``cloze``): they are
    not held out from its trials."""
    return isinstance(SELF_EDIT_POLICIES.get(name), type) and issubclass(SELF_EDIT_POLICIES.get(name), PassageCloze)


def pack(edits: list[tuple[str, str]]) -> str:
    return json.dumps([[policy, text] for policy, text in edits], ensure_ascii=False)


def parts(edit: str) -> list[tuple[str, str]]:
    """The (policy, text) parts of an augmented candidate's edit."""
    return [(policy, text) for policy, text in json.loads(edit or "[]") if policy != AUGMENTED]


def adds_nothing(examples: list[Example], title: str, text: str) -> bool:
    """True when a self-edit's examples are just the passage-only update's: training
    on them would repeat the passage-only trial."""
    return examples == PassageOnly().examples(title, text, "", lambda m: m)


SELF_EDIT_POLICIES: Registry[type] = Registry("self-edit policy")


def register(cls: type) -> type:
    """Register a policy class under its ``name``; a duplicate name is refused."""
    return SELF_EDIT_POLICIES.register(cls.name, cls)


for _cls in (PassageOnly, PassageChat, PassageCloze, PassageRecall, Implications, Rewrite, SelfQA, QAChat, Distill, DistillOnPolicy, Augmented):
    register(_cls)


def get(name: str) -> SelfEditPolicy:
    return SELF_EDIT_POLICIES.get(name)()


def writes(name: str) -> bool:
    """Whether a policy writes a self-edit (sampled), or is one fixed set of examples."""
    return get(name).max_new_tokens > 0


def fixed(name: str) -> bool:
    """A policy that writes nothing and is a candidate of its own (``passage_chat``):
    not the passage-only reference, not the augmented mix of other edits."""
    return not writes(name) and name not in (PassageOnly.name, AUGMENTED)
