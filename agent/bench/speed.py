"""Benchmark ``speed``: where one wake cycle spends its time, beside SEAL's reference settings.

One process runs the same wake cycle (``wake_cycle``, unchanged) twice on one passage,
each time in a fresh temporary home holding only that passage and its questions:

- **optimised**: seal's own path (batched generation and scoring, dynamic padding
  with the padding masked, the LM head only where there is loss, fused AdamW, one
  resident model with named adapters);
- **reference**: the settings of SEAL's inner loop (``TTT_server.py`` of the SEAL
  code): every training example padded to ``pad_to`` tokens with ``labels =
  input_ids``, so the padding is *not* masked out of the loss; batch 1; a fresh
  ``transformers.Trainer`` per trial (lr 1e-3); closed-book answers generated and
  graded one question at a time, and their log-likelihoods one at a time.

Both runs share the seed, so their self-edits are the same text; self-edit
generation, question building, commit and tracking are the same (batched) code in
both, which keeps the comparison conservative. Both runs train every trial for the
same number of epochs, and both commit their best trial (``min_gain`` is lowered for
the bench), so that every step runs in both.

Measured, in the same process: the machine's fp32 matrix-multiply FLOP/s (square
``torch.mm``, the benchmark's thread count), before and after the cycles; per step of
each cycle the wall time, the tokens (generated + trained + scored), the FLOPs of
every matrix multiply the model executed (``FlopMeter``: each ``F.linear`` and each
attention call, and the backward matmuls autograd runs for them; a frozen weight
gets no weight-gradient matmul, so none is counted), and the peak resident memory.
The meter is checked against ``torch.utils.flop_counter.FlopCounterMode`` on a short
real training step of each kind before the timed runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters import lora
from adapters.names import KNOWLEDGE, TRIAL
from adapters.registry import AdapterRegistry
from store import Store

from ..config import Config
from ..datasets import data_id
from ..events import END, START, WAKE_STEPS, Event
from ..learner import Learner
from ..runtime import Runtime
from ..wake import wake_cycle
from .common import draw, load_squad
from .continual import _ingest
from .meter import FlopMeter, _reset_peak_rss, flop_counter_mode, matmul_flops, peak_rss_mb
from .reference import SEAL_LR, reference_train, reference_trainer

MODES = ("optimised", "reference")
FORCE_COMMIT = -1e9  # min_gain for the bench: both runs commit, so every step runs in both


class SpeedError(ValueError):
    """The benchmark cannot run as asked (e.g. no passage to draw): one line."""


# ------------------------------------------------------------------ cutting a cycle into steps
class StepRecorder:
    """Cuts a wake cycle into consecutive steps; each gets its wall time, the FLOPs
    the meter counted meanwhile, its tokens and its peak resident memory. Time
    between the recorded calls (tokenising, selection, store writes) is the step
    ``other``; rows with the same label are summed."""

    def __init__(self, meter: FlopMeter) -> None:
        self.meter = meter
        self.rows: dict[str, dict] = {}
        self._open: dict | None = None
        self.train_results: dict[int, dict] = {}  # candidate index -> steps, tokens, final loss
        self.peak_resettable = _reset_peak_rss()

    def enter(self, kind: str, trial: int = 0) -> None:
        """Start step ``kind`` (of trial number ``trial``, for train and score)."""
        self._close()
        self.peak_resettable = _reset_peak_rss()
        self._open = {"kind": kind, "trial": trial, "label": f"{kind} {trial}" if trial else kind, "t0": time.perf_counter(),
                      "f0": self.meter.forward, "b0": self.meter.backward, "tokens": 0}

    def add_tokens(self, n: int) -> None:
        if self._open is not None:
            self._open["tokens"] += int(n)

    def finish(self) -> None:
        self._close()

    def on_event(self, e: Event) -> None:
        """The wake cycle's step events: a step's start opens it (a trial's train and
        score steps are numbered by candidate, from 1), its end returns to ``other``."""
        if e.step == "train" and e.phase == END:
            self.add_tokens(e.tokens)
            self.train_results[e.candidate] = {"steps": e.steps, "tokens": e.tokens, "final_loss": e.loss}
        if e.phase == START and e.step in WAKE_STEPS:
            self.enter(e.step, e.candidate + 1 if e.candidate is not None else 0)
        elif e.phase == END and e.step in WAKE_STEPS:
            self.enter("other")

    def _close(self) -> None:
        o, self._open = self._open, None
        if o is None:
            return
        row = self.rows.setdefault(o["label"], {"kind": o["kind"], "trial": o["trial"], "label": o["label"],
                                                "seconds": 0.0, "tokens": 0,
                                                "flops_forward": 0, "flops_backward": 0, "peak_rss_mb": 0.0})
        row["seconds"] += time.perf_counter() - o["t0"]
        row["tokens"] += o["tokens"]
        row["flops_forward"] += self.meter.forward - o["f0"]
        row["flops_backward"] += self.meter.backward - o["b0"]
        row["peak_rss_mb"] = max(row["peak_rss_mb"], peak_rss_mb())


@contextlib.contextmanager
def _count_tokens(runtime: Runtime, recorder: StepRecorder):
    """Generated tokens (every ``model.generate``: self-edits, answers, tracking) and
    scored answer tokens (``runtime.loglik``) go to the recorder's current step."""
    model = runtime.model
    generate, loglik = model.generate, runtime.loglik
    tok = runtime.tokenizer
    stop = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}

    def counted_generate(*args, **kwargs):
        seqs = generate(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = ids.shape[1] if ids is not None else 0
        for row in seqs[:, width:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            recorder.add_tokens(n)
        return seqs

    def counted_loglik(prompts, continuations, *args, **kwargs):
        out = loglik(prompts, continuations, *args, **kwargs)
        recorder.add_tokens(sum(ll.n_tokens for ll in out))
        return out

    model.generate, runtime.loglik = counted_generate, counted_loglik
    try:
        yield
    finally:
        del model.generate, runtime.loglik


# ------------------------------------------------------------------ one run
def _home(root: Path, name: str, data: list[dict]) -> tuple[Store, AdapterRegistry]:
    home = root / name
    (home / "adapters").mkdir(parents=True)
    store = Store(home / "store.db")
    _ingest(store, data)
    return store, AdapterRegistry(home / "adapters", store)


def _cycle(learner: Learner, meter: FlopMeter, say: Callable[[str], None], mode: str) -> dict:
    """One measured wake cycle of the learner's only pending passage, cut into steps
    by the cycle's own step events."""
    recorder = StepRecorder(meter)
    job = learner.store.claim_next(learner.worker)
    if job is None:
        raise SpeedError("the benchmark home has no pending passage")

    def on_event(e: Event) -> None:
        recorder.on_event(e)
        if e.message:
            say(f"{mode}: {e.message}")

    start_rss = peak_rss_mb()
    t0 = time.perf_counter()
    with _count_tokens(learner.runtime, recorder):
        recorder.enter("other")
        report = wake_cycle(learner, job, on_event=on_event)
        recorder.finish()
    total = time.perf_counter() - t0
    names = {r["idx"] + 1: f"{r['idx']}: {r['policy']}" for r in report.candidates}
    steps = []
    for row in recorder.rows.values():  # first occurrence order: the cycle's order
        label = f"{row['kind']} {names.get(row['trial'], row['trial'])}" if row["trial"] else row["label"]
        steps.append({**row, "label": label, "flops": row["flops_forward"] + row["flops_backward"]})
    steps.sort(key=lambda s: s["kind"] == "other")  # the glue last
    trials = []
    for r in report.candidates:
        res = recorder.train_results.get(r["idx"])
        if "train_seconds" in r and res is not None:
            trials.append({"idx": r["idx"], "policy": r["policy"], "n_examples": r["n_examples"],
                           "train_seconds": r["train_seconds"], "score_seconds": r["score_seconds"],
                           **res, "reward_logprob": r.get("reward_logprob"), "reward_acc": r.get("reward_acc")})
    return {
        "outcome": report.outcome, "reason": report.reason,
        "chosen": report.candidates[report.chosen]["policy"] if report.chosen is not None else None,
        "self_edits": [r["text"] for r in report.candidates],
        "candidates": [{"idx": r["idx"], "policy": r["policy"], "n_tokens": r["n_tokens"],
                        "n_examples": r["n_examples"], "trained": "train_seconds" in r, "note": r.get("note")}
                       for r in report.candidates],
        "steps": steps, "trials": trials, "cycle_timings": report.timings,
        "seconds": total, "tokens": sum(s["tokens"] for s in steps),
        "flops": sum(s["flops"] for s in steps),
        "peak_rss_mb": max([start_rss, *(s["peak_rss_mb"] for s in steps)]),
    }


def measured_learner(runtime: Runtime, home: tuple[Store, AdapterRegistry], lora_cfg: lora.LoraConfig,
                     policies, wake_cfg, mode: str, pad_to: int, distill=None) -> Learner:
    """A Learner on the resident model for one mode: the optimised one is seal's own;
    the reference trains with SEAL's inner loop and scores one question at a time."""
    if mode == "reference":
        return Learner(runtime, *home, lora_cfg, policies, wake_cfg, train_fn=reference_trainer(pad_to), score_batch=1,
                       distill=distill)
    return Learner(runtime, *home, lora_cfg, policies, wake_cfg, distill=distill)


def _warm_up(learner: Learner) -> None:
    """Untimed: first calls of each kind (allocators, kernels, lazy imports), and the
    tracking's base-model distributions (computed once per process, so neither run
    pays for them)."""
    rt, model = learner.runtime, learner.model
    rt.generate([rt.chat("Say hello."), rt.chat("Say hello, please.")], max_new_tokens=4)
    rt.loglik([rt.chat("Say hello.")], ["Hello."])
    lora.copy_adapter(model, KNOWLEDGE, TRIAL)
    lora.train(model, rt.tokenizer, [lora.Example("", "A short text to warm up the training step.")],
               dataclasses.replace(learner.lora_cfg, epochs=1), adapter=TRIAL)
    model.set_adapter(KNOWLEDGE)
    if learner.cfg.track:
        from ..tracking import base_distributions

        base_distributions(learner)


def check_meter(learner: Learner, pad_to: int) -> dict:
    """One short training step of each kind on the real model, counted by the meter
    and by torch's FlopCounterMode at once: the meter's figures should equal the
    counter's matrix multiplies (``mm``, ``addmm``, attention); what else the counter
    sees (e.g. the rotary embedding's small ``bmm``) is reported as ``other``."""
    rt, model = learner.runtime, learner.model
    examples = [lora.Example("", "The Isle of Varn lies in the Grey Sea; its capital is Kelmora."),
                lora.Example(rt.chat("What is the capital of the Isle of Varn?"), "Kelmora", eos=True)]
    runs = {
        "optimised": lambda: lora.train(model, rt.tokenizer, examples, dataclasses.replace(learner.lora_cfg, epochs=1),
                                        adapter=TRIAL),
        "reference": lambda: reference_train(model, rt.tokenizer, examples[:1], adapter=TRIAL, epochs=1,
                                             pad_to=min(pad_to, 64)),
    }
    out = {}
    for mode, run in runs.items():
        lora.copy_adapter(model, KNOWLEDGE, TRIAL)
        with flop_counter_mode() as counter, FlopMeter() as meter:
            run()
        counts = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        matched = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm") or "attention" in k)
        out[mode] = {"meter": meter.total, "flop_counter": matched, "other": sum(counts.values()) - matched,
                     "ops": counts}
    model.set_adapter(KNOWLEDGE)
    return out


def run_speed(runtime: Runtime, cfg: Config, *, data_path: Path, seed: int = 0, split: str = "tune",
              candidates: int | None = None, epochs: int | None = None, pad_to: int = 2048,
              say: Callable[[str], None] = lambda _m: None, on_mode: Callable[[str], None] = lambda _m: None,
              matmul_n: int = 2048) -> dict:
    """Run the optimised and the reference wake cycle on one passage; the JSON-able result."""
    import peft
    import transformers

    if candidates is not None and candidates < 1:
        raise SpeedError("--candidates must be at least 1")
    if epochs is not None and epochs < 1:
        raise SpeedError("--epochs must be at least 1")
    if pad_to < 2:
        raise SpeedError("--pad-to must be at least 2")
    drawn = draw(load_squad(data_path), 1, seed, split, min_questions=4)
    if not drawn:
        raise SpeedError(f"{data_path}: no passage with 4 or more questions in the {split} split")
    passage = drawn[0]
    lora_cfg = dataclasses.replace(cfg.lora, epochs=epochs or cfg.lora.epochs)
    wake_cfg = dataclasses.replace(cfg.wake, candidates=candidates or cfg.wake.candidates, seed=seed)
    policies = dataclasses.replace(cfg.policies, min_gain=FORCE_COMMIT)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "machine": platform.machine(),
                "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}

    say("measuring matmul FLOP/s")
    before = matmul_flops(matmul_n)
    root = Path(tempfile.mkdtemp(prefix="seal-speed-"))
    stores: list[Store] = []
    try:
        homes = {mode: _home(root, mode, [passage]) for mode in MODES}
        stores += [s for s, _ in homes.values()]
        base = Learner(runtime, *homes["optimised"], lora_cfg, policies, wake_cfg, distill=cfg.distill)
        say("warming up")
        _warm_up(base)
        say("checking the FLOP meter against torch's FlopCounterMode")
        meter_check = check_meter(base, pad_to)
        modes = {}
        with FlopMeter() as meter:
            for mode in MODES:
                learner = measured_learner(runtime, homes[mode], lora_cfg, policies, wake_cfg, mode, pad_to, cfg.distill)
                on_mode(mode)
                modes[mode] = _cycle(learner, meter, say, mode)
                learner.reload_active()
        say("measuring matmul FLOP/s again")
        after = matmul_flops(matmul_n)
    finally:
        for s in stores:
            s.close()
        shutil.rmtree(root, ignore_errors=True)
    q = passage["questions"]
    return {
        "benchmark": "speed", "data": data_id(data_path), "split": split, "seed": seed,
        "passage": {"title": passage["title"], "questions": len(q), "words": len(passage["context"].split())},
        "candidates": wake_cfg.candidates, "epochs": lora_cfg.epochs, "configured_epochs": cfg.lora.epochs,
        "pad_to": pad_to, "reference_lr": SEAL_LR,
        "matmul": {"n": matmul_n, "threads": before["threads"], "device": before["device"],
                   "before": {k: before[k] for k in ("best", "median")},
                   "after": {k: after[k] for k in ("best", "median")},
                   "peak": max(before["best"], after["best"])},
        "meter_check": meter_check,
        "modes": modes,
        "same_self_edits": modes["optimised"]["self_edits"] == modes["reference"]["self_edits"],
        "config": {"lora": dataclasses.asdict(lora_cfg), "policies": dataclasses.asdict(policies),
                   "wake": dataclasses.asdict(wake_cfg), "model": runtime.name,
                   "model_config": {"device": cfg.model.device, "dtype": cfg.model.dtype,
                                    "threads": cfg.model.threads, "batch_size": cfg.model.batch_size}},
        "versions": versions,
        "notes": [
            "reference = SEAL's inner loop: examples padded to pad_to with labels = input_ids (padding carries "
            "loss), batch 1, a fresh transformers.Trainer per trial (lr 1e-3, default optimiser and schedule); "
            "answers generated and graded one question at a time, log-likelihoods one at a time",
            "self-edit generation, question building, commit and tracking are the same batched code in both runs "
            "(conservative: the reference would be slower still without them)",
            "both runs commit their best trial (min_gain lowered for the bench) so that every step runs in both",
            "tokens = generated + trained (non-padding, every epoch) + scored answer tokens",
            "FLOPs = executed matrix multiplies (linear layers, attention; backward only where a gradient is "
            "computed), counted by FlopMeter; % of matmul = FLOP/s / the best measured fp32 matmul FLOP/s",
        ],
    }


# ------------------------------------------------------------------ the tables
def _kind_totals(mode: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in mode["steps"]:
        t = out.setdefault(s["kind"], {"seconds": 0.0, "tokens": 0, "flops": 0, "peak_rss_mb": 0.0})
        t["seconds"] += s["seconds"]
        t["tokens"] += s["tokens"]
        t["flops"] += s["flops"]
        t["peak_rss_mb"] = max(t["peak_rss_mb"], s["peak_rss_mb"])
    return out


def _rate(n: float, secs: float, scale: float = 1.0, fmt: str = ".0f") -> str:
    return "-" if not n or secs <= 0 else format(n / secs / scale, fmt)


def _ratio(a: float, b: float) -> str:
    return "-" if a <= 0 or b <= 0 else f"{b / a:.1f}x"


def render(result: dict) -> list:
    """The benchmark as printable pieces (rich Tables and lines of text), in order."""
    from rich.table import Table

    opt, ref = result["modes"]["optimised"], result["modes"]["reference"]
    peak = result["matmul"]["peak"]
    p = result["passage"]
    lines = [
        f"seal bench speed: one wake cycle on '{p['title']}' ({result['split']} split, seed {result['seed']}), "
        f"trials {' + '.join(c['policy'] for c in opt.get('candidates', [])) or '?'}, {result['epochs']} epoch(s) per trial "
        f"(configured: {result['configured_epochs']}); model {result['config']['model']}",
        f"machine: fp32 matmul {result['matmul']['n']}x{result['matmul']['n']}, threads: "
        f"{result['matmul']['threads']}: best {result['matmul']['before']['best'] / 1e9:.1f} GFLOP/s (median "
        f"{result['matmul']['before']['median'] / 1e9:.1f}), after the runs {result['matmul']['after']['best'] / 1e9:.1f}; "
        f"% of matmul below is of {peak / 1e9:.1f} GFLOP/s",
        f"reference = SEAL's inner loop: examples padded to {result['pad_to']} tokens, padding not masked out of "
        "the loss, batch 1, a fresh transformers.Trainer per trial (lr 1e-3); answers generated and graded one at "
        "a time, log-likelihoods one at a time",
        "self-edit generation (and question building, commit, tracking) is the same batched code in both runs, "
        "which keeps the comparison conservative; same self-edits in both: "
        + ("yes" if result["same_self_edits"] else "NO"),
    ]
    skipped = [c for c in opt.get("candidates", []) if not c["trained"]]
    if skipped:
        lines.append(f"not trained in either run: self-edit{'s' if len(skipped) > 1 else ''} "
                     + ", ".join(str(c["idx"]) for c in skipped)
                     + " (nothing usable beyond the passage: the same as the passage-only trial)")
    labels = list(dict.fromkeys([s["label"] for s in opt["steps"]] + [s["label"] for s in ref["steps"]]))
    by = {m: {s["label"]: s for s in result["modes"][m]["steps"]} for m in MODES}
    steps = Table(title="time per step (s), tokens/s; ref/opt = how many times slower the reference is",
                  box=None, pad_edge=False, title_justify="left")
    for col in ("step", "tokens", "opt s", "ref s", "ref/opt", "opt tok/s", "ref tok/s"):
        steps.add_column(col, justify="left" if col == "step" else "right", no_wrap=True, max_width=22 if col == "step" else None)
    empty = {"seconds": 0.0, "tokens": 0}
    for label in labels:
        o, r = by["optimised"].get(label, empty), by["reference"].get(label, empty)
        steps.add_row(label[:22], str(o["tokens"] or r["tokens"] or "-"), f"{o['seconds']:.1f}", f"{r['seconds']:.1f}",
                      _ratio(o["seconds"], r["seconds"]), _rate(o["tokens"], o["seconds"]), _rate(r["tokens"], r["seconds"]))
    steps.add_row("total", str(opt["tokens"]), f"{opt['seconds']:.1f}", f"{ref['seconds']:.1f}",
                  _ratio(opt["seconds"], ref["seconds"]), _rate(opt["tokens"], opt["seconds"]),
                  _rate(ref["tokens"], ref["seconds"]))
    compute = Table(title="compute: GFLOP/s and % of the measured matmul FLOP/s; peak resident memory (MB)",
                    box=None, pad_edge=False, title_justify="left")
    for col in ("step", "opt GFLOP/s", "opt %", "ref GFLOP/s", "ref %", "opt MB", "ref MB"):
        compute.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)
    kinds = {m: _kind_totals(result["modes"][m]) for m in MODES}
    for kind in dict.fromkeys([*kinds["optimised"], *kinds["reference"]]):
        o, r = kinds["optimised"].get(kind), kinds["reference"].get(kind)
        cells = []
        for t in (o, r):
            cells += ["-", "-"] if t is None else [_rate(t["flops"], t["seconds"], 1e9, ".1f"),
                                                   _rate(t["flops"], t["seconds"] * peak / 100, 1, ".0f")]
        compute.add_row(kind, *cells, *(f"{t['peak_rss_mb']:.0f}" if t else "-" for t in (o, r)))
    compute.add_row("total", _rate(opt["flops"], opt["seconds"], 1e9, ".1f"),
                    _rate(opt["flops"], opt["seconds"] * peak / 100, 1, ".0f"),
                    _rate(ref["flops"], ref["seconds"], 1e9, ".1f"),
                    _rate(ref["flops"], ref["seconds"] * peak / 100, 1, ".0f"),
                    f"{opt['peak_rss_mb']:.0f}", f"{ref['peak_rss_mb']:.0f}")
    train_o, train_r = kinds["optimised"].get("train"), kinds["reference"].get("train")
    summary = [f"total: optimised {opt['seconds']:.1f} s, reference {ref['seconds']:.1f} s: the optimised cycle is "
               f"{ref['seconds'] / opt['seconds']:.1f}x faster"]
    if train_o and train_r:
        summary.append(
            f"training: optimised {train_o['seconds']:.1f} s at {train_o['flops'] / train_o['seconds'] / 1e9:.1f} GFLOP/s "
            f"({100 * train_o['flops'] / train_o['seconds'] / peak:.0f}% of matmul), reference {train_r['seconds']:.1f} s "
            f"at {train_r['flops'] / train_r['seconds'] / 1e9:.1f} GFLOP/s "
            f"({100 * train_r['flops'] / train_r['seconds'] / peak:.0f}%); the reference executes "
            f"{train_r['flops'] / max(train_o['flops'], 1):.1f}x the FLOPs")
        if result["epochs"] != result["configured_epochs"]:
            k = result["configured_epochs"] / result["epochs"]
            summary.append(f"at the configured {result['configured_epochs']} epochs, training would take about "
                           f"{train_o['seconds'] * k:.0f} s optimised and {train_r['seconds'] * k:.0f} s reference "
                           "(scaled by epochs, not measured)")
    check = result.get("meter_check") or {}
    if check:
        summary.append("FLOP meter vs torch FlopCounterMode on a short real step: " + ", ".join(
            f"{m} {c['meter'] / max(c['flop_counter'], 1):.4f}" for m, c in check.items()) + " (1 = equal)")
    return [*lines, steps, compute, *summary]


def dumps(result: dict) -> str:
    return json.dumps(result, indent=1)
