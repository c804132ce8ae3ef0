"""What is tracked per knowledge adapter version: the forgetting matrix, general drift
and verbatim memorisation (docs/architecture.md, "What is tracked").

- *Retention* (the forgetting matrix's cells): closed-book accuracy and answer
  log-likelihood of each learned passage's probe questions, graded as in the wake
  cycle (``Learner.score``). ``forgetting_summary`` turns the stored matrix into
  per-passage at-learning / best / current / forgetting and the overall average
  accuracy, backward transfer and retention.
- *General drift*: the mean per-token KL(base || current) of next-token distributions
  on a fixed set of generic texts (``data/generic_prompts.txt``), teacher-forced; and
  open-book reading accuracy on a fixed held-out set (``data/reading.jsonl``): a model
  that drifted far from its base reads worse, even with the answer in front of it.
- *Verbatim memorisation*: greedy continuation of a passage's first tokens, exactly as
  it was trained (``passage_text``: title, newline, text; no BOS), compared with the
  true next tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.batch import pad_batch
from adapters.names import KNOWLEDGE
from policies.questions import answer_prompt
from policies.reward import Scores, is_correct, token_f1
from policies.self_edit import passage_text

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data"
TOP_K = 1024  # base tokens kept per position for the KL (the rest is one bin)
READING_TOKENS = 24  # longest open-book answer (the reading set's answers are short)


# ------------------------------------------------------------------ the fixed sets
def generic_texts() -> list[str]:
    lines = (DATA / "generic_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]


def reading_set() -> list[dict]:
    """One row per question: title, context, question, answer."""
    rows = []
    for line in (DATA / "reading.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            rows += [{"title": rec["title"], "context": rec["context"], **q} for q in rec["questions"]]
    return rows


# ------------------------------------------------------------------ general drift
@dataclass(frozen=True)
class _BaseDists:
    """The base model's next-token distributions on the generic texts, reduced to its
    top-k tokens per position plus one bin for the rest (a few MB, not a full
    vocabulary per position)."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask) per batch
    idx: torch.Tensor  # (N, k) token ids, N = real positions over all texts
    logp: torch.Tensor  # (N, k) base log-probabilities, float64
    rest: torch.Tensor  # (N,) base log-probability of every other token together
    n_texts: int


def _batches(runtime, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tok = runtime.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    size = runtime.cfg.batch_size
    return [pad_batch(ids[start : start + size], pad) for start in range(0, len(ids), size)]


@torch.no_grad()
def _log_probs(model, batches) -> torch.Tensor:
    """(N, V) next-token log-probabilities at every real position, in a fixed order."""
    device = next(model.parameters()).device
    rows = []
    for ids, mask in batches:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        rows.append(logp[mask.to(device).bool()].cpu())
    return torch.cat(rows)


def _log_rest(logp_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp_top))) per row, in float64, floored (the rest may be ~0)."""
    rest = 1.0 - logp_top.double().exp().sum(dim=-1)
    return rest.clamp_min(1e-30).log()


def base_distributions(learner) -> _BaseDists:
    """Computed once per learner (adapters disabled) and cached on it."""
    cached = getattr(learner, "_drift_base", None)
    if cached is not None:
        return cached
    model, rt = learner.model, learner.runtime
    texts = generic_texts()
    batches = _batches(rt, texts)
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            logp = _log_probs(model, batches)
    finally:
        model.train(was_training)
    top, idx = logp.topk(min(TOP_K, logp.shape[-1]), dim=-1)
    base = _BaseDists(batches, idx, top.double(), _log_rest(top), len(texts))
    learner._drift_base = base
    return base


def kl_from_base(learner, adapter: str) -> tuple[float, int]:
    """Mean per-token KL(base || model with ``adapter``) on the generic texts, over the
    base's top-k tokens and one bin for the rest (a lower bound of the full KL, tight
    when the base puts little mass outside its top k). Returns (kl, texts)."""
    base = base_distributions(learner)
    model = learner.model
    model.set_adapter(adapter)
    was_training = model.training
    model.eval()
    try:
        logp = _log_probs(model, base.batches)
    finally:
        model.train(was_training)
    cur_top = logp.gather(-1, base.idx).double()
    cur_rest = _log_rest(cur_top)
    p_top, p_rest = base.logp.exp(), base.rest.exp()
    kl = (p_top * (base.logp - cur_top)).sum(-1) + p_rest * (base.rest - cur_rest)
    return float(kl.mean()), base.n_texts


def reading_accuracy(learner, adapter: str) -> tuple[float, int]:
    """Open-book accuracy on the fixed reading set (graded like the wake cycle)."""
    rows = reading_set()
    rt = learner.runtime
    learner.model.set_adapter(adapter)
    prompts = [rt.chat(answer_prompt(r["question"], title=r["title"], context=r["context"])) for r in rows]
    # one batch: the set is small, and a second, short batch costs nearly as much as the first
    gens = rt.generate(prompts, max_new_tokens=min(learner.cfg.answer_tokens, READING_TOKENS),
                       batch_size=max(rt.cfg.batch_size, len(prompts)))
    correct = [is_correct(g.text, r["answer"]) for g, r in zip(gens, rows, strict=True)]
    return sum(correct) / len(rows), len(rows)


def drift(learner, adapter: str) -> dict:
    """General drift of the model with ``adapter`` active: the drift table's columns."""
    kl, n_prompts = kl_from_base(learner, adapter)
    acc, n_reading = reading_accuracy(learner, adapter)
    learner.model.set_adapter(KNOWLEDGE)
    return {"kl": kl, "reading_acc": acc, "n_prompts": n_prompts, "n_reading": n_reading}


