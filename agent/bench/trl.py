"""Benchmark ``trl``: seal's on-policy distillation trial beside TRL's ``SDFTTrainer``, for speed.

The issue asked to use TRL's loss helpers or trainers where they serve, measured
against seal's loop. Both sides learn the same passage from the same transfer
prompts (``policies.transfer.prompts`` of one ``distill_onpolicy`` self-edit, written
once per passage and shared), on the same weights with the same LoRA shape and rate:

- **seal** (``distill_onpolicy``, as ``agent.trial.examples_of`` + ``Learner.trial``
  run it): the student answers every prompt once, closed book (greedy +
  ``distill.samples`` sampled: ``teacher.answer(onpolicy=True)``); the open-book
  teacher scores those answers once (its top-k log-probabilities, ``teacher.targets``);
  then ``lora.train`` runs its epochs over the fixed set (top-k KL with a tail bucket,
  the passage itself beside it when ``distill.keep_passage``);
- **trl** (``trl.experimental.sdft.SDFTTrainer``, ``distillation_mode="topk_logits"``,
  on a copy of the base model with a fresh LoRA of seal's shape): every optimizer step
  samples new completions for its prompts with ``model.generate``, runs the teacher
  forward on them, then the student forward and backward. Its ``train()`` is timed
  whole, so its seconds include its on-policy generation and teacher passes, every
  step; seal's generation and scoring are timed apart and counted once.

TRL runs the same number of optimizer steps as seal's trial took (or ``steps``). The
teacher prompts are seal's own, checked token for token on every TRL step: no single
``teacher_prompt_template`` makes them (a question's open-book form gains "using the
passage", an "explain X" loses its "Topic:" line), so the teacher's whole user turn
rides in ``privileged_context`` and a one-method builder puts it there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from adapters import lora
from adapters.names import KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from policies import transfer
from policies.self_edit import DistillOnPolicy, passage_text
from store import Store

from .. import teacher
from ..config import Config
from ..datasets import data_id
from ..learner import Learner
from ..runtime import Runtime
from .common import DEFAULT_DATA, draw, load_squad, versions

POLICY = DistillOnPolicy.name


class TrlBenchError(ValueError):
    """The benchmark cannot run as asked (no passage to draw, a bad count): one line."""


# ------------------------------------------------------------------ seal's side
def _warm_up(learner: Learner) -> None:
    """Untimed: the first generation and training step of the process (allocators,
    kernels, lazy imports), which would otherwise land on seal's first passage."""
    rt = learner.runtime
    rt.generate([rt.chat("Say hello."), rt.chat("Say hello, please.")], max_new_tokens=4)
    learner.trial([lora.Example("", "A short text to warm up the training step.")], 0, epochs=1)


def _seal(learner: Learner, passage: dict, edit: str, seed: int) -> dict:
    """One ``distill_onpolicy`` trial on ``edit``: what ``examples_of`` and
    ``Learner.trial`` do for it, each part timed."""
    cfg = learner.distill
    t0 = time.perf_counter()
    items = teacher.answer(learner, passage, edit, cfg, seed, onpolicy=True)
    t1 = time.perf_counter()
    examples = teacher.targets(learner, items, cfg.top_k)
    t2 = time.perf_counter()
    if not items:
        raise TrlBenchError(f"{passage['title']}: the student answered no transfer prompt: nothing to distil")
    if cfg.keep_passage:  # as examples_of: the passage itself beside the transfer set
        examples = [lora.Example("", passage_text(passage["title"], passage["text"])), *examples]
    result = learner.trial(examples, seed, epochs=cfg.epochs or None)
    t3 = time.perf_counter()
    changed = max(float(p.abs().max()) for k, p in lora.snapshot(learner.model, TRIAL).items() if "lora_B" in k)
    total = t3 - t0
    return {
        "answers": len(items), "examples": len(examples), "generate_s": t1 - t0, "score_s": t2 - t1,
        "train_s": t3 - t2, "total_s": total, "steps": result.steps, "tokens": result.tokens,
        "train_s_per_step": (t3 - t2) / max(result.steps, 1), "s_per_step": total / max(result.steps, 1),
        "losses": list(result.losses), "final_loss": result.final_loss,
        "first_loss": result.losses[0] if result.losses else math.nan,
        "losses_finite": not result.nan and all(math.isfinite(v) for v in result.losses),
        "adapter_max_abs_b": changed,
    }


