"""Distillation: top-k KL with a tail bucket, teacher targets, goldfish masking
(adapters/lora.py), transfer prompts (policies/transfer.py) and the teacher
(agent/teacher.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from adapters import lora
from adapters.lora import Example, Teacher
from agent import teacher
from agent.runtime import Generation
from agent.wake import learn
from policies import transfer
from policies.config import PolicyConfig
from policies.transfer import DistillConfig
from tests.helpers import FAST_LORA, INVENTED, VARN, document, make_learner, tiny_llama

CFG = dataclasses.replace(FAST_LORA, epochs=6, batch_size=4, seed=0)
TEXT = ("The lighthouse of Quellport was built in 1843 by the engineer Ada Tennock. "
        "Its lamp burned whale oil until 1901, when it was fitted with an electric arc.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tokenizer):
    return lora.attach(tiny_llama(tokenizer), CFG, names=("knowledge", "trial"))


# ------------------------------------------------------------------ the loss
def test_topk_kl_is_the_full_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    s = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    full = (t.exp() * (t - s)).sum(-1)
    assert torch.allclose(lora.topk_kl(t, s), full, atol=1e-5)
    # top-k of the teacher plus a tail: a lower bound of the full KL, 0 for equal inputs
    top_t, idx = t.topk(4, dim=-1)
    part = lora.topk_kl(top_t, s.gather(-1, idx))
    assert bool((part <= full + 1e-6).all()) and bool((part >= 0).all())
    assert torch.allclose(lora.topk_kl(top_t, top_t), torch.zeros(5), atol=1e-6)


def test_topk_kl_equals_trls_sdft_helpers():
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    g = torch.Generator().manual_seed(1)
    t = torch.log_softmax(torch.randn(7, 50, generator=g), -1).topk(8, dim=-1)
    s = torch.log_softmax(torch.randn(7, 50, generator=g), -1).gather(-1, t.indices)
    theirs = loss_utils.compute_divergence(loss_utils.add_tail_bucket(s), loss_utils.add_tail_bucket(t.values), 0.0)
    assert torch.allclose(lora.topk_kl(t.values, s), theirs, atol=1e-5)


def _teacher_for(model, tokenizer, prompt: str, completion: str, k: int = 8) -> Teacher:
    """The (frozen) model's own top-k over a completion given another prompt."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = lora.completion_ids(tokenizer, Example(prompt, completion, eos=True))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float(), -1)
    top = logp.topk(k, dim=-1)
    return Teacher(top.indices, top.values)


def test_a_distilled_example_is_trained_on_the_teachers_kl(model, tokenizer):
    """The loss of a distilled example is the KL to the teacher at its completion
    tokens (here the teacher is the model itself on the same prompt: KL ~ 0); training
    towards another prompt's distribution lowers it."""
    prompt, completion = "Who built the lighthouse?", " Ada Tennock"
    same = Example(prompt, completion, eos=True, teacher=_teacher_for(model, tokenizer, prompt, completion, k=tokenizer.vocab_size))
    assert lora.example_losses(model, tokenizer, [same], CFG)[0] == pytest.approx(0.0, abs=1e-4)
    # a peaked teacher (90% on each completion token, the rest spread): far from the
    # random model; training on its KL moves the student towards it
    c = lora.completion_ids(tokenizer, Example(prompt, completion, eos=True))
    peaked = Teacher(torch.tensor(c)[:, None], torch.log(torch.full((len(c), 1), 0.9)))
    ex = Example(prompt, completion, eos=True, teacher=peaked)
    before = lora.example_losses(model, tokenizer, [ex], CFG)[0]
    result = lora.train(model, tokenizer, [ex, Example("", TEXT, goldfish=4)],
                        dataclasses.replace(CFG, epochs=10, lr=3e-2))
    model.set_adapter("knowledge")
    after = lora.example_losses(model, tokenizer, [ex], CFG)[0]
    # (a random tiny model is near-uniform over 49k tokens: the drop is small but real)
    assert not result.nan and before > 5 and after < before - 0.05


