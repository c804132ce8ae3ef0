"""Which strategy of each kind is active, by registered name, and their knobs.

Names are looked up in each module's registry (a ``policies.registry.Registry``):
``policies/self_edit.py`` (``SELF_EDIT_POLICIES``), ``policies/questions.py``
(``QUESTION_POLICIES``), ``policies/reward.py`` (``REWARDS``), ``policies/selection.py``
(``SELECTIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUGMENT = ("off", "also", "only")


@dataclass(frozen=True)
class PolicyConfig:
    self_edit: str = field(default="passage_chat", metadata={"help": "self-edit policy (default chosen on 30 tune passages, README): passage | passage_chat | passage_cloze | passage_recall | implications | rewrite | self_qa | qa_chat | distill | distill_onpolicy; several joined by + are sampled in turn (e.g. rewrite+distill)"})
    augment: str = field(default="off", metadata={"help": "off: each self-edit is a candidate (best-of-N) | also: plus one candidate training all N together | only: just that one"})
    questions: str = field(default="given", metadata={"help": "question policy: given (user's, else self-written) | self"})
    reward: str = field(default="answer_logprob", metadata={"help": "reward that selects: answer_logprob | qa_accuracy | teacher_agreement (label-free: self-written questions, see distill)"})
    selection: str = field(default="prefer_edit", metadata={"help": "selection policy: prefer_edit (the best self-edit unless passage-only beats it by edit_margin) | floor (passage-only unless a self-edit beats it by edit_margin) | best_of_n | always (the best trial, whatever its gain)"})
    min_gain: float = field(default=0.0, metadata={"help": "best_of_n: a committed update must beat the no-update baseline by more than this (floor commits passage-only whenever it trained)"})
    edit_margin: float = field(default=0.05, metadata={"help": "a self-edit must beat the passage-only trial by more than this to be preferred"})
    include_passage: bool = field(default=True, metadata={"help": "also train a passage-only trial and let it compete"})
    reward_fraction: float = field(default=0.4, metadata={"help": "share of a passage's questions used as reward (the rest are probes)"})
    self_questions: int = field(default=5, metadata={"help": "questions the model writes when it writes its own"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of self-edits (SEAL: 1.0, which makes a 135M model ramble)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling of self-edits (SEAL: 0.95)"})

    @property
    def self_edits(self) -> tuple[str, ...]:
        """The self-edit policies sampled in turn (``self_edit``, split on +)."""
        return tuple(n.strip() for n in self.self_edit.split("+") if n.strip()) or ("",)

    def sampled(self, n: int) -> list[str]:
        """The policy of each of ``n`` self-edits of a passage: the mix's policies that
        write one, in turn (one that writes nothing is one fixed candidate instead)."""
        from .self_edit import writes

        writers = [p for p in self.self_edits if writes(p)]
        return [writers[i % len(writers)] for i in range(n)] if writers else []

    def __post_init__(self) -> None:
        from . import questions, reward, selection, self_edit

        if self.augment not in AUGMENT:
            raise ValueError(f"augment: expected one of {', '.join(AUGMENT)}, got {self.augment!r}")
        for name, registry, kind in (
            *((n, self_edit.SELF_EDIT_POLICIES, "self_edit") for n in self.self_edits),
            (self.questions, questions.QUESTION_POLICIES, "questions"),
            (self.reward, reward.REWARDS, "reward"),
            (self.selection, selection.SELECTIONS, "selection"),
        ):
            try:
                registry.get(name)
            except ValueError as e:  # e.g. "selection: unknown selection policy 'x' (known: ...)"
                raise ValueError(f"{kind}: {e}") from None
        if not 0 < self.reward_fraction < 1:
            raise ValueError("reward_fraction must be between 0 and 1")