# ------------------------------------------------------------------ TRL's side
def plain_copy(model):
    """A copy of the runtime's base model with no LoRA layer: the runtime's model may
    be a ``PeftModel`` already (a Learner attaches its adapters in place); its copy is
    unloaded (LoRA layers removed, base weights untouched, nothing merged)."""
    from peft import PeftModel

    out = copy.deepcopy(model)
    if isinstance(out, PeftModel):
        out = out.unload()
    leftover = [n for n, _ in out.named_parameters() if "lora_" in n]
    if leftover:
        raise TrlBenchError(f"the copied model still holds LoRA weights (e.g. {leftover[0]})")
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _trl_pieces():
    """TRL's trainer, config and a teacher-prompt builder that takes seal's teacher
    turn whole from ``privileged_context`` (imported here: TRL is slow to import)."""
    with warnings.catch_warnings():  # "trl.experimental: APIs here are unstable": known, and why it is measured
        warnings.simplefilter("ignore")
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
        from trl.experimental.sdft.sdft_trainer import DemonstrationTeacherContextBuilder

    class SealTeacherPrompts(DemonstrationTeacherContextBuilder):
        """The teacher's user turn is seal's ``Prompt.teacher`` (in ``privileged_context``);
        the student's system turn, if any, is kept as TRL keeps it."""

        def _compose_teacher_prompt(self, prompt, privileged_context):
            return [*prompt[:-1], {"role": "user", "content": privileged_context}]

    return SDFTConfig, SDFTTrainer, SealTeacherPrompts


def _suffix_match(row: list[int], candidates: list[list[int]], pad: int) -> list[int] | None:
    """The candidate that ``row`` (a left-padded prompt) ends with, padding before it."""
    for ids in candidates:
        n = len(ids)
        if n <= len(row) and row[len(row) - n:] == ids and all(t == pad for t in row[: len(row) - n]):
            return ids
    return None


def _recorder(tokenizer, student: list[list[int]], teacher_ids: list[list[int]]):
    """A TrainerCallback that times each TRL step's rollout (from the step's start to
    its batch being built: sampling, tokenising) and checks every row's prompts
    against seal's token ids."""
    from transformers import TrainerCallback

    pad = tokenizer.pad_token_id

    class Recorder(TrainerCallback):
        def __init__(self):
            self.rollout_s, self.generated, self.student_tokens, self.rows, self.mismatched = 0.0, 0, 0, 0, 0
            self.step_s: list[float] = []
            self._t0 = self._t_step = None

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = self._t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self._t_step)

        def on_self_distillation_batch_prepared(self, *, prompt_ids, completion_ids, teacher_input_ids,
                                                teacher_attention_mask, **kw):
            if self._t0 is not None:
                self.rollout_s += time.perf_counter() - self._t0
                self._t0 = None
            width = completion_ids.shape[1]
            c_mask = teacher_attention_mask[:, teacher_input_ids.shape[1] - width:]
            t_mask = teacher_attention_mask[:, : teacher_input_ids.shape[1] - width].bool()
            for r in range(prompt_ids.shape[0]):
                self.rows += 1
                n = int(c_mask[r].sum())
                self.generated += n
                s = _suffix_match(prompt_ids[r].tolist(), student, pad)
                t = teacher_input_ids[r, : t_mask.shape[1]][t_mask[r]].tolist()
                self.student_tokens += n + (len(s) if s else 0)
                self.mismatched += s is None or t not in teacher_ids

    return Recorder()


def sdft_settings(cfg: Config) -> dict:
    """The ``SDFTConfig`` fields that make TRL's run seal's trial where TRL lets it: seal's
    LoRA rate (constant, no warm-up), clipping and weight decay; answers of
    ``distill.answer_tokens``, one per seal answer (greedy + ``samples``), sampled as
    seal samples; top-k KL from the teacher (alpha 0) with a tail bucket (TRL's defaults:
    alpha 0.5, no tail); the teacher is the model before the update; no activation
    checkpointing (TRL's default is on: seal does not checkpoint); no vLLM."""
    d, lcfg = cfg.distill, cfg.lora
    return {
        "learning_rate": lcfg.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "weight_decay": lcfg.weight_decay, "max_grad_norm": lcfg.grad_clip, "gradient_accumulation_steps": 1,
        "activation_checkpointing": False, "use_vllm": False,
        "num_generations": 1 + d.samples, "max_completion_length": d.answer_tokens, "max_prompt_length": None,
        # TRL divides the loss's logits by `temperature`: 1 keeps them as seal's; sampling gets seal's temperature
        "temperature": 1.0, "generation_kwargs": {"temperature": d.temperature, "top_p": 0.95},
        "distillation_mode": "topk_logits", "distillation_topk": d.top_k, "distillation_alpha": 0.0,
        "distillation_add_tail": True, "teacher_model_kind": "base",
    }