def test_teacher_targets_must_cover_the_completion(model, tokenizer):
    t = Teacher(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4)))
    with pytest.raises(ValueError, match="teacher targets cover 1 tokens"):
        lora.train(model, tokenizer, [Example("Q?", " Ada Tennock", eos=True, teacher=t)], CFG)


def test_teacher_rows_line_up_with_the_completion_in_a_mixed_batch(model, tokenizer):
    """Plain and distilled examples in one padded batch: each distilled position gets
    the teacher row of its own completion token."""
    prompt, completion = "Who built it?", " Ada Tennock"
    c = lora.completion_ids(tokenizer, Example(prompt, completion, eos=True))
    ids = torch.tensor(c)[:, None].repeat(1, 3)  # row j's top token is the j-th completion token
    t = Teacher(ids, torch.log(torch.full((len(c), 3), 0.3)))
    seqs = lora._encode(tokenizer, [Example("", TEXT), Example(prompt, completion, eos=True, teacher=t)], 512)
    batch = lora._collate(seqs, tokenizer.pad_token_id, "cpu")
    sel = batch.targets != lora.IGNORE
    targets = batch.targets[sel]
    assert int(batch.t_mask.sum()) == len(c)
    assert batch.t_ids[:, 0].tolist() == targets[batch.t_mask].tolist() == c


# ------------------------------------------------------------------ goldfish
def test_goldfish_drops_about_one_in_k_the_same_tokens_every_time(tokenizer):
    ids = list(range(1000, 1400))
    keep = lora.goldfish_keep(ids, 1, 4)
    assert keep == lora.goldfish_keep(ids, 1, 4)  # deterministic: the same tokens every epoch
    dropped = keep.count(False) / len(keep)
    assert 0.15 < dropped < 0.35
    assert all(lora.goldfish_keep(ids, 1, 0))
    seqs = lora._encode(tokenizer, [Example("", TEXT, goldfish=4)], 512)
    batch = lora._collate(seqs, tokenizer.pad_token_id, "cpu")
    plain = lora._collate(lora._encode(tokenizer, [Example("", TEXT)], 512), tokenizer.pad_token_id, "cpu")
    n, m = int((batch.targets != lora.IGNORE).sum()), int((plain.targets != lora.IGNORE).sum())
    assert 0 < n < m


# ------------------------------------------------------------------ transfer prompts
def test_transfer_prompts_hold_questions_topics_and_entities():
    edit = "Q: Who built the lighthouse?\nA: Ada Tennock\nQ: When was it built?\nA: 1843\nQ: What did the lamp burn?\nA: whale oil"
    cfg = DistillConfig(entities=3)
    got = transfer.prompts("Quellport", TEXT, edit, cfg, exclude=frozenset({"what did lamp burn"}))
    kinds = [p.kind for p in got]
    assert kinds.count("question") == 2 and kinds.count("about") == 2 and kinds.count("explain") == 3
    assert all(TEXT in p.teacher and TEXT not in p.student for p in got)
    assert not any("lamp burn" in p.student for p in got)  # a reward question is never taught
    assert transfer.entities("Quellport", TEXT, 10)[:3] == ["1843", "Ada Tennock", "1901"]


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"goldfish": 1}, {"agree": 2.0}, {"temperature": 0.0}])
def test_distill_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="distill\\."):
        DistillConfig(**bad)


def test_kl_of_disjoint_supports_is_finite():
    t = torch.log(torch.tensor([[0.5, 0.5]]))
    s = torch.tensor([[-math.inf, -math.inf]])
    assert math.isfinite(float(lora.topk_kl(t, s.clamp(min=-80))))


