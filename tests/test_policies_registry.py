"""The strategy registries: one Registry type, duplicates refused, unknown names named."""

from __future__ import annotations

import pytest

from policies import consolidation, questions, reward, schedule, selection, self_edit
from policies.config import PolicyConfig
from policies.registry import Registry
from policies.schedule import ScheduleConfig

REGISTRIES = {
    "self-edit policy": self_edit.SELF_EDIT_POLICIES,
    "question policy": questions.QUESTION_POLICIES,
    "reward": reward.REWARDS,
    "selection policy": selection.SELECTIONS,
    "consolidation policy": consolidation.CONSOLIDATIONS,
    "schedule policy": schedule.SCHEDULES,
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_is_a_registry_of_its_kind(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind
    names = list(registry)
    assert names and len(registry) == len(names) and all(n in registry for n in names)
    assert all(registry.get(n) is registry[n] for n in names)


def test_registries_hold_the_known_names_in_order():
    assert list(self_edit.SELF_EDIT_POLICIES) == ["passage", "passage_chat", "passage_cloze", "passage_recall", "implications", "rewrite",
                                                "self_qa", "qa_chat",
                                                "distill", "distill_onpolicy", "augmented"]
    assert list(questions.QUESTION_POLICIES) == ["given", "self"]
    assert list(reward.REWARDS) == ["answer_logprob", "qa_accuracy", "teacher_agreement"]
    assert list(selection.SELECTIONS) == ["best_of_n", "floor", "prefer_edit", "always"]
    assert list(consolidation.CONSOLIDATIONS) == ["replay", "dream", "merge"]
    assert list(schedule.SCHEDULES) == ["never", "interval", "commits", "idle", "cron"]


def test_a_duplicate_name_is_refused_and_the_first_stays():
    reg = Registry("test policy", {"a": 1})
    with pytest.raises(ValueError, match=r"^test policy 'a' is already registered$"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="already registered"):

        @reg.register("a")
        def again():  # pragma: no cover - never registered
            return 3

    assert reg["a"] == 1 and list(reg) == ["a"]
    with pytest.raises(ValueError, match="self-edit policy 'qa_chat' is already registered"):
        self_edit.register(self_edit.QAChat)


def test_the_decorator_registers_and_returns_the_object():
    reg: Registry = Registry("test policy")

    @reg.register("double")
    def double(x):
        return 2 * x

    assert reg.register("id", str) is str
    assert reg.get("double") is double and double(2) == 4 and list(reg) == ["double", "id"]


def test_an_unknown_name_is_one_line_naming_the_known_ones():
    reg = Registry("selection policy", {"best_of_n": min, "floor": max})
    with pytest.raises(ValueError) as e:
        reg.get("worst_of_n")
    assert str(e.value) == "unknown selection policy 'worst_of_n' (known: best_of_n, floor)"
    with pytest.raises(KeyError):  # indexing stays a plain mapping's
        reg["worst_of_n"]
    with pytest.raises(ValueError, match=r"^unknown self-edit policy 'poem' \(known: passage, "):
        self_edit.get("poem")
    with pytest.raises(ValueError, match=r"^unknown question policy 'oracle' \(known: given, self\)$"):
        questions.get("oracle")
    with pytest.raises(ValueError, match=r"^unknown consolidation policy 'nap' "):
        consolidation.get("nap")


def test_configs_name_the_field_and_the_known_policies():
    with pytest.raises(ValueError, match=r"^selection: unknown selection policy 'x' \(known: best_of_n, floor, prefer_edit, always\)$"):
        PolicyConfig(selection="x")
    with pytest.raises(ValueError, match=r"^reward: unknown reward 'x' \(known: answer_logprob, qa_accuracy, teacher_agreement\)$"):
        PolicyConfig(reward="x")
    with pytest.raises(ValueError, match=r"^unknown schedule policy 'nightly' \(known: never, interval, commits, idle, cron\)$"):
        ScheduleConfig(policy="nightly")