def _trl(runtime: Runtime, cfg: Config, todo: list[transfer.Prompt], steps: int, seed: int) -> dict:
    """``SDFTTrainer`` on a fresh copy of the base model and ``todo``'s prompts, for
    ``steps`` optimizer steps; its setup and ``train()`` timed apart."""
    import datasets
    from transformers.trainer_callback import PrinterCallback

    SDFTConfig, SDFTTrainer, SealTeacherPrompts = _trl_pieces()
    rt, lcfg, dcfg = runtime, cfg.lora, cfg.distill
    system = rt.cfg.system_prompt or None
    rows = [{"prompt": ([{"role": "system", "content": system}] if system else [])
             + [{"role": "user", "content": p.student}], "privileged_context": p.teacher} for p in todo]
    n_gen = 1 + dcfg.samples  # seal: one greedy answer and `samples` sampled ones per prompt
    per_step = max(1, min(lcfg.batch_size // n_gen, len(rows)))  # prompts per step; rows per step = x n_gen
    tok = rt.tokenizer
    student = [tok(rt.chat(p.student), add_special_tokens=False)["input_ids"] for p in todo]
    teacher_ids = [tok(rt.chat(p.teacher), add_special_tokens=False)["input_ids"] for p in todo]
    device = rt.device
    dtype = next(rt.model.parameters()).dtype
    out_dir = Path(tempfile.mkdtemp(prefix="seal-bench-trl-"))
    t0 = time.perf_counter()
    try:
        args = SDFTConfig(
            output_dir=str(out_dir), report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
            max_steps=steps, per_device_train_batch_size=n_gen * per_step, seed=seed, data_seed=seed,
            use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=False, **sdft_settings(cfg))
        model = plain_copy(rt.model).to(device)
        with warnings.catch_warnings():  # transformers' renames (gradient -> activation checkpointing), inside TRL
            warnings.simplefilter("ignore", FutureWarning)
            trainer = SDFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=copy.deepcopy(tok), peft_config=lora._peft_config(lcfg))
        trainer.teacher_context_builder = SealTeacherPrompts(trainer)
        trainer.remove_callback(PrinterCallback)  # it prints every step's log line: the losses are read below
        recorder = _recorder(tok, student, teacher_ids)
        trainer.add_callback(recorder)
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        before = lora.snapshot(peft_model, "default")
        setup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t1
        after = lora.snapshot(peft_model, "default")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        done = trainer.state.global_step
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "setup_s": setup_s, "train_s": train_s, "steps": done, "s_per_step": train_s / max(done, 1),
        "rollout_s": recorder.rollout_s, "rest_s": train_s - recorder.rollout_s,
        "step_s_median": statistics.median(recorder.step_s) if recorder.step_s else None,
        "prompts_per_step": per_step, "rows_per_step": n_gen * per_step, "generated_tokens": recorder.generated,
        "tokens": recorder.student_tokens, "rows": recorder.rows, "prompts_mismatched": recorder.mismatched,
        "same_prompts": recorder.rows > 0 and recorder.mismatched == 0,
        "losses": losses, "first_loss": losses[0] if losses else math.nan,
        "final_loss": losses[-1] if losses else math.nan,
        "losses_finite": bool(losses) and all(math.isfinite(v) for v in losses),
        "adapter_max_abs_change": max(float((after[k] - before[k]).abs().max()) for k in before),
    }


# ------------------------------------------------------------------ the run
def _median(rows: list[dict], side: str, key: str) -> float:
    return statistics.median(r[side][key] for r in rows)