# ------------------------------------------------------------------ the teacher, in the wake cycle and in sleep
DISTILL_POLICY = PolicyConfig(self_edit="distill", selection="prefer_edit", edit_margin=1e9)  # commit the edit
FAST_DISTILL = DistillConfig(samples=0, entities=2, answer_tokens=6, epochs=1)


def scripted(learner, sampled_differs: bool = False) -> list[list[str]]:
    """Replace generation by answers that name the prompt's position (a random tiny model
    greedily repeats a newline, which is no answer): greedy answers are 'Kelmora town N',
    sampled ones the same or, with ``sampled_differs``, something else. Returns the
    prompts seen, per call."""
    seen: list[list[str]] = []

    def generate(prompts, temperature=0.0, **kw):
        seen.append(prompts)
        hot = temperature > 0 and sampled_differs
        return [Generation(f"lighthouse keeper {i}" if hot else f"Kelmora town {i}", 4) for i in range(len(prompts))]

    learner.runtime.generate = generate
    return seen


def test_the_teacher_answers_open_book_and_its_targets_match_the_answers(tokenizer, home):
    learner = make_learner(tokenizer, home)
    passage = {"id": 1, "title": VARN[0], "text": VARN[1]}
    edit = "Q: What is the capital?\nA: Kelmora\nQ: Who founded it?\nA: Hedda Lune\nQ: When?\nA: 1702"
    seen = scripted(learner)
    items = teacher.answer(learner, passage, edit, DistillConfig(samples=1, entities=2), seed=0)
    assert len(seen) == 2 and all(VARN[1] in p for prompts in seen for p in prompts)  # greedy + sampled, reading
    assert [a.kind for a in items] == ["question"] * 3 + ["about"] * 2 + ["explain"] * 2
    assert {a.how for a in items} == {"greedy"}  # the sample agreed with it word for word: one example
    assert all(VARN[1] not in a.student and VARN[1] in a.teacher for a in items)
    examples = teacher.targets(learner, items, k=5)
    for a, e in zip(items, examples, strict=True):
        assert e.completion == a.answer and e.eos and VARN[1] not in e.prompt
        n = len(lora.completion_ids(tokenizer, e))
        assert e.teacher.ids.shape == e.teacher.logp.shape == (n, 5)
        assert bool((e.teacher.logp <= 0).all())
    # the targets are the open-book model's own distribution over the answer tokens
    rt = learner.runtime
    first = examples[0]
    ids = tokenizer(rt.chat(items[0].teacher), add_special_tokens=False)["input_ids"]
    c = lora.completion_ids(tokenizer, first)
    with torch.no_grad():
        logp = torch.log_softmax(learner.model(input_ids=torch.tensor([ids + c])).logits[0, len(ids) - 1 : -1], -1)
    assert torch.allclose(first.teacher.logp, logp.topk(5, dim=-1).values, atol=1e-4)
    # an answer cut at the token limit is taught without EOS (the student must not learn to stop mid-sentence)
    cut = teacher.answer(learner, passage, edit, DistillConfig(samples=0, answer_tokens=4), seed=0)
    assert cut and not any(a.ended for a in cut) and not any(e.eos for e in teacher.targets(learner, cut, k=5))
    # on-policy: the student (closed book) answers, the teacher only scores
    seen.clear()
    mine = teacher.answer(learner, passage, edit, FAST_DISTILL, seed=0, onpolicy=True)
    assert mine and all(a.how == "student" for a in mine)
    assert seen and not any(VARN[1] in p for prompts in seen for p in prompts)


def test_a_teacher_that_disagrees_with_itself_teaches_nothing(tokenizer, home):
    learner = make_learner(tokenizer, home)
    passage = {"id": 1, "title": VARN[0], "text": VARN[1]}
    scripted(learner, sampled_differs=True)
    assert teacher.answer(learner, passage, "Q: What is the capital?\nA: Kelmora", DistillConfig(samples=1), seed=0) == []


