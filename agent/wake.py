"""The wake cycle: learn one passage the SEAL way.

``wake_cycle`` reads top to bottom: claim -> questions -> baseline -> self-edits ->
one trial LoRA per candidate -> select -> evaluate -> commit (or record why not).
Trials train a scratch adapter (``trial``) copied from the current ``knowledge``
adapter, so the active adapter is never touched until a winner is chosen; the commit
writes the adapter's files atomically and then, in one store transaction, the adapter
row, the active pointer, the cycle, every candidate, the evaluations and the job's
state. A crash anywhere before that transaction leaves the previous adapter active and
the passage claimable again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters import lora
from adapters.registry import AdapterRegistry
from policies import questions as question_policies
from policies import reward as rewards
from policies import selection as selections
from policies import self_edit as self_edits
from policies.config import PolicyConfig
from policies.questions import answer_prompt, self_question_prompt, split_roles
from policies.reward import Scores, is_correct, normalize, token_f1
from policies.self_edit import parse_qa
from store import Job, NewQuestion, Store

from .runtime import Runtime

log = logging.getLogger(__name__)

KNOWLEDGE, TRIAL, EDITOR = "knowledge", "trial", "editor"


@dataclass(frozen=True)
class WakeConfig:
    candidates: int = field(default=3, metadata={"help": "self-edits sampled per passage (N of best-of-N)"})
    self_edit_tokens: int = field(default=192, metadata={"help": "longest self-edit, in tokens"})
    answer_tokens: int = field(default=32, metadata={"help": "longest closed-book answer when grading"})
    forgetting_sample: int = field(default=4, metadata={"help": "earlier passages re-evaluated after each commit (rotating)"})
    heartbeat_s: float = field(default=30.0, metadata={"help": "a claimed job's heartbeat interval"})
    stale_after_s: float = field(default=300.0, metadata={"help": "a claim with no heartbeat for this long is requeued"})
    max_attempts: int = field(default=3, metadata={"help": "a passage that fails this often is marked failed"})
    seed: int = field(default=0, metadata={"help": "base seed of sampling and training"})
    track: bool = field(default=True, metadata={"help": "after a commit, record general drift and verbatim memorisation of the new version"})


@dataclass(frozen=True)
class CycleReport:
    passage_id: int
    title: str
    outcome: str  # committed | rejected | failed
    reason: str
    adapter_id: str | None
    baseline: Scores | None
    chosen: int | None
    candidates: list[dict]
    timings: dict[str, float]
    probe_before: Scores | None = None
    probe_after: Scores | None = None


Progress = Callable[[str], None]  # one short line per step


class ClaimLost(RuntimeError):
    """Another worker took this job back (our heartbeat went stale): do not commit."""


class StopRequested(BaseException):  # noqa: N818 - an exit request, like KeyboardInterrupt
    """A warm stop was requested (the daemon got SIGTERM): abandon the cycle at the next
    heartbeat. A BaseException, so that no ``except Exception`` records it as a failure."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Learner:
    """The resident pieces a wake cycle needs: one base model carrying the
    ``knowledge`` adapter (what was learned), a ``trial`` adapter (scratch) and the
    ``editor`` adapter (how to write self-edits; trained by ReST-EM in sleep)."""

    def __init__(self, runtime: Runtime, store: Store, registry: AdapterRegistry,
                 lora_cfg: lora.LoraConfig, policies: PolicyConfig, wake: WakeConfig):
        self.runtime, self.store, self.registry = runtime, store, registry
        self.lora_cfg, self.policies, self.cfg = lora_cfg, policies, wake
        self.worker = worker_id()
        base = runtime.model
        if getattr(base, "seal_zero", None) is None:  # else a Learner was made on this runtime before: reuse
            self.model = lora.attach(base, lora_cfg, names=(KNOWLEDGE, TRIAL, EDITOR))
            self.model.seal_zero = lora.snapshot(self.model, KNOWLEDGE)  # a fresh LoRA is the base model
            runtime.model = self.model
        self.model = runtime.model
        have = self.model.peft_config[KNOWLEDGE]
        if (have.r, have.lora_alpha, set(have.target_modules)) != (lora_cfg.rank, lora_cfg.alpha, set(lora_cfg.targets)):
            raise ValueError("this runtime's model carries LoRA adapters of another shape: load a fresh runtime")
        self._zero = self.model.seal_zero
        for name in (KNOWLEDGE, TRIAL):
            lora.restore(self.model, name, self._zero)
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
            lora.restore(self.model, EDITOR, self._zero)
        self.editor_id = active["id"] if active else None

    # -------------------------------------------------------------- measuring
    def score(self, adapter: str, title: str, qs: list[dict], context: str | None = None) -> Scores:
        """Greedy answers (graded) and answer log-likelihoods, batched; closed book
        unless a ``context`` is given."""
        if not qs:
            return Scores(accuracy=0.0, f1=0.0, logprob=0.0, n=0)
        self.model.set_adapter(adapter)
        rt = self.runtime
        prompts = [rt.chat(answer_prompt(q["question"], title=title, context=context)) for q in qs]
        gens = rt.generate(prompts, max_new_tokens=self.cfg.answer_tokens)
        lls = rt.loglik(prompts, [q["answer"] for q in qs])
        correct = tuple(is_correct(g.text, q["answer"]) for g, q in zip(gens, qs, strict=True))
        f1s = [token_f1(g.text, q["answer"]) for g, q in zip(gens, qs, strict=True)]
        return Scores(
            accuracy=sum(correct) / len(qs),
            f1=sum(f1s) / len(qs),
            logprob=sum(ll.mean for ll in lls) / len(qs),
            n=len(qs),
            answers=tuple(g.text for g in gens),
            correct=correct,
            f1s=tuple(f1s),
            logprobs=tuple(ll.mean for ll in lls),
        )

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
        with self.model.disable_adapter():
            (gen,) = rt.generate([prompt], max_new_tokens=self.cfg.self_edit_tokens)
            body = f" {normalize(text)} "
            pairs = [(q, a) for q, a in parse_qa(gen.text) if normalize(a) and f" {normalize(a)} " in body]
            if not pairs:
                return []
            checks = rt.generate(
                [rt.chat(answer_prompt(q, title=title, context=text)) for q, _ in pairs],
                max_new_tokens=self.cfg.answer_tokens,
            )
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
            with self.model.disable_adapter() if writer is None else contextlib.nullcontext():
                gens = self.runtime.generate(
                    [self.runtime.chat(user) for _, _, user in todo],
                    max_new_tokens=min(self.cfg.self_edit_tokens, max(p.max_new_tokens for _, p, _ in todo)),
                    temperature=self.policies.temperature,
                    top_p=self.policies.top_p,
                    seed=seed,
                )
        finally:
            self.model.set_adapter(KNOWLEDGE)
        return [(n, g.text, g.n_tokens) for (n, _, _), g in zip(todo, gens, strict=True)]

    def trial(self, examples: list[lora.Example], seed: int, beat: Callable[[], None] | None = None) -> lora.TrainResult:
        """Train the scratch adapter, starting from the current knowledge; ``beat`` is
        called now and then while it trains (the claim's heartbeat)."""
        lora.copy_adapter(self.model, KNOWLEDGE, TRIAL)
        cfg = dataclasses.replace(self.lora_cfg, seed=seed)
        progress = (lambda _step, _total, _loss: beat()) if beat else None
        result = lora.train(self.model, self.runtime.tokenizer, examples, cfg, adapter=TRIAL, progress=progress)
        self.model.set_adapter(KNOWLEDGE)
        return result

    def reload_active(self) -> None:
        """Make the live knowledge adapter equal the store's active version again
        (after a failed cycle that may have left other weights in it)."""
        active = self.registry.active(KNOWLEDGE)
        if active:
            self.registry.load_into(self.model, KNOWLEDGE, active["id"])
        else:
            lora.restore(self.model, KNOWLEDGE, self._zero)
        self.model.set_adapter(KNOWLEDGE)

    def recover(self) -> None:
        """Give back claims of workers that died on this host (kill -9, power loss) and
        claims whose heartbeat went stale; remove half-written adapter folders."""
        host = socket.gethostname()
        for job in self.store.claimed_jobs():
            who = job["claimed_by"] or ""
            h, _, pid = who.partition(":")
            if h == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                self.store.requeue_claimed_by(who)
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