# ------------------------------------------------------------ verbatim memorisation
@torch.no_grad()
def _greedy(model, tokenizer, prefixes: list[list[int]], n: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations of token-id prefixes (left-padded batches), ``n`` tokens each."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prefixes), batch_size):
        ids, mask = pad_batch(prefixes[start : start + batch_size], pad, side="left")
        width = ids.shape[1]
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                              do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += [row[width:].tolist() for row in seqs.cpu()]
    return out


def memorisation(learner, adapter: str, passage_ids: list[int], prefix_tokens: int = 32,
                 n_tokens: int = 32) -> list[dict]:
    """Greedy continuation of each passage's first ``prefix_tokens`` tokens (as trained:
    title, newline, text) against its true next ``n_tokens``. A short passage is split
    in half. Rows for ``store.add_memorisation`` (without adapter_id)."""
    passages = {pid: learner.store.passage(pid) for pid in passage_ids}
    return continuation_match(learner, adapter, {pid: (p["title"], p["text"]) for pid, p in passages.items() if p},
                              prefix_tokens, n_tokens)


def continuation_match(learner, adapter: str, texts: dict, prefix_tokens: int = 32, n_tokens: int = 32) -> list[dict]:
    """``memorisation`` for passages given as {key: (title, text)}; rows carry the key
    as ``passage_id``."""
    rt, model = learner.runtime, learner.model
    tok = rt.tokenizer
    todo = []
    for pid, (title, text) in texts.items():
        ids = tok(passage_text(title, text), add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        k = min(prefix_tokens, max(1, len(ids) // 2))
        todo.append((pid, ids[:k], ids[k : k + n_tokens]))
    if not todo:
        return []
    model.set_adapter(adapter)
    was_training = model.training
    model.eval()
    try:
        width = max(len(true) for _, _, true in todo)
        gens = _greedy(model, tok, [prefix for _, prefix, _ in todo], width, rt.cfg.batch_size)
    finally:
        model.train(was_training)
        model.set_adapter(KNOWLEDGE)
    rows = []
    for (pid, prefix, true), gen in zip(todo, gens, strict=True):
        same = sum(a == b for a, b in zip(gen, true, strict=False))
        rows.append({"passage_id": pid, "exact": int(gen[: len(true)] == true), "token_match": same / len(true),
                     "prefix_tokens": len(prefix), "n_tokens": len(true)})
    return rows


# ------------------------------------------------------------------ retention
def retention(learner, adapter: str, passage_ids: list[int]) -> dict[int, Scores]:
    """Closed-book probe scores of each passage that has probe questions, graded as
    ``Learner.score`` grades them (greedy answers: containment and F1; mean answer
    log-likelihood), in one batched generation and one scoring pass for all passages."""
    items = []  # (passage id, title, question)
    for pid in passage_ids:
        qs = learner.store.questions(pid, role="probe")
        title = (learner.store.passage(pid) or {}).get("title")
        items += [(pid, title, q) for q in qs]
    if not items:
        return {}
    rt = learner.runtime
    learner.model.set_adapter(adapter)
    try:
        prompts = [rt.chat(answer_prompt(q["question"], title=title)) for _, title, q in items]
        gens = rt.generate(prompts, max_new_tokens=learner.cfg.answer_tokens)
        lls = rt.loglik(prompts, [q["answer"] for _, _, q in items])
    finally:
        learner.model.set_adapter(KNOWLEDGE)
    out: dict[int, Scores] = {}
    for pid in dict.fromkeys(p for p, _, _ in items):
        rows = [(g, ll, q) for (p, _, q), g, ll in zip(items, gens, lls, strict=True) if p == pid]
        correct = tuple(is_correct(g.text, q["answer"]) for g, _, q in rows)
        f1s = tuple(token_f1(g.text, q["answer"]) for g, _, q in rows)
        out[pid] = Scores(accuracy=sum(correct) / len(rows), f1=sum(f1s) / len(rows),
                          logprob=sum(ll.mean for _, ll, _ in rows) / len(rows), n=len(rows),
                          answers=tuple(g.text for g, _, _ in rows), correct=correct, f1s=f1s)
    return out


def track(learner, adapter_id: str, passage_ids: list[int]) -> None:
    """Drift and memorisation rows for the active knowledge adapter (``adapter_id``),
    after a wake commit. Never raises: it is bookkeeping after a commit, which must
    not turn a committed cycle into a failed one; a failure is logged."""
    try:
        d = drift(learner, KNOWLEDGE)
        rows = memorisation(learner, KNOWLEDGE, passage_ids)
        learner.store.add_drift({"adapter_id": adapter_id, **d})
        learner.store.add_memorisation([{"adapter_id": adapter_id, **r} for r in rows])
        log.info("tracked %s: drift KL %.4f, reading %.2f, memorised %d/%d", adapter_id, d["kl"],
                 d["reading_acc"], sum(r["exact"] for r in rows), len(rows))
    except Exception:
        log.exception("tracking %s failed (the commit stands)", adapter_id)
        learner.model.set_adapter(KNOWLEDGE)


# ------------------------------------------------------------ the forgetting matrix
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _last(xs: list, n: int | None) -> list:
    """The last ``n`` of ``xs`` (None: all of them)."""
    return xs if n is None else xs[max(len(xs) - n, 0):]


def forgetting_summary(store, versions: int | None = 50, passages: int | None = 50, overall: bool = True) -> dict:
    """The forgetting matrix (rows: the base, then knowledge versions in order;
    columns: learned passages in the order they were learned; cells: probe accuracy
    and answer log-likelihood, the latest measurement), and from it, per passage:
    at-learning (under the version that learned it), best and current (over the
    versions since, up to the active one), forgetting = best - current; overall:
    average accuracy (mean current), backward transfer (mean current - at-learning,
    all but the last learned passage) and retention (mean current / mean at-learning).

    The matrix and ``per_passage`` are a window: the ``versions`` newest versions (and
    the base) and the ``passages`` last learned (None: all); ``window`` says how many
    of each there are. With ``overall`` the overall figures are over every learned
    passage, at a cost linear in the stored probe measurements (never versions x
    passages: 10,000 of each would be 10^8 cells); without it (the dashboard, redrawn
    every few seconds) only the window's measurements are read, the figures are over
    the window's passages, ``window["overall"]`` is False, and the cost does not grow
    with the store."""
    active = store.active_adapter_id(KNOWLEDGE)
    kept = store.adapters(KNOWLEDGE, newest=versions)
    first, n_learned = store.first_learned(KNOWLEDGE, None if overall else passages)
    probes = store.probe_matrix(None if overall else [r["passage_id"] for r in first])
    version = {r["adapter_id"]: r["version"] for r in first}
    version |= {e["adapter_id"]: e["version"] for e in probes if e["adapter_name"] == KNOWLEDGE}
    version |= {a["id"]: a["version"] for a in kept}
    active_v = (store.adapter(active) or {}).get("version", 0) if active else 0
    learned_by = {r["passage_id"]: r["adapter_id"] for r in first}  # in the order of the versions that learned them
    learned = list(learned_by)
    cells: dict[tuple[str | None, int], dict] = {}
    for e in probes:
        cells[(e["adapter_id"], e["passage_id"])] = e  # oldest first: the latest wins
    by_passage: dict[int, list[tuple[int, float, float | None]]] = {}
    for (aid, pid), e in cells.items():
        if aid is not None and aid in version and e.get("accuracy") is not None:
            by_passage.setdefault(pid, []).append((version[aid], e["accuracy"], e.get("logprob")))

    per = []
    titles = store.passage_titles(learned)
    for pid in learned:
        v0 = version[learned_by[pid]]
        since = sorted((c for c in by_passage.get(pid, []) if v0 <= c[0] <= active_v), key=lambda c: c[0])
        at = next(((a, ll) for v, a, ll in since if v == v0), (None, None))
        cur = (since[-1][1], since[-1][2]) if since else (None, None)
        best = max((a for _, a, _ in since), default=None)
        per.append({
            "passage_id": pid, "title": titles.get(pid) or "", "learned_by": learned_by[pid],
            "at_learning": at[0], "best": best, "current": cur[0],
            "forgetting": None if best is None or cur[0] is None else best - cur[0],
            "logprob_at_learning": at[1], "logprob_current": cur[1],
        })
    shown = _last(per, passages)
    cols = [r["passage_id"] for r in shown]
    rows = ([{"id": None, "version": 0, "kind": "base", "status": "base", "active": active is None}]
            if any(k[0] is None for k in cells) else [])
    rows += [{"id": a["id"], "version": a["version"], "kind": a["kind"], "status": a["status"],
              "active": a["id"] == active} for a in kept]
    acc = [[(cells.get((r["id"], p)) or {}).get("accuracy") for p in cols] for r in rows]
    lp = [[(cells.get((r["id"], p)) or {}).get("logprob") for p in cols] for r in rows]
    both = [r for r in per if r["at_learning"] is not None and r["current"] is not None]
    currents = [r["current"] for r in per if r["current"] is not None]
    mean_at = _mean([r["at_learning"] for r in both])
    mean_cur_both = _mean([r["current"] for r in both])
    bwt = _mean([r["current"] - r["at_learning"] for r in both if r["passage_id"] != learned[-1]]) if both else None
    d = store.drift(active) if active else []
    latest_mem = {m["passage_id"]: m for m in store.memorisation(active)} if active else {}
    return {
        "adapters": rows,
        "passages": [{"id": r["passage_id"], "title": r["title"]} for r in shown],
        "accuracy": acc,
        "logprob": lp,
        "per_passage": shown,
        "window": {"versions": len(kept), "of_versions": store.count_adapters(KNOWLEDGE), "passages": len(shown),
                   "of_passages": n_learned, "overall": overall},
        "average_accuracy": _mean(currents),
        "mean_at_learning": mean_at,
        "backward_transfer": bwt,
        "retention": (mean_cur_both / mean_at) if mean_at else None,
        "active": active,
        "drift": {k: d[-1][k] for k in ("kl", "reading_acc", "n_prompts", "n_reading")} if d else None,
        "memorisation": ({"exact_rate": _mean([m["exact"] for m in latest_mem.values()]),
                          "token_match": _mean([m["token_match"] for m in latest_mem.values()]),
                          "n": len(latest_mem)} if latest_mem else None),
    }