def test_a_distillation_cycle_stores_its_transfer_set_and_sleep_re_distils_it(tokenizer, home):
    learner = make_learner(tokenizer, home, policies=DISTILL_POLICY)
    learner.distill = FAST_DISTILL
    scripted(learner)
    store = learner.store
    store.ingest([document(*VARN)])
    pid = store.passages()[0]["id"]
    (report,) = learn(learner)
    assert report.outcome == "committed"
    chosen = [c for c in store.candidates(pid) if c["chosen"]]
    assert [c["policy"] for c in chosen] == ["distill"]
    stored = json.loads(chosen[0]["transfer"])
    assert stored and {"about", "explain"} <= {a["kind"] for a in stored}
    assert chosen[0]["n_examples"] == len(stored) + 1  # the transfer set and the passage (goldfish)

    # sleep rebuilds the transfer set from the store, with fresh teacher targets
    from agent.sleep import committed_examples

    examples = committed_examples(learner, pid)
    assert [e.completion for e in examples[1:]] == [a["answer"] for a in stored]
    assert examples[0].goldfish == FAST_DISTILL.goldfish and examples[0].teacher is None
    assert all(e.teacher is not None for e in examples[1:])


# ------------------------------------------------------------------ the real model
@pytest.mark.real_model
def test_real_model_a_distillation_trial_learns_by_reading(real_runtime, tmp_path):
    """The default model distils what it reads: after one distillation trial on an
    invented passage, it agrees more with its open-book self on questions it wrote but
    never trained on, and the answer to a question about the passage becomes far more likely."""
    from adapters.names import KNOWLEDGE, TRIAL
    from adapters.registry import AdapterRegistry
    from agent.learner import Learner
    from agent.trial import Candidate, try_candidate
    from agent.wake import WakeConfig
    from policies import reward as rewards
    from store import Store

    store = Store(tmp_path / "store.db")
    base_model = real_runtime.model
    # half the default epochs at twice the rate: the same distance travelled in half the time
    learner = Learner(real_runtime, store, AdapterRegistry(tmp_path / "adapters", store),
                      lora.LoraConfig(epochs=5, lr=2e-3),
                      PolicyConfig(self_edit="distill", reward="teacher_agreement"), WakeConfig())
    try:
        title, text = INVENTED
        passage = {"id": 1, "title": title, "text": text}
        own = [{"id": j, "question": q.question, "answer": q.answer} for j, q in enumerate(learner.write_questions(passage))]
        assert own, "the model wrote no verified question of its own"
        (edit,) = learner.sample_self_edits(passage, ["distill"], seed=0)
        teacher_scores = learner.score(KNOWLEDGE, title, own, context=text)
        before = learner.score(KNOWLEDGE, title, own)
        o = try_candidate(learner, passage, Candidate(*edit), 0, own, before, teacher_scores=teacher_scores)
        assert o.ok and len(o.transfer) >= 3
        agreement_before = rewards.teacher_agreement(before, teacher_scores)
        print(f"teacher agreement {agreement_before:+.3f} -> {o.reward:+.3f}; transfer set {len(o.transfer)}; "
              f"train {o.result.seconds:.1f}s")
        assert o.reward > agreement_before + 0.2
        probe = [{"id": 99, "question": "What is the name of the town on the Isle of Brenmoor?", "answer": "Quorrin"}]
        known = learner.score(KNOWLEDGE, title, probe)
        assert known.accuracy == 0.0  # it did not know
        after = learner.score(TRIAL, title, probe)
        print("closed-book answer:", after.answers, f"log p(Quorrin) per token {known.logprob:.2f} -> {after.logprob:.2f}")
        # the fact is learned: the answer is far more likely closed book (e^1 per token: 2.7x). Naming it in a
        # greedy answer is not asserted: it does not (the answer is the passage's first sentence); the
        # default policy's real-model test below does assert that
        assert after.logprob > known.logprob + 1.0
    finally:
        store.close()
        learner.model.unload()  # the session's model is shared: take the LoRA layers out again
        real_runtime.model = base_model