def wake_cycle(learner: Learner, job: Job, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None) -> CycleReport:
    """Learn one claimed passage. Returns what happened; the store has it all. If
    ``should_stop`` turns true, the next heartbeat raises StopRequested (nothing of
    the cycle is recorded; the caller gives the claim back)."""
    say = progress or (lambda _msg: None)
    store, cfg, pol = learner.store, learner.cfg, learner.policies
    passage = store.passage(job.passage_id)
    title, text = passage["title"], passage["text"]
    timings: dict[str, float] = {}
    tokens: dict[str, int] = {}
    started = time.time()
    seed = cfg.seed + passage["id"] * 1000 + job.attempts
    parent = learner.registry.active(KNOWLEDGE)
    parent_id = parent["id"] if parent else None

    last_beat = [time.monotonic()]

    def beat(force: bool = False) -> None:
        """Keep the claim alive, at most once per heartbeat_s (a long trial would
        otherwise look dead to another worker's recovery)."""
        if should_stop is not None and should_stop():
            raise StopRequested(f"stop requested while learning passage {job.passage_id}")
        if force or time.monotonic() - last_beat[0] >= cfg.heartbeat_s:
            store.heartbeat(job.id)
            last_beat[0] = time.monotonic()

    def step(name: str):
        t0 = time.perf_counter()

        def done():
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            beat(force=True)

        return done

    # 2. questions: reward (selects) and probe (held out, measured only)
    say(f"questions for '{title}'")
    done = step("questions")
    reward_qs, probe_qs = learner.question_set(passage)
    done()

    # 3. the no-update baseline, closed book
    done = step("baseline")
    baseline = learner.score(KNOWLEDGE, title, reward_qs)
    done()

    # 4. candidates: the passage alone (the reference) and N self-edits, batched
    say(f"writing {cfg.candidates} self-edits ({pol.self_edit})")
    done = step("generate")
    edits = learner.sample_self_edits(passage, [pol.self_edit] * cfg.candidates, seed)
    done()
    tokens["generate"] = sum(n for _, _, n in edits)
    chat = learner.runtime.chat
    cands: list[tuple[str, str, int]] = []  # (policy, text, tokens)
    if pol.include_passage or not edits:
        cands.append(("passage", "", 0))
    cands += edits

    # 5. one trial update per candidate, scored on the reward questions
    rows, trials, snapshots = [], [], {}
    for idx, (name, edit, n_tok) in enumerate(cands):
        say(f"trial {idx + 1}/{len(cands)}: {name}")
        examples = self_edits.get(name).examples(title, text, edit, chat)
        if name != "passage" and pol.include_passage and self_edits.adds_nothing(examples, title, text):
            # nothing usable in this self-edit (e.g. no grounded pair): it would only
            # repeat the passage-only trial, so skip the training and say so
            trials.append(selections.Trial(idx, name, float("-inf"), float("-inf"), ok=False))
            rows.append({"policy": name, "idx": idx, "text": edit, "prompt": "", "n_tokens": n_tok,
                         "n_examples": len(examples), "chosen": 0,
                         "note": "no usable example beyond the passage: same as passage-only, not trained"})
            continue
        t0 = time.perf_counter()
        result = learner.trial(examples, seed + idx, beat=beat)
        scores = None if result.nan else learner.score(TRIAL, title, reward_qs)
        t_train = result.seconds
        t_score = time.perf_counter() - t0 - t_train
        timings["train"] = timings.get("train", 0.0) + t_train
        timings["score"] = timings.get("score", 0.0) + t_score
        tokens["train"] = tokens.get("train", 0) + result.tokens
        beat(force=True)
        ok = scores is not None
        r_lp = rewards.answer_logprob(scores, baseline) if ok else None
        r_acc = rewards.qa_accuracy(scores, baseline) if ok else None
        if ok:
            snapshots[idx] = lora.snapshot(learner.model, TRIAL)
            primary = rewards.REWARDS[pol.reward](scores, baseline)
            other = r_acc if pol.reward == "answer_logprob" else r_lp
            trials.append(selections.Trial(idx, name, primary, other))
        else:
            trials.append(selections.Trial(idx, name, float("-inf"), float("-inf"), ok=False))
        rows.append({
            "policy": name, "idx": idx, "text": edit, "prompt": "", "n_tokens": n_tok,
            "n_examples": len(examples), "reward_logprob": r_lp, "reward_acc": r_acc,
            "reward_f1": (scores.f1 - baseline.f1) if ok else None,
            "train_loss": result.final_loss, "gen_seconds": timings.get("generate", 0.0) / max(len(edits), 1) if edit else 0.0,
            "train_seconds": t_train, "score_seconds": t_score, "chosen": 0,
            "note": None if ok else "non-finite training loss: trial aborted",
        })

    # 6. select, with margins
    choice = selections.get(pol.selection)(trials, pol.min_gain, pol.edit_margin)
    say(choice.reason)

    # 7. evaluate: the new passage's probes before/after, and earlier passages' probes
    done = step("evaluate")
    probe_before = learner.score(KNOWLEDGE, title, probe_qs) if probe_qs else None
    evals = []
    if probe_before:
        evals.append(_eval_row(parent_id, passage["id"], "probe", probe_before))
    adapter_id = None
    probe_after = None
    new_evals = []
    if choice.idx is not None:
        lora.restore(learner.model, KNOWLEDGE, snapshots[choice.idx])
        rows[choice.idx]["chosen"] = 1
        if probe_qs:
            probe_after = learner.score(KNOWLEDGE, title, probe_qs)
        for pid in _rotating_sample(store.learned_passages(), passage["id"], cfg.forgetting_sample, job.id):
            p = store.passage(pid)
            qs = store.questions(pid, role="probe")
            if qs:
                new_evals.append((pid, learner.score(KNOWLEDGE, p["title"], qs)))
    done()

    cycle = {
        "passage_id": passage["id"], "job_id": job.id, "started_at": started,
        "parent_adapter": parent_id, "baseline_logprob": baseline.logprob,
        "baseline_acc": baseline.accuracy, "n_reward": len(reward_qs), "n_probe": len(probe_qs),
        "timings": json.dumps(timings), "tokens": json.dumps(tokens), "reason": choice.reason,
    }
    if choice.idx is None:
        store.record_cycle({**cycle, "outcome": "rejected"}, rows, evals, job_id=job.id)
        return CycleReport(passage["id"], title, "rejected", choice.reason, None, baseline, None, rows, timings, probe_before)

    # commit: files first (atomic), then one transaction for everything else
    chosen = cands[choice.idx][0]
    t_commit = time.perf_counter()

    def record(new_id: str) -> None:
        if not store.holds_claim(job.id, learner.worker):
            raise ClaimLost(f"job {job.id} was taken back from this worker: not committing")
        timings["commit"] = time.perf_counter() - t_commit
        ev = list(evals)
        if probe_after:
            ev.append(_eval_row(new_id, passage["id"], "probe", probe_after))
        ev += [_eval_row(new_id, pid, "probe", s) for pid, s in new_evals]
        store.record_cycle({**cycle, "outcome": "committed", "adapter_id": new_id, "timings": json.dumps(timings)},
                           rows, ev, job_id=job.id)

    adapter_id = learner.registry.commit(
        learner.model, KNOWLEDGE, name=KNOWLEDGE, kind="wake", parent_id=parent_id,
        passage_id=passage["id"], policy=chosen, reward=trials[choice.idx].reward,
        metrics={"baseline": baseline.logprob, "reward_logprob": rows[choice.idx]["reward_logprob"],
                 "reward_acc": rows[choice.idx]["reward_acc"],
                 "probe_acc": probe_after.accuracy if probe_after else None},
        in_transaction=record,
    )
    if cfg.track:  # drift and memorisation of the new version (never fails the commit)
        from .tracking import track

        track(learner, adapter_id, [passage["id"], *(pid for pid, _ in new_evals)])
    return CycleReport(passage["id"], title, "committed", choice.reason, adapter_id, baseline,
                       choice.idx, rows, timings, probe_before, probe_after)