def run_trl(runtime: Runtime, cfg: Config, *, data_path: Path | None = None, passages: int = 2, seed: int = 0,
            split: str = "tune", steps: int | None = None, say: Callable[[str], None] = lambda _m: None,
            on_passage: Callable[[int, int], None] = lambda _i, _n: None) -> dict:
    """Per passage: seal's ``distill_onpolicy`` trial, then TRL's ``SDFTTrainer`` on the
    same prompts (see the module's docstring); the JSON-able result."""
    import trl

    if passages < 1:
        raise TrlBenchError("--passages must be at least 1")
    if steps is not None and steps < 1:
        raise TrlBenchError("--steps must be at least 1")
    path = Path(data_path) if data_path else DEFAULT_DATA
    data = draw(load_squad(path), passages, seed, split)
    if not data:
        raise TrlBenchError(f"{path}: no passage with 3 or more questions in the {split} split")
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="seal-bench-trl-home-"))
    store = Store(tmp / "store.db")  # a fresh home: nothing learned
    try:
        learner = Learner(runtime, store, AdapterRegistry(tmp / "adapters", store), cfg.lora, cfg.policies,
                          cfg.wake, distill=cfg.distill)
        say("warming up")
        _warm_up(learner)
        for i, d in enumerate(data):
            passage = {"title": d["title"], "text": d["context"]}
            lora.restore(learner.model, KNOWLEDGE, learner.zero)  # every passage starts from the base model
            say(f"[{i + 1}/{len(data)}] {d['title']}: writing questions")
            t0 = time.perf_counter()
            [(_, edit, edit_tokens)] = learner.sample_self_edits(passage, [POLICY], seed=seed * 7919 + i)
            write_s = time.perf_counter() - t0
            todo = transfer.prompts(passage["title"], passage["text"], edit, cfg.distill)
            trial_seed = seed + 31 * i
            say(f"[{i + 1}/{len(data)}] {d['title']}: seal")
            seal = _seal(learner, passage, edit, trial_seed)
            say(f"[{i + 1}/{len(data)}] {d['title']}: trl, {steps or seal['steps']} steps")
            trl_row = _trl(runtime, cfg, todo, steps or seal["steps"], trial_seed)
            rows.append({"index": i, "title": d["title"], "words": len(d["context"].split()),
                         "write_s": write_s, "edit_tokens": edit_tokens, "prompts": len(todo),
                         "kinds": {k: sum(p.kind == k for p in todo) for k in ("question", "about", "explain")},
                         "seal": seal, "trl": trl_row})
            on_passage(i + 1, len(data))
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    seal_sps, trl_sps = _median(rows, "seal", "s_per_step"), _median(rows, "trl", "s_per_step")
    same_steps = all(r["trl"]["steps"] == r["seal"]["steps"] for r in rows)
    medians = {
        "seal_generate_s": _median(rows, "seal", "generate_s"), "seal_score_s": _median(rows, "seal", "score_s"),
        "seal_train_s": _median(rows, "seal", "train_s"), "seal_total_s": _median(rows, "seal", "total_s"),
        "seal_steps": _median(rows, "seal", "steps"), "seal_s_per_step": seal_sps,
        "seal_train_s_per_step": _median(rows, "seal", "train_s_per_step"),
        "trl_setup_s": _median(rows, "trl", "setup_s"), "trl_train_s": _median(rows, "trl", "train_s"),
        "trl_rollout_s": _median(rows, "trl", "rollout_s"), "trl_steps": _median(rows, "trl", "steps"),
        "trl_s_per_step": trl_sps,
    }
    config = {"lora": dataclasses.asdict(cfg.lora), "distill": dataclasses.asdict(cfg.distill), "policy": POLICY,
              "model": runtime.name, "device": str(runtime.device), "trl": sdft_settings(cfg)}
    return {
        "benchmark": "trl", "data": data_id(path), "split": split, "seed": seed, "passages": len(rows),
        "steps": steps, "same_steps": same_steps,
        "rows": rows, "medians": medians,
        "ratio_s_per_step": trl_sps / seal_sps if seal_sps > 0 else None,
        "ratio_train_s_per_step": trl_sps / medians["seal_train_s_per_step"]
        if medians["seal_train_s_per_step"] > 0 else None,
        # totals compare only when TRL ran as many steps as seal did
        "ratio_total": medians["trl_train_s"] / medians["seal_total_s"] if same_steps and medians["seal_total_s"] > 0
        else None,
        "config": json.loads(json.dumps(config)),  # as it reads back from the file
        "versions": {**versions(), "trl": trl.__version__},
        "notes": [
            "seal s/step = (student answers + teacher top-k scoring + training) / optimizer steps: its on-policy "
            "answers are generated once per trial, before training",
            "trl s/step = SDFTTrainer.train() wall time / optimizer steps: every step samples new completions "
            "(model.generate), runs the teacher forward on them, then the student forward and backward; its "
            "setup (model copy, PEFT wrap, accelerate, dataset) is timed apart and in neither ratio",
            "seal's answers per prompt: one greedy and distill.samples sampled (duplicates dropped); TRL's: "
            "num_generations sampled, every step",
            "seal's teacher support is the teacher's top-k, computed once; TRL's topk_logits support is the "
            "student's top-k, recomputed every step; both forward KL with a tail bucket here",
            "seal also trains on the passage itself (distill.keep_passage) in the same steps; TRL's dataset has "
            "only the transfer prompts",
            "the writer's questions (write_s) are generated once per passage and shared: in neither side's time",
        ],
    }