# ------------------------------------------------------------------ augmentation, the mix, the default row
def test_an_augmented_candidate_trains_every_self_edit_with_the_passage_once(tokenizer, home):
    from agent.trial import Candidate, candidates_of, examples_of
    from policies import self_edit as self_edits

    learner = make_learner(tokenizer, home)
    learner.distill = DistillConfig(goldfish=0)
    passage = {"id": 1, "title": VARN[0], "text": VARN[1]}
    edits = [Candidate("rewrite", "Varn is an island in the Grey Sea.\nKelmora is the capital of Varn."),
             Candidate("implications", "Hedda Lune founded Varn in 1702.")]
    pol = PolicyConfig(self_edit="rewrite+implications", augment="also")
    assert pol.sampled(3) == ["rewrite", "implications", "rewrite"]
    cands = candidates_of(pol, edits)
    assert [c.policy for c in cands] == ["passage", "rewrite", "implications", "augmented"]
    assert [c.policy for c in candidates_of(dataclasses.replace(pol, augment="only"), edits)] == ["passage", "augmented"]
    assert [c.policy for c in candidates_of(dataclasses.replace(pol, augment="off"), edits)] == ["passage", "rewrite", "implications"]
    examples, items = examples_of(learner, passage, cands[-1])
    completions = [e.completion for e in examples]
    assert completions.count(f"{VARN[0]}\n{VARN[1]}") == 1 and len(completions) == 4 and items == ()
    assert self_edits.parts(cands[-1].text) == [(e.policy, e.text) for e in edits]
    # with goldfish on, the passage inside a self-edit's mix is masked; passage-only stays plain
    learner.distill = DistillConfig(goldfish=4)
    (fish, *_), _ = examples_of(learner, passage, cands[-1])
    (plain,), _ = examples_of(learner, passage, cands[0])
    assert fish.goldfish == 4 and plain.goldfish == 0


def test_a_bad_mix_or_augment_value_is_refused():
    with pytest.raises(ValueError, match="self_edit: unknown self-edit policy 'nope'"):
        PolicyConfig(self_edit="rewrite+nope")
    with pytest.raises(ValueError, match="augment: expected one of off, also, only"):
        PolicyConfig(augment="sometimes")


def test_spearman_and_the_margins_of_the_default_row():
    from agent.bench.squad import margins, reward_correlations, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None
    records = [{"conditions": {"default": {"correct": [1, 1, 0]}, "passage": {"correct": [0, 1, 0]},
                               "open-book": {"correct": [1, 1, 1]}},
                "reward_study": [{"probe_acc": 0.0, "answer_logprob": -1.0, "teacher_agreement": 0.1},
                                 {"probe_acc": 1.0, "answer_logprob": -2.0, "teacher_agreement": 0.5},
                                 {"probe_acc": 0.5, "answer_logprob": 0.0, "teacher_agreement": 0.2}]}]
    m = margins(records)
    assert m["default - passage"]["points"] == pytest.approx(100 / 3) and m["default - passage"]["questions"] == 3
    assert m["default - open-book"]["points"] == pytest.approx(-100 / 3)
    r = reward_correlations(records)
    assert r["teacher_agreement"]["spearman"] == pytest.approx(1.0) and r["teacher_agreement"]["trials"] == 3
    assert r["answer_logprob"]["spearman"] == pytest.approx(-0.5)
    # selection within the passage: teacher_agreement's top trial is the best one, answer_logprob's is not
    assert (r["teacher_agreement"]["picked_best"], r["teacher_agreement"]["passages_decided"]) == (1, 1)
    assert (r["answer_logprob"]["picked_best"], r["answer_logprob"]["tied"]) == (0, 0)