def _eval_row(adapter_id: str | None, passage_id: int, kind: str, s: Scores) -> dict:
    return {"adapter_id": adapter_id, "passage_id": passage_id, "kind": kind,
            "accuracy": s.accuracy, "f1": s.f1, "logprob": s.logprob, "n": s.n}


def _rotating_sample(learned: list[int], current: int, k: int, turn: int) -> list[int]:
    """k earlier passages, a different slice each turn, so that over time every
    learned passage is re-measured."""
    earlier = [p for p in learned if p != current]
    if not earlier or k <= 0:
        return []
    if len(earlier) <= k:
        return earlier
    start = (turn * k) % len(earlier)
    return [earlier[(start + i) % len(earlier)] for i in range(k)]


def learn(learner: Learner, max_passages: int | None = None, progress: Progress | None = None,
          should_stop: Callable[[], bool] = lambda: False,
          on_report: Callable[[CycleReport], None] | None = None) -> list[CycleReport]:
    """Drain the queue (burst mode): claim, learn, repeat. A failure is recorded on
    the job (retried up to max_attempts) and the loop goes on. When ``should_stop``
    turns true mid-cycle, the cycle is abandoned at its next heartbeat: the live
    adapter is reloaded from the store and the claim given back without counting an
    attempt, and the loop stops."""
    learner.recover()
    reports: list[CycleReport] = []
    while (max_passages is None or len(reports) < max_passages) and not should_stop():
        job = learner.store.claim_next(learner.worker)
        if job is None:
            break
        try:
            reports.append(wake_cycle(learner, job, progress, should_stop))
            if on_report:
                on_report(reports[-1])
        except StopRequested:
            learner.reload_active()
            learner.store.release_claim(learner.worker, job.id)
            log.info("stop requested: gave back passage %s unfinished", job.passage_id)
            break
        except KeyboardInterrupt:
            learner.reload_active()
            learner.store.requeue_claimed_by(learner.worker)
            raise
        except Exception as e:  # a bug or a bad passage: record it and go on
            log.exception("wake cycle failed on passage %s", job.passage_id)
            learner.reload_active()
            state = learner.store.fail_job(job.id, f"{type(e).__name__}: {e}", learner.cfg.max_attempts)
            p = learner.store.passage(job.passage_id) or {"title": "?"}
            reports.append(CycleReport(job.passage_id, p["title"], "failed", f"{type(e).__name__}: {e} (job {state})",
                                       None, None, None, [], {}))
            if on_report:
                on_report(reports[-1])
    return reports
