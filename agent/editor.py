"""ReST-EM on the editor: teach the self-edit writer from the rewards it collected.

Every wake cycle records each candidate self-edit with its reward, beside a
passage-only trial of the same passage. A round of ReST-EM (Singh et al., 2023, as
SEAL uses it) keeps the self-edits that beat that trial by a margin (the E-step: a
filter on reward), and fine-tunes the ``editor`` LoRA on them with trl's SFTTrainer
(the M-step): prompt = exactly the chat prompt the wake cycle writes that policy's
self-edit from, completion = the self-edit, loss on the completion only.

``restem_round`` reads top to bottom: pairs -> held-out passages -> SFT of a scratch
adapter -> one self-edit per held-out passage from the old and from the new editor ->
one trial update per self-edit, scored on the passage's reward questions -> keep the
new editor only if its mean reward is not worse. The scratch is the ``trial`` adapter:
the ``knowledge`` adapter (what `seal ask` answers with) is only ever read, and the
live ``editor`` changes only by loading a committed version. A kept editor is written
like any adapter version (files first, then one transaction with the round's row).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from adapters import lora
from adapters.names import EDITOR, KNOWLEDGE, TRIAL
from policies import self_edit as self_edits
from policies.reward import relative_to

from .events import ADVANCE, END, START, Event, OnEvent, ignore
from .learner import Learner
from .trial import Candidate, examples_of, try_candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditorConfig:
    enabled: bool = field(default=True, metadata={"help": "run a ReST-EM round on the editor in each sleep"})
    margin: float = field(
        default=0.0,
        metadata={"help": "a self-edit is a training pair if its reward_logprob beats the passage-only trial of the "
                          "same cycle by more than this (or the no-update baseline, when the cycle had no passage-only trial)"},
    )
    min_pairs: int = field(default=4, metadata={"help": "fewer qualifying pairs than this: the round is skipped"})
    max_pairs: int = field(default=64, metadata={"help": "most pairs trained on per round (best advantage first)"})
    per_passage: int = field(default=2, metadata={"help": "most pairs taken from one passage"})
    window: int = field(default=1000, metadata={"help": "pairs are drawn from the self-edits of the last this many wake cycles (0: all)"})
    epochs: int = field(default=2, metadata={"help": "SFT passes over the pairs"})
    lr: float = field(default=2e-4, metadata={"help": "SFT learning rate (constant, AdamW)"})
    batch_size: int = field(default=4, metadata={"help": "pairs per SFT step"})
    max_length: int = field(default=1024, metadata={"help": "tokens per pair (prompt + self-edit); longer ones are cut at the end"})
    from_base: bool = field(
        default=True,
        metadata={"help": "train each round's editor from the base model, as ReST-EM does (the pairs are every "
                          "round's data); false = continue from the active editor"},
    )
    heldout: int = field(default=4, metadata={"help": "held-out passages the before/after reward is measured on"})
    tolerance: float = field(
        default=0.0,
        metadata={"help": "keep the new editor if its held-out reward >= the old one's minus this (negative: demand a gain)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of SFT, sampling and trials"})
    processes: int = field(
        default=1,
        metadata={"help": "run the SFT in this many processes, data parallel (one per GPU; torchrun, "
                          "agent.cluster.train_job); 1 = in the daemon's model. Must divide batch_size"},
    )

    def __post_init__(self) -> None:
        if self.min_pairs < 1 or self.max_pairs < self.min_pairs:
            raise ValueError("need 1 <= min_pairs <= max_pairs")
        if self.per_passage < 1:
            raise ValueError("per_passage must be >= 1")
        if self.window < 0:
            raise ValueError("window must be >= 0 (0: every cycle)")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 16:
            raise ValueError("epochs and batch_size must be >= 1, max_length >= 16")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lr must be a positive finite number")
        if self.heldout < 1:
            raise ValueError("heldout must be >= 1")
        if self.processes < 1 or self.batch_size % self.processes:
            raise ValueError("processes must be >= 1 and divide batch_size (each step's rows are split between them)")
        if not (math.isfinite(self.margin) and math.isfinite(self.tolerance)):
            raise ValueError("margin and tolerance must be finite numbers")


@dataclass(frozen=True)
class EditorRound:
    """One ReST-EM round, as its ``editor_rounds`` row (``id`` is None when the round
    was abandoned and nothing was recorded)."""

    id: int | None
    sleep_id: int | None
    started_at: float
    finished_at: float
    outcome: str  # kept | rejected | skipped | abandoned (not recorded)
    reason: str
    parent_adapter: str | None
    adapter_id: str | None
    n_pairs: int
    n_heldout: int
    train_loss: float | None
    reward_before: float | None
    reward_after: float | None
    detail: dict


@dataclass(frozen=True)
class SFTResult:
    steps: int
    losses: tuple[float, ...]  # per logged step
    train_loss: float  # mean loss of the last epoch's steps
    seconds: float
    stopped: bool  # should_stop() asked to abandon mid-training


class Abandoned(Exception):
    """should_stop() said so: leave without committing anything."""


# ---------------------------------------------------------------------- the data
def sft_examples(learner: Learner, pairs: list[dict], max_length: int | None = None) -> list[tuple[dict, dict]]:
    """(pair, row) for each usable pair, where row = {prompt, completion}: the prompt is
    exactly what the wake cycle sends to write that policy's self-edit, the completion
    the self-edit. Dropped: pairs whose policy is unknown or writes nothing, and (with
    ``max_length``) pairs whose prompt leaves no room for the self-edit."""
    tok = learner.runtime.tokenizer
    out = []
    for p in _parts(pairs):
        try:
            user = self_edits.get(p["policy"]).prompt(p["title"], p["passage_text"])
        except ValueError:
            log.warning("restem: candidate %s has unknown policy %r: skipped", p["candidate_id"], p["policy"])
            continue
        if user is None:
            continue
        prompt = learner.runtime.chat(user)
        if max_length is not None and len(tok(prompt, add_special_tokens=False)["input_ids"]) >= max_length - 8:
            log.warning("restem: candidate %s: its prompt fills max_length: skipped", p["candidate_id"])
            continue
        out.append((p, {"prompt": prompt, "completion": p["text"]}))
    return out


def _parts(pairs: list[dict]) -> list[dict]:
    """An augmented candidate that won teaches the writer each of its self-edits."""
    out = []
    for p in pairs:
        if p["policy"] != self_edits.AUGMENTED:
            out.append(p)
            continue
        out += [{**p, "policy": policy, "text": text} for policy, text in self_edits.parts(p["text"])]
    return out


# ----------------------------------------------------------------------- the SFT
@contextlib.contextmanager
def _isolated(model):
    """What SFTTrainer changes on the resident model, put back afterwards: the base
    model's patched forward (its fused LM head), config.use_cache (Trainer turns it
    off, which would slow every later generation), pad ids, training mode, and every
    RNG it seeds."""
    base = model.get_base_model()
    had_forward = "forward" in base.__dict__
    forward = base.__dict__.get("forward")
    use_cache = getattr(base.config, "use_cache", None)
    pad = base.config.pad_token_id
    gen_pad = base.generation_config.pad_token_id if base.generation_config is not None else None
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        if had_forward:
            base.forward = forward
        else:
            base.__dict__.pop("forward", None)
        base.config.use_cache = use_cache
        base.config.pad_token_id = pad
        if base.generation_config is not None:
            base.generation_config.pad_token_id = gen_pad
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.set_adapter(KNOWLEDGE, inference_mode=True)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()


def sft(learner: Learner, rows: list[dict], cfg: EditorConfig, adapter: str = TRIAL,
        on_event: OnEvent = ignore, should_stop: Callable[[], bool] = lambda: False) -> SFTResult:
    """Fine-tune ``adapter`` (only it) on prompt-completion rows with trl's SFTTrainer:
    loss on the completion (EOS appended) only; no hub, no reports, no checkpoints.
    With ``cfg.processes`` > 1 the SFT runs as a data-parallel job of that many
    processes (``agent.cluster.train_job``, under torchrun: trl's trainer on DDP) and
    its adapter is loaded into ``adapter``, checksum checked."""
    if cfg.processes > 1:
        return _sft_in_processes(learner, rows, cfg, adapter, on_event, should_stop)
    with _isolated(learner.model):
        return sft_model(learner.model, learner.runtime.tokenizer, rows, cfg, adapter, on_event, should_stop)


def sft_model(model, tok, rows: list[dict], cfg: EditorConfig, adapter: str, on_event: OnEvent = ignore,
              should_stop: Callable[[], bool] = lambda: False, processes: int = 1) -> SFTResult:
    """The SFT itself, on a PEFT model: in the daemon (one process) or in each process of
    a training job. With ``processes`` > 1 (run under torchrun) each optimiser step
    takes the same ``cfg.batch_size`` rows as one process would, split between the
    processes (``split_batches``), and the loss is averaged over the tokens of all of
    them, so a step is the one-process step up to float rounding."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bar()
    losses: list[tuple[float, float]] = []  # (epoch, loss)
    stopped = [False]

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if should_stop():
                stopped[0] = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append((float(state.epoch or 0.0), float(logs["loss"])))
                on_event(Event("sft", ADVANCE, "editor SFT", done=state.global_step, total=state.max_steps,
                               loss=float(logs["loss"])))

    t0 = time.perf_counter()
    out_dir = tempfile.mkdtemp(prefix="seal-editor-sft-")
    on_cpu = next(model.parameters()).device.type == "cpu"
    model.set_adapter(adapter, inference_mode=True)
    wanted = {id(p) for p in lora._lora_params(model, adapter).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    args = SFTConfig(
        output_dir=out_dir,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        accelerator_config={"split_batches": processes > 1},  # the global batch is cfg.batch_size rows
        average_tokens_across_devices=True,
        max_length=cfg.max_length,
        packing=False,
        completion_only_loss=True,
        activation_checkpointing=False,  # TRL turns it on by default; a LoRA on a small model needs no saving
        bf16=False,
        fp16=False,
        use_cpu=on_cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        label_names=["labels"],
    )
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[Watch()])
        for printer in (PrinterCallback, ProgressCallback):  # seal logs; only its CLI prints
            trainer.remove_callback(printer)
        trainer.train()
        steps = trainer.state.global_step
        del trainer
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if not losses:
        return SFTResult(steps, (), math.nan, time.perf_counter() - t0, stopped[0])
    last = math.ceil(losses[-1][0]) - 1  # the last epoch that ran (epochs count from 0)
    tail = [v for e, v in losses if e > last] or [losses[-1][1]]
    return SFTResult(steps, tuple(v for _, v in losses), sum(tail) / len(tail), time.perf_counter() - t0, stopped[0])


def _sft_in_processes(learner: Learner, rows: list[dict], cfg: EditorConfig, adapter: str, on_event: OnEvent,
                      should_stop: Callable[[], bool]) -> SFTResult:
    """The SFT as a job of ``cfg.processes`` processes; ``adapter`` as it is now is the
    parent. A stop kills the job and returns a stopped result, with ``adapter`` as it was."""
    from .cluster.train_job import JobError, train_into, write_sft_job

    t0 = time.perf_counter()
    folder = write_sft_job(learner.registry.root.parent / "jobs" / "editor", learner.runtime.cfg, learner.lora_cfg,
                           rows, cfg, learner.model, adapter)
    on_event(Event("sft", ADVANCE, f"editor SFT in {cfg.processes} processes", done=0, total=None))
    try:
        out = train_into(folder, cfg.processes, learner.model, adapter, should_stop=should_stop)
    except JobError:
        if should_stop():
            return SFTResult(0, (), math.nan, time.perf_counter() - t0, True)
        raise
    finally:
        learner.model.set_adapter(KNOWLEDGE)
    return SFTResult(out["steps"], tuple(out["losses"]), out["train_loss"], time.perf_counter() - t0, out["stopped"])


# -------------------------------------------------------------- held-out reward
def heldout_passages(learner: Learner, exclude: set[int], n: int) -> list[tuple[dict, list[dict]]]:
    """Up to ``n`` (passage, reward questions), none of ``exclude``: queued passages
    first (their questions split exactly as their wake cycle will split them), then
    learned ones."""
    chosen: list[tuple[dict, list[dict]]] = []
    seen: set[int] = set()
    for row in learner.store.restem_heldout(exclude, limit=4 * n):
        if len(chosen) >= n:
            break
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        passage = learner.store.passage(row["id"])
        if row["source"] == "pending":
            reward_qs, _ = learner.question_set(passage)
        else:
            reward_qs = learner.store.questions(row["id"], role="reward")
        if reward_qs:
            chosen.append((passage, reward_qs))
    return chosen


def _edit_reward(learner: Learner, passage: dict, qs: list[dict], baseline, policy: str, edit: str,
                 seed: int, cache: dict, teacher_scores=None) -> tuple[float | None, float | None]:
    """(the selecting reward, reward_acc) of one trial update on a self-edit (None when
    it did not train); identical training examples (e.g. two edits that add nothing
    beyond the passage) share one trial."""
    cand = Candidate(policy, edit)
    # a distillation candidate is keyed by its text (its examples need the teacher)
    key = (policy, edit) if self_edits.get(policy).distills else tuple(examples_of(learner, passage, cand)[0])
    if key not in cache:
        o = try_candidate(learner, passage, cand, seed, qs, baseline, teacher_scores=teacher_scores)
        cache[key] = (o.reward if o.ok else None, o.reward_acc)
    return cache[key]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------- a round
def restem_round(learner: Learner, cfg: EditorConfig, sleep_id: int | None, on_event: OnEvent = ignore,
                 should_stop: Callable[[], bool] = lambda: False) -> EditorRound:
    """One ReST-EM round on the editor. Records it (kept, rejected or skipped) and
    returns it; abandoned (should_stop) rounds record and commit nothing, and so does
    a disabled one (editor.enabled = false)."""
    if not cfg.enabled:
        now = time.time()
        return EditorRound(None, sleep_id, now, now, "skipped", "editor.enabled is false", learner.editor_id,
                           None, 0, 0, None, None, None, {})
    store, registry, model = learner.store, learner.registry, learner.model
    started = time.time()
    timings: dict[str, float] = {}
    learner.load_editor()  # the live editor is the store's active one
    parent = learner.editor_id
    policy = (learner.policies.sampled(1) or learner.policies.self_edits)[0]  # the first policy of a mix that writes
    base = {"sleep_id": sleep_id, "started_at": started, "parent_adapter": parent, "adapter_id": None,
            "n_pairs": 0, "n_heldout": 0, "train_loss": None, "reward_before": None, "reward_after": None}

    def finish(outcome: str, reason: str, detail: dict, **row) -> EditorRound:
        full = {**base, **row, "outcome": outcome, "reason": reason, "finished_at": time.time(),
                "detail": {**detail, "timings": timings, "policy": policy}}
        round_id = store.record_editor_round(full) if outcome != "abandoned" else None
        log.info("restem round: %s (%s)", outcome, reason)
        return EditorRound(id=round_id, **full)

    def check() -> None:
        if should_stop():
            raise Abandoned

    try:
        # 1. the E-step: self-edits whose reward beat the passage-only trial by the margin
        pairs = store.restem_pairs(cfg.margin, cfg.max_pairs, cfg.per_passage, cfg.window)
        usable = sft_examples(learner, pairs, cfg.max_length)
        rows = [row for _, row in usable]
        detail: dict = {"pairs": [p["candidate_id"] for p, _ in usable], "margin": cfg.margin}
        if len(rows) < cfg.min_pairs:
            return finish("skipped", f"{len(rows)} qualifying pairs (< min_pairs {cfg.min_pairs})", detail,
                          n_pairs=len(rows))
        if not self_edits.writes(policy):
            return finish("skipped", f"self-edit policy {policy!r} writes nothing: no editor to measure", detail,
                          n_pairs=len(rows))

        # 2. held-out passages, none of the pairs' (checked before paying for training)
        t0 = time.perf_counter()
        held = heldout_passages(learner, {p["passage_id"] for p in pairs}, cfg.heldout)
        timings["heldout"] = time.perf_counter() - t0
        if not held:
            return finish("skipped", "no held-out passage with reward questions", detail, n_pairs=len(rows))
        check()

        # 3. the M-step: SFT a scratch copy of the editor on the pairs
        on_event(Event("sft", START, f"editor: SFT on {len(rows)} pairs"))
        if cfg.from_base:
            lora.restore(model, TRIAL, learner.zero)  # a fresh LoRA: the base model
        else:
            lora.copy_adapter(model, EDITOR, TRIAL)
        result = sft(learner, rows, cfg, TRIAL, on_event, should_stop)
        timings["sft"] = result.seconds
        on_event(Event("sft", END, steps=result.steps, loss=result.train_loss))
        if result.stopped:
            raise Abandoned
        detail |= {"sft_steps": result.steps, "losses": list(result.losses)}
        if not math.isfinite(result.train_loss):
            return finish("rejected", "non-finite SFT loss", detail, n_pairs=len(rows), train_loss=None)
        new_state = lora.snapshot(model, TRIAL)
        check()

        # 4. one self-edit per held-out passage from each editor (same seed), one trial each
        per_passage, before_all, after_all = _heldout_rewards(learner, held, policy, cfg, timings, check, on_event)
        detail |= {"heldout": per_passage}
        measured = dict(n_pairs=len(rows), n_heldout=len(before_all), train_loss=result.train_loss,
                        reward_before=_mean(before_all), reward_after=_mean(after_all))
        if not before_all:
            return finish("rejected", "every held-out trial failed (non-finite loss)", detail, **measured)
        before, after = measured["reward_before"], measured["reward_after"]
        if after < before - cfg.tolerance:
            return finish("rejected", f"held-out reward {after:+.4f} < {before:+.4f} before", detail, **measured)
        check()

        # 5. keep: commit the new editor (files, then the row and the round together) and load it
        lora.restore(model, TRIAL, new_state)
        recorded: list[EditorRound] = []
        reason = f"held-out reward {after:+.4f} >= {before:+.4f} before"

        def record(new_id: str) -> None:
            recorded.append(finish("kept", reason, detail, adapter_id=new_id, **measured))

        registry.commit(model, TRIAL, name=EDITOR, kind="restem", parent_id=parent, passage_id=None,
                        policy=policy, reward=after - before,
                        metrics={"reward_before": before, "reward_after": after, "n_pairs": len(rows),
                                 "n_heldout": len(before_all), "train_loss": result.train_loss},
                        in_transaction=record)
        learner.load_editor()
        return recorded[0]
    except Abandoned:
        return finish("abandoned", "stopped before the round finished: nothing committed", {})
    finally:
        model.set_adapter(KNOWLEDGE, inference_mode=True)
        model.eval()


def _heldout_rewards(learner: Learner, held: list[tuple[dict, list[dict]]], policy: str, cfg: EditorConfig,
                     timings: dict, check: Callable[[], None], on_event: OnEvent):
    """For each held-out passage, one self-edit from the active editor (or the base)
    and one from the new one (in ``trial``), with the same seed; then one trial
    update each, scored on the passage's reward questions. Returns (per-passage
    detail, paired rewards before, paired rewards after): a failed trial drops both."""
    t0 = time.perf_counter()
    edits = {}
    for passage, _ in held:
        seed = cfg.seed + passage["id"] * 1000
        edits[passage["id"]] = (
            learner.sample_self_edits(passage, [policy], seed),  # the active editor (or the base)
            learner.sample_self_edits(passage, [policy], seed, writer=TRIAL),  # the new one
        )
    timings["generate"] = time.perf_counter() - t0
    check()
    t0 = time.perf_counter()
    per_passage, before_all, after_all = [], [], []
    for passage, qs in held:
        on_event(Event("measure", START, f"editor: measuring on '{passage['title']}'"))
        baseline = learner.score(KNOWLEDGE, passage["title"], qs)
        teacher = learner.score(KNOWLEDGE, passage["title"], qs, context=passage["text"]) \
            if relative_to(learner.policies.reward) == "teacher" else None
        (old,), (new,) = edits[passage["id"]]
        cache: dict = {}
        trial_seed = cfg.seed + passage["id"]
        r_before, acc_before = _edit_reward(learner, passage, qs, baseline, policy, old[1], trial_seed, cache, teacher)
        check()
        r_after, acc_after = _edit_reward(learner, passage, qs, baseline, policy, new[1], trial_seed, cache, teacher)
        check()
        on_event(Event("measure", END))
        per_passage.append({"passage_id": passage["id"], "before": r_before, "after": r_after,
                            "acc_before": acc_before, "acc_after": acc_after,
                            "edit_before": old[1], "edit_after": new[1]})
        if r_before is not None and r_after is not None:
            before_all.append(r_before)
            after_all.append(r_after)
    timings["measure"] = time.perf_counter() - t0
    return per_passage, before_all, after_all
