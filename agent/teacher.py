"""The teacher: the model with the passage in its prompt, as it is before the update.

A distillation candidate is built in three steps:

1. *prompts* (``policies.transfer.prompts``): the writer's questions, "what do you
   know about TITLE", "explain X";
2. *answers*: off-policy, the teacher answers each prompt open book, greedy and
   sampled, and a prompt whose answers disagree is dropped (self-verification: what
   the model cannot answer consistently while reading, it does not teach);
   on-policy (SDFT's recipe), the student answers closed book and the teacher only
   scores those answers;
3. *targets*: the teacher's top-k next-token log-probabilities over every answer token,
   computed once here, so that training (``adapters.lora``: top-k KL with a tail
   bucket) never runs the teacher again.

The answered prompts (``Answered``) are what the store keeps of a transfer set: a
sleep re-distils them (``targets`` again, with the passage) without writing them anew.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from adapters import lora
from adapters.names import KNOWLEDGE
from policies import transfer
from policies.reward import is_correct, token_f1

from .learner import Learner


@dataclass(frozen=True)
class Answered:
    """One prompt of a transfer set and the answer the student learns to give."""

    kind: str
    student: str  # user messages (chat-formatted when used)
    teacher: str
    answer: str
    how: str  # greedy | sampled | student (on-policy)
    ended: bool = True  # the answer ended (EOS) within the token limit: the student learns to stop there

    def as_dict(self) -> dict:
        return asdict(self)


def _agree(a: str, b: str, threshold: float) -> bool:
    return is_correct(a, b) or is_correct(b, a) or token_f1(a, b) >= threshold


def _item(p: transfer.Prompt, gen, how: str, cfg: transfer.DistillConfig) -> Answered:
    return Answered(p.kind, p.student, p.teacher, gen.text, how, ended=gen.n_tokens < cfg.answer_tokens)


def answer(learner: Learner, passage: dict, edit: str, cfg: transfer.DistillConfig, seed: int,
           onpolicy: bool = False, exclude: frozenset[str] = frozenset()) -> list[Answered]:
    """The answered transfer set of one self-edit (see the module's docstring);
    questions in ``exclude`` (normalised) are not taught."""
    rt, title, text = learner.runtime, passage["title"], passage["text"]
    todo = transfer.prompts(title, text, edit, cfg, exclude)
    if not todo:
        return []
    side = [p.student if onpolicy else p.teacher for p in todo]
    chats = [rt.chat(m) for m in side]
    learner.model.set_adapter(KNOWLEDGE)  # the teacher (and, on-policy, the student as it is now)
    engine, served = learner.engine, learner.engine.serve_live(learner.model, KNOWLEDGE)
    greedy = engine.generate(chats, adapter=served, max_new_tokens=cfg.answer_tokens)
    sampled = [engine.generate(chats, adapter=served, max_new_tokens=cfg.answer_tokens, temperature=cfg.temperature,
                               top_p=0.95, seed=seed + 101 * j) for j in range(cfg.samples)]
    out = []
    for i, p in enumerate(todo):
        g = greedy[i]
        others = {s[i].text: s[i] for s in sampled if s[i].text.strip() and s[i].text != g.text}

        if not g.text.strip():
            continue
        if onpolicy:
            out += [_item(p, g, "student", cfg), *(_item(p, o, "student", cfg) for o in others.values())]
            continue
        if sampled and not any(_agree(s[i].text, g.text, cfg.agree) for s in sampled):
            continue  # the teacher cannot answer it consistently: not taught
        out.append(_item(p, g, "greedy", cfg))
        out += [_item(p, o, "sampled", cfg) for o in others.values() if _agree(o.text, g.text, cfg.agree)]
    return out


def targets(learner: Learner, items: list[Answered], k: int) -> list[lora.Example]:
    """Training examples of answered prompts: closed-book chat prompt -> answer (with
    EOS when the teacher's answer ended within the limit), each with the teacher's top-k log-probabilities over its tokens (the model
    with the passage in view, the knowledge adapter as it is now)."""
    if not items:
        return []
    rt = learner.runtime
    examples = [lora.Example(rt.chat(a.student), a.answer, eos=a.ended) for a in items]
    ids = [lora.completion_ids(rt.tokenizer, e) for e in examples]
    learner.model.set_adapter(KNOWLEDGE)
    tops = rt.topk_logprobs([rt.chat(a.teacher) for a in items], ids, k)
    return [lora.Example(e.prompt, e.completion, eos=e.eos, teacher=lora.Teacher(t_ids, t_lp))
            for e, (t_ids, t_lp) in zip(examples, tops, strict=True)]