def test_a_winning_augmented_candidate_teaches_the_writer_each_of_its_self_edits(tokenizer, home):
    from agent.editor import sft_examples
    from policies import self_edit as self_edits

    learner = make_learner(tokenizer, home)
    text = self_edits.pack([("rewrite", "Varn lies in the Grey Sea."), ("distill", "Q: Capital?\nA: Kelmora")])
    pair = {"candidate_id": 1, "title": VARN[0], "passage_text": VARN[1], "policy": "augmented", "text": text}
    rows = sft_examples(learner, [pair])
    assert [(p["policy"], r["completion"]) for p, r in rows] == [
        ("rewrite", "Varn lies in the Grey Sea."), ("distill", "Q: Capital?\nA: Kelmora")]
    assert rows[0][1]["prompt"] == learner.runtime.chat(self_edits.get("rewrite").prompt(VARN[0], VARN[1]))


# ------------------------------------------------------------------ passage_chat: the passage in the form it is asked
def test_passage_chat_trains_the_passage_plain_and_as_the_answer_about_its_topic():
    from policies import self_edit as self_edits

    pol = self_edits.get("passage_chat")
    title, text = VARN[:2]
    chat = lambda m: f"<user>{m}</user>"  # noqa: E731
    plain, *turns = pol.examples(title, text, "", chat)
    assert pol.prompt(title, text) is None and not self_edits.writes("passage_chat") and self_edits.writes("rewrite")
    assert plain == Example("", f"{title}\n{text}")
    assert [t.prompt for t in turns] == [chat(f"What do you know about {title}?"), chat(f"Tell me the main facts about {title}.")]
    assert all(t.completion == text for t in turns)
    assert not self_edits.adds_nothing([plain, *turns], title, text)


# ------------------------------------------------------------------ passage_cloze: questions made by rule
def test_cloze_turns_each_name_or_number_of_a_sentence_into_a_question_round_robin():
    from policies.self_edit import cloze

    got = cloze("Quellport", TEXT, 10)
    first, second = TEXT.split(". ")
    assert got[:2] == [("The lighthouse of Quellport was built in what year by the engineer Ada Tennock?", "1843",
                        first + "."),
                       ("Its lamp burned whale oil until what year, when it was fitted with an electric arc?", "1901",
                        second)]
    assert ("The lighthouse of Quellport was built in 1843 by the engineer what?", "Ada Tennock", first + ".") in got
    assert all(a != "Quellport" for _, a, _ in got)  # the title is the topic, never the answer
    assert all(a in s and s in TEXT and q.endswith("?") and a not in q for q, a, s in got)
    assert len(cloze("Quellport", TEXT, 2)) == 2 and cloze("Quellport", "no names here at all.", 5) == []
    # a sentence's first word is not a name, but a name after an opening word is
    assert cloze("", "With Rivera at linebacker, they won.", 5) == [
        ("With what at linebacker, they won?", "Rivera", "With Rivera at linebacker, they won.")]


def test_passage_cloze_is_passage_chat_plus_short_answers_in_the_asked_form():
    from policies import self_edit as self_edits
    from policies.questions import answer_prompt

    chat = lambda m: f"<user>{m}</user>"  # noqa: E731
    pol = self_edits.get("passage_cloze")
    got = pol.examples("Quellport", TEXT, "", chat)
    assert not self_edits.writes("passage_cloze") and self_edits.fixed("passage_cloze")
    assert got[:3] == self_edits.get("passage_chat").examples("Quellport", TEXT, "", chat)
    asked = got[3:]
    assert asked and all(e.eos for e in asked)
    first = "The lighthouse of Quellport was built in what year by the engineer Ada Tennock?"
    assert asked[0] == Example(chat(answer_prompt(first, title="Quellport")), "1843", eos=True)
    # passage_recall: the same questions, each answered by its whole sentence
    recall = self_edits.get("passage_recall").examples("Quellport", TEXT, "", chat)
    assert [e.prompt for e in recall] == [e.prompt for e in got]
    assert recall[3].completion == TEXT.split(". ")[0] + "." and all(e.eos for e in recall[3:])


