"""The Learner: one resident base model and the adapters a learning step needs.

The base model carries three named LoRA adapters (``adapters.names``): ``knowledge``
(what was learned; questions are answered with it), ``editor`` (how to write
self-edits) and ``trial`` (scratch: a candidate update is trained there, copied from
the current knowledge, so the active adapter is never touched until a winner is
chosen). The Learner measures (``score``), writes questions and self-edits, and
trains a trial; the wake cycle, the sleep phase, the editor's ReST-EM rounds and the
benchmarks are written in terms of it.

How a trial is trained and how questions are scored are collaborators
(``train_fn``, ``score_batch``), so a benchmark can run SEAL's reference inner loop
through the same code path.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from adapters import lora
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from policies import questions as question_policies
from policies import self_edit as self_edits
from policies.config import PolicyConfig
from policies.questions import answer_prompt, self_question_prompt, split_roles
from policies.reward import Scores, is_correct, normalize, token_f1
from policies.self_edit import parse_qa
from policies.transfer import DistillConfig
from store import NewQuestion, Store

from .engine import Engine, LocalEngine
from .runtime import Runtime

if TYPE_CHECKING:
    from .wake import WakeConfig

TrainFn = Callable[..., lora.TrainResult]  # lora.train's signature


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Learner:
    """The resident pieces a wake cycle needs: one base model carrying the
    ``knowledge`` adapter (what was learned), a ``trial`` adapter (scratch) and the
    ``editor`` adapter (how to write self-edits; trained by ReST-EM in sleep)."""

    def __init__(self, runtime: Runtime, store: Store, registry: AdapterRegistry,
                 lora_cfg: lora.LoraConfig, policies: PolicyConfig, wake: WakeConfig, *,
                 train_fn: TrainFn | None = None, score_batch: int | None = None,
                 distill: DistillConfig | None = None):
        self.runtime, self.store, self.registry = runtime, store, registry
        self.lora_cfg, self.policies, self.cfg = lora_cfg, policies, wake
        self.distill = distill or DistillConfig()  # how distillation candidates are built (agent.teacher)
        self.train_fn = train_fn  # how a trial trains (None: lora.train; a benchmark may pass SEAL's reference loop)
        self.score_batch = score_batch  # questions per scoring pass (None: all at once, batched by the runtime)
        self.worker = worker_id()
        self.runner = None  # where the wake cycle's trials run (agent.runner.runner_of: local by default)
        self.engine: Engine = LocalEngine(runtime)  # what generates and scores (a vLLM server: agent.cluster)
        base = runtime.model
        if getattr(base, "seal_zero", None) is None:  # else a Learner was made on this runtime before: reuse
            self.model = lora.attach(base, lora_cfg, names=(KNOWLEDGE, TRIAL, EDITOR))
            self.model.seal_zero = lora.snapshot(self.model, KNOWLEDGE)  # a fresh LoRA is the base model
            runtime.model = self.model
        self.model = runtime.model
        have = self.model.peft_config[KNOWLEDGE]
        if (have.r, have.lora_alpha, set(have.target_modules)) != (lora_cfg.rank, lora_cfg.alpha, set(lora_cfg.targets)):
            raise ValueError("this runtime's model carries LoRA adapters of another shape: load a fresh runtime")
        self.zero = self.model.seal_zero
        for name in (KNOWLEDGE, TRIAL):
            lora.restore(self.model, name, self.zero)
        active = registry.active(KNOWLEDGE)
        if active:
            registry.load_into(self.model, KNOWLEDGE, active["id"])
        self.editor_id: str | None = None
        self.load_editor()
        self.model.set_adapter(KNOWLEDGE)
        self.model.eval()

    def load_editor(self) -> None:
        """Make the live editor adapter equal the store's active editor version (none:
        self-edits are written by the base model, adapters disabled)."""
        active = self.registry.active(EDITOR)
        if active:
            self.registry.load_into(self.model, EDITOR, active["id"])
        else:
            lora.restore(self.model, EDITOR, self.zero)
        self.editor_id = active["id"] if active else None

    # -------------------------------------------------------------- measuring
    def score(self, adapter: str, title: str, qs: list[dict], context: str | None = None) -> Scores:
        """Greedy answers (graded) and answer log-likelihoods, batched; closed book
        unless a ``context`` is given."""
        if not qs:
            return Scores(accuracy=0.0, f1=0.0, logprob=0.0, n=0)
        step = self.score_batch or len(qs)
        self.model.set_adapter(adapter)
        served = self.engine.serve_live(self.model, adapter)  # once: a remote engine is sent the weights
        graded = [self._grade(served, title, qs[i : i + step], context) for i in range(0, len(qs), step)]
        correct = tuple(c for g in graded for c in g[0])
        f1s = tuple(f for g in graded for f in g[1])
        lps = tuple(lp for g in graded for lp in g[2])
        return Scores(accuracy=sum(correct) / len(qs), f1=sum(f1s) / len(qs), logprob=sum(lps) / len(qs),
                      n=len(qs), answers=tuple(a for g in graded for a in g[3]),
                      correct=correct, f1s=f1s, logprobs=lps)

    def _grade(self, served: str | None, title: str, qs: list[dict], context: str | None) -> tuple[tuple, tuple, tuple, tuple]:
        """(correct, f1s, logprobs, answers) of one scoring pass over ``qs``, asked of the
        engine's adapter ``served``."""
        rt = self.runtime
        prompts = [rt.chat(answer_prompt(q["question"], title=title, context=context)) for q in qs]
        gens = self.engine.generate(prompts, adapter=served, max_new_tokens=self.cfg.answer_tokens)
        lls = self.engine.loglik(prompts, [q["answer"] for q in qs], adapter=served)
        return (tuple(is_correct(g.text, q["answer"]) for g, q in zip(gens, qs, strict=True)),
                tuple(token_f1(g.text, q["answer"]) for g, q in zip(gens, qs, strict=True)),
                tuple(ll.mean for ll in lls), tuple(g.text for g in gens))

    # ------------------------------------------------------------- the steps
    def question_set(self, passage: dict) -> tuple[list[dict], list[dict]]:
        """Reward and probe questions of a passage; writes and verifies its own
        questions when the policy asks for them. Roles are stored once, so a resumed
        cycle splits the same way."""
        pid = passage["id"]
        qs = self.store.questions(pid)
        policy = question_policies.get(self.policies.questions)
        user = [q for q in qs if q["origin"] == "user"]
        own = [q for q in qs if q["origin"] == "self"]
        if policy.generates(len(user)) and not own:
            written = self.write_questions(passage)
            if written:
                self.store.add_questions(pid, written)
                qs = self.store.questions(pid)
                own = [q for q in qs if q["origin"] == "self"]
        if any(q["role"] is None for q in qs):
            if self.policies.questions == "self" and own:
                roles = {q["id"]: "reward" for q in own} | {q["id"]: "probe" for q in user}
            else:
                pool = user or own
                roles = split_roles([q["id"] for q in pool], self.policies.reward_fraction, seed=pid)
                roles |= {q["id"]: "extra" for q in qs if q["id"] not in roles}
            self.store.set_question_roles(roles)
            qs = self.store.questions(pid)
        return [q for q in qs if q["role"] == "reward"], [q for q in qs if q["role"] == "probe"]

    def write_questions(self, passage: dict) -> list[NewQuestion]:
        """Self-verification (Huang et al.'s sharpening): the model writes Q/A pairs
        with the passage in view; a pair is kept only if its answer is in the passage
        and the model gives the same answer again when asked open-book."""
        rt, title, text = self.runtime, passage["title"], passage["text"]
        self.model.set_adapter(KNOWLEDGE)
        prompt = rt.chat(self_question_prompt(title, text, self.policies.self_questions))
        (gen,) = self.engine.generate([prompt], adapter=None, max_new_tokens=self.cfg.self_edit_tokens)
        body = f" {normalize(text)} "
        pairs = [(q, a) for q, a in parse_qa(gen.text) if normalize(a) and f" {normalize(a)} " in body]
        if not pairs:
            return []
        checks = self.engine.generate([rt.chat(answer_prompt(q, title=title, context=text)) for q, _ in pairs],
                                      adapter=None, max_new_tokens=self.cfg.answer_tokens)
        seen, kept = set(), []
        for (q, a), check in zip(pairs, checks, strict=True):
            if normalize(q) in seen or not (is_correct(check.text, a) or token_f1(check.text, a) >= 0.5):
                continue
            seen.add(normalize(q))
            kept.append(NewQuestion(question=q, answer=a, origin="self"))
        return kept

    def sample_self_edits(self, passage: dict, names: list[str], seed: int,
                          writer: str | None = None) -> list[tuple[str, str, int]]:
        """One self-edit per entry of ``names`` (policy names, repeats allowed), in one
        batched generation; sampled, so that repeats of a policy differ. Returns
        (policy, text, tokens) for the policies that generate. The writer is the
        ``editor`` adapter once ReST-EM has committed a version of it, else the base
        model (adapters disabled); ``writer`` names another adapter (a candidate editor
        being measured)."""
        todo = [(n, self_edits.get(n)) for n in names]
        todo = [(n, p, p.prompt(passage["title"], passage["text"])) for n, p in todo]
        todo = [t for t in todo if t[2] is not None]
        if not todo:
            return []
        writer = writer or (EDITOR if self.editor_id else None)
        self.model.set_adapter(writer or KNOWLEDGE)
        try:
            gens = self.engine.generate(
                [self.runtime.chat(user) for _, _, user in todo],
                adapter=self.engine.serve_live(self.model, writer),
                max_new_tokens=min(self.cfg.self_edit_tokens, max(p.max_new_tokens for _, p, _ in todo)),
                temperature=self.policies.temperature,
                top_p=self.policies.top_p,
                seed=seed,
            )
        finally:
            self.model.set_adapter(KNOWLEDGE)
        return [(n, g.text, g.n_tokens) for (n, _, _), g in zip(todo, gens, strict=True)]

    def trial(self, examples: list[lora.Example], seed: int,
              progress: Callable[[int, int, float], None] | None = None,
              epochs: int | None = None) -> lora.TrainResult:
        """Train the scratch adapter, starting from the current knowledge; ``progress``
        (step, total, loss) is called after each optimiser step (the claim's heartbeat
        and the progress bars hang on it). ``epochs`` overrides ``lora.epochs``."""
        lora.copy_adapter(self.model, KNOWLEDGE, TRIAL)
        cfg = dataclasses.replace(self.lora_cfg, seed=seed, epochs=epochs or self.lora_cfg.epochs)
        result = (self.train_fn or lora.train)(self.model, self.runtime.tokenizer, examples, cfg, adapter=TRIAL, progress=progress)
        self.model.set_adapter(KNOWLEDGE)
        return result

    def reload_active(self) -> None:
        """Make the live knowledge adapter equal the store's active version again
        (after a failed cycle that may have left other weights in it)."""
        active = self.registry.active(KNOWLEDGE)
        if active:
            self.registry.load_into(self.model, KNOWLEDGE, active["id"])
        else:
            lora.restore(self.model, KNOWLEDGE, self.zero)
        self.model.set_adapter(KNOWLEDGE)

    def recover(self) -> None:
        """Give back claims of workers that died on this host (kill -9, power loss) and
        claims whose heartbeat went stale; remove half-written adapter folders."""
        host = socket.gethostname()
        for job in self.store.claimed_jobs():
            who = job["claimed_by"] or ""
            h, _, pid = who.partition(":")
            if h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                self.store.requeue_claimed_by(who, reason=f"its worker {who} died while learning it")
        self.store.requeue_stale(self.cfg.stale_after_s)
        self.registry.recover()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