# ------------------------------------------------------------------ the table
def render(result: dict) -> list:
    """The benchmark as printable pieces (a rich Table and lines of text), in order."""
    from rich.table import Table

    c = result["config"]
    lines = [f"seal bench trl: on-policy distillation ({c['policy']}), {result['passages']} passage(s) "
             f"({result['split']} split, seed {result['seed']}); model {c['model']} on {c['device']}; "
             f"top-k {c['distill']['top_k']}, answers of up to {c['distill']['answer_tokens']} tokens, "
             f"{c['trl']['num_generations']} per prompt",
             "seal answers and scores its prompts once, then trains; TRL samples new answers and runs the "
             "teacher on them every step, inside its train()"]
    table = Table(title="seconds per passage (TRL: gen = its rollouts, train = the rest)",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("passage", "side", "steps", "gen", "score", "train", "total", "s/step", "trl/seal"):
        table.add_column(col, justify="left" if col in ("passage", "side") else "right", no_wrap=True,
                         max_width=20 if col == "passage" else None)
    for r in result["rows"]:
        s, t = r["seal"], r["trl"]
        table.add_row(r["title"][:20], "seal", str(s["steps"]), f"{s['generate_s']:.1f}", f"{s['score_s']:.1f}",
                      f"{s['train_s']:.1f}", f"{s['total_s']:.1f}", f"{s['s_per_step']:.2f}", "")
        table.add_row("", "trl", str(t["steps"]), f"{t['rollout_s']:.1f}", "-", f"{t['rest_s']:.1f}",
                      f"{t['train_s']:.1f}", f"{t['s_per_step']:.2f}",
                      f"{t['s_per_step'] / s['s_per_step']:.1f}x" if s["s_per_step"] > 0 else "-")
    m = result["medians"]
    summary = [f"median s/step: seal {m['seal_s_per_step']:.2f} (training alone {m['seal_train_s_per_step']:.2f}), "
               f"TRL {m['trl_s_per_step']:.2f}: TRL takes {result['ratio_s_per_step']:.1f}x seal's time per step; "
               f"{m['trl_rollout_s'] / max(m['trl_train_s'], 1e-9):.0%} of TRL's time is its per-step rollout"]
    if result["ratio_total"] is not None:
        summary.append(f"median total: seal {m['seal_total_s']:.1f} s, TRL {m['trl_train_s']:.1f} s for the same "
                       f"steps ({result['ratio_total']:.1f}x); TRL's setup {m['trl_setup_s']:.1f} s apart")
    else:
        summary.append(f"TRL ran {m['trl_steps']:.0f} steps, seal {m['seal_steps']:.0f}: at seal's steps TRL would "
                       f"take about {m['trl_s_per_step'] * m['seal_steps']:.0f} s against seal's "
                       f"{m['seal_total_s']:.0f} s (scaled by steps, not measured)")
    bad = [r["title"] for r in result["rows"] if not r["trl"]["same_prompts"]]
    summary.append("TRL's student and teacher prompts are seal's, token for token: "
                   + ("yes" if not bad else f"NO ({', '.join(bad)})"))
    return [*lines, table, *summary]