def test_a_policy_that_writes_nothing_is_one_fixed_candidate_and_is_not_sampled():
    from agent.trial import Candidate, candidates_of

    only = PolicyConfig(self_edit="passage_chat")
    assert only.sampled(3) == []
    assert [c.policy for c in candidates_of(only, [])] == ["passage", "passage_chat"]
    mix = PolicyConfig(self_edit="passage_chat+rewrite", augment="also")
    assert mix.sampled(3) == ["rewrite"] * 3
    cands = candidates_of(mix, [Candidate("rewrite", "Varn is an island."), Candidate("rewrite", "Kelmora is its capital.")])
    assert [c.policy for c in cands] == ["passage", "passage_chat", "rewrite", "rewrite", "augmented"]
    from policies import self_edit as self_edits
    assert [p for p, _ in self_edits.parts(cands[-1].text)] == ["passage_chat", "rewrite", "rewrite"]


def test_a_wake_cycle_with_passage_chat_trains_and_records_it(tokenizer, home):
    learner = make_learner(tokenizer, home, PolicyConfig(self_edit="passage_chat", selection="prefer_edit", min_gain=-1e9))
    learner.store.ingest([document(*VARN)])
    (report,) = learn(learner)
    cands = learner.store.candidates(learner.store.passages()[0]["id"])
    assert [c["policy"] for c in cands] == ["passage", "passage_chat"]
    assert all(c["note"] is None and c["n_examples"] for c in cands)  # both trained: neither repeats the other
    assert [c["n_examples"] for c in cands] == [1, 3]
    assert report.outcome == "committed"


@pytest.mark.real_model
@pytest.mark.parametrize("policy", ["passage_cloze"])
def test_real_model_rule_made_questions_answer_an_invented_fact(real_runtime, tmp_path, policy):
    """passage_chat plus rule-made questions, on the default model: after one trial on
    an invented passage, the closed-book answer names the fact it did not know, and the
    fact is far more likely than before. (The default, passage_chat, learns the same
    fact in a whole wake cycle in tests/test_api.py's real-model test; passage_recall
    differs from passage_cloze only in which part of a rule-made item answers, and it
    passed here too, 79 s, before make test's 15 minutes needed the time back.)"""
    from adapters.names import KNOWLEDGE, TRIAL
    from adapters.registry import AdapterRegistry
    from agent.learner import Learner
    from agent.trial import Candidate, try_candidate
    from agent.wake import WakeConfig
    from policies.self_edit import cloze
    from store import Store

    store = Store(tmp_path / "store.db")
    base_model = real_runtime.model
    # half the default epochs at twice the rate: the same distance travelled in half the time
    learner = Learner(real_runtime, store, AdapterRegistry(tmp_path / "adapters", store),
                      lora.LoraConfig(epochs=5, lr=2e-3), PolicyConfig(), WakeConfig())
    try:
        title, text = INVENTED
        passage = {"id": 1, "title": title, "text": text}
        probe = [{"id": 1, "question": "What is the name of the only town on the Isle of Brenmoor?", "answer": "Quorrin"}]
        known = learner.score(KNOWLEDGE, title, probe)
        assert known.accuracy == 0.0  # it did not know
        o = try_candidate(learner, passage, Candidate(policy), 0, probe, known)
        assert o.ok and o.n_examples == 3 + len(cloze(title, text, 10))
        after = learner.score(TRIAL, title, probe)
        print("closed-book answer:", after.answers, f"log p(Quorrin) per token {known.logprob:.2f} -> {after.logprob:.2f}")
        assert after.accuracy == 1.0
        assert after.logprob > known.logprob + 1.0
    finally:
        store.close()
        learner.model.unload()  # the session's model is shared: take the LoRA layers out again
        real_runtime.model = base_model
