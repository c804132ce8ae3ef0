"""LoRA updates with peft: attach, train, snapshot/restore, copy.

Several named LoRA adapters share one resident base model (``knowledge``, ``editor``,
a scratch ``trial``). Training touches exactly one of them; everything else stays
frozen. Adapter weights are kept and exchanged under peft's own key names (those of
``get_peft_model_state_dict``: the adapter name removed), so a saved directory
(``adapters.files``) is a standard PEFT adapter that ``PeftModel.from_pretrained(base,
dir)`` loads.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import pad_batch
from .names import KNOWLEDGE

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


class AdapterError(RuntimeError):
    """An adapter cannot be loaded, restored or copied: the message is one line."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch while training"})
    targets: tuple[str, ...] = field(
        default=ALL_LINEAR,
        metadata={"help": "module names that get a LoRA branch (all linear layers of a Llama block by default)"},
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    epochs: int = field(default=10, metadata={"help": "passes over the examples per update"})
    batch_size: int = field(default=8, metadata={"help": "examples per optimiser step"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt + completion); longer ones are cut at the end"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = no clipping"})
    seed: int = field(default=0, metadata={"help": "seed for adapter initialisation, shuffling and dropout"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("lora.rank must be >= 1")
        if self.alpha <= 0:
            raise ValueError("lora.alpha must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("lora.dropout must be in [0, 1)")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError("lora.targets must be a non-empty list of module names")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("lora.lr must be a positive finite number")
        if self.epochs < 1:
            raise ValueError("lora.epochs must be >= 1")
        if self.batch_size < 1:
            raise ValueError("lora.batch_size must be >= 1")
        if self.max_length < 2:
            raise ValueError("lora.max_length must be >= 2")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError("lora.weight_decay must be >= 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError("lora.grad_clip must be >= 0")
        if isinstance(self.targets, list):  # from TOML: keep the dataclass hashable
            object.__setattr__(self, "targets", tuple(self.targets))


@dataclass(frozen=True)
class Teacher:
    """A teacher's next-token distributions over an example's completion tokens, reduced
    to its top-k tokens per position (the rest of its mass is one *tail* bucket):
    ``ids`` and ``logp`` are (T, k), one row per completion token (EOS included when the
    example appends it). Computed once per transfer set, not once per epoch."""

    ids: Tensor  # (T, k) token ids, int64
    logp: Tensor  # (T, k) the teacher's log-probabilities of those tokens


@dataclass(frozen=True)
class Example:
    """One training example. The loss is on the completion tokens only; with an empty
    prompt the completion is plain language-model text.

    With a ``teacher``, the loss on the completion tokens is the KL from the teacher's
    distribution to the student's (top-k with a tail bucket: ``topk_kl``) instead of the
    cross-entropy of the tokens themselves: the student learns what the teacher would
    say, not only the one string it said. With ``goldfish = k > 1``, a pseudo-random
    1/k of the completion tokens carry no loss (Hans et al. 2024, hashed on the ``GOLDFISH_CONTEXT``
    tokens before each one, so the same tokens are dropped in every epoch): the text is
    learned, but never as a whole to recite."""

    prompt: str
    completion: str
    eos: bool = False  # append the tokenizer's EOS to the completion
    teacher: Teacher | None = field(default=None, compare=False, repr=False)
    goldfish: int = 0  # drop 1/k of the completion tokens from the loss; 0 or 1 = none


@dataclass(frozen=True)
class TrainResult:
    steps: int
    tokens: int  # non-padding tokens processed, summed over steps
    seconds: float
    losses: tuple[float, ...]  # per step: mean loss over the batch's completion tokens
    final_loss: float  # token-weighted mean over the last epoch (the NaN itself if nan)
    nan: bool = False  # training stopped on a non-finite loss or gradient norm


# ------------------------------------------------------------------------ attaching
def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,  # B = 0: a new adapter leaves the output unchanged
    )


def attach(model, cfg: LoraConfig, names: Sequence[str] = (KNOWLEDGE,)):
    """Wrap a base HF causal LM (modified in place) with one LoRA adapter per name.
    The first name is the active one. Initialisation is seeded by ``cfg.seed`` and does
    not disturb the global RNG."""
    from peft import PeftModel, get_peft_model

    names = list(names)
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError("attach: adapter names must be non-empty and unique")
    if isinstance(model, PeftModel):
        raise ValueError("attach: the model already has adapters; use add()")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model = get_peft_model(model, _peft_config(cfg), adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, _peft_config(cfg))
    peft_model.set_adapter(names[0], inference_mode=True)
    peft_model.eval()
    return peft_model


def add(peft_model, cfg: LoraConfig, name: str) -> None:
    """Add another named adapter (output unchanged while it is untrained)."""
    if name in peft_model.peft_config:
        raise ValueError(f"adapter {name!r} already exists")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        peft_model.add_adapter(name, _peft_config(cfg))
    for p in _lora_params(peft_model, name).values():
        p.requires_grad_(False)


# ------------------------------------------------------------- weights of one adapter
def _lora_params(peft_model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's LoRA parameters under peft's saved key names (adapter name
    removed: ``...q_proj.lora_A.knowledge.weight`` -> ``...q_proj.lora_A.weight``)."""
    if adapter not in peft_model.peft_config:
        raise AdapterError(f"no adapter named {adapter!r} (have: {', '.join(peft_model.peft_config)})")
    out: dict[str, torch.nn.Parameter] = {}
    for name, p in peft_model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i] == adapter and parts[i - 1].startswith("lora_"):
                out[".".join(parts[:i] + parts[i + 1 :])] = p
                break
    return out


def snapshot(peft_model, adapter: str) -> dict[str, Tensor]:
    """Detached CPU copies of the adapter's weights (keys as peft's state dict)."""
    return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in _lora_params(peft_model, adapter).items()}


@torch.no_grad()
def restore(peft_model, adapter: str, state: dict[str, Tensor]) -> None:
    """Put ``state`` (from ``snapshot`` or a saved file) into the adapter. The keys
    and shapes must match exactly."""
    params = _lora_params(peft_model, adapter)
    if params.keys() != state.keys():
        missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
        example = next(iter(sorted(missing or extra)))
        raise AdapterError(
            f"adapter {adapter!r}: weights do not match ({len(missing)} missing, {len(extra)} unexpected, e.g. {example})"
        )
    for k, p in params.items():
        if p.shape != state[k].shape:
            raise AdapterError(f"adapter {adapter!r}: {k} has shape {tuple(state[k].shape)}, expected {tuple(p.shape)}")
    for k, p in params.items():
        p.copy_(state[k])


def _same_structure(a, b) -> bool:
    return (a.r, a.lora_alpha, set(a.target_modules), a.use_rslora) == (b.r, b.lora_alpha, set(b.target_modules), b.use_rslora)


def copy_adapter(peft_model, src: str, dst: str) -> None:
    """dst's weights := src's (both must have the same rank, alpha and targets)."""
    if src == dst:
        return
    for name in (src, dst):
        if name not in peft_model.peft_config:
            raise AdapterError(f"no adapter named {name!r}")
    if not _same_structure(peft_model.peft_config[src], peft_model.peft_config[dst]):
        raise AdapterError(f"adapters {src!r} and {dst!r} differ in rank, alpha or targets")
    restore(peft_model, dst, {k: p.detach() for k, p in _lora_params(peft_model, src).items()})


# ----------------------------------------------------------------------- tokenising
GOLDFISH_CONTEXT = 13  # tokens hashed to decide whether the next one is dropped (Hans et al.'s h)


@dataclass(frozen=True)
class _Seq:
    ids: list[int]  # prompt + completion, cut to max_length
    start: int  # index of the first completion token
    teacher: Teacher | None = None
    goldfish: int = 0


def completion_ids(tokenizer, example: Example) -> list[int]:
    """The completion's token ids as training sees them (EOS appended when asked)."""
    c = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if example.eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("Example.eos is set but the tokenizer has no EOS token")
        c = [*c, tokenizer.eos_token_id]
    return c


def _encode(tokenizer, examples: Sequence[Example], max_length: int) -> list[_Seq]:
    """Token ids of prompt + completion (tokenised separately: the boundary is exact),
    cut to ``max_length``, and the index of the first completion token."""
    if not examples:
        raise ValueError("no training examples")
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    out = []
    for e, p in zip(examples, prompts, strict=True):
        c = completion_ids(tokenizer, e)
        if e.teacher is not None and e.teacher.ids.shape[0] != len(c):
            raise ValueError(f"teacher targets cover {e.teacher.ids.shape[0]} tokens, the completion has {len(c)}")
        out.append(_Seq((p + c)[:max_length], len(p), e.teacher, e.goldfish))
    return out


def _supervised(seq: _Seq) -> int:
    """How many tokens of a sequence carry loss (each predicted from the one before)."""
    return max(0, len(seq.ids) - max(seq.start, 1))


def goldfish_keep(ids: list[int], first: int, k: int, context: int = GOLDFISH_CONTEXT) -> list[bool]:
    """For each token from ``first`` on: does it carry loss? A token is dropped when a
    hash of the ``context`` tokens before it is 0 mod ``k`` (about 1 in k; the same
    tokens in every epoch and wherever the same text recurs)."""
    if k <= 1:
        return [True] * (len(ids) - first)
    keep = []
    for i in range(first, len(ids)):
        window = ids[max(0, i - context) : i]
        h = zlib.crc32(",".join(map(str, window)).encode())
        keep.append(h % k != 0)
    return keep


@dataclass
class _Batch:
    input_ids: Tensor  # (B, W), right-padded
    attention_mask: Tensor  # (B, W)
    targets: Tensor  # (B, W-1): the token each position predicts, IGNORE where no loss
    n_tokens: int  # non-padding tokens
    # teacher targets at the supervised positions (in ``targets != IGNORE`` order), or None
    t_mask: Tensor | None = None  # (N,) bool: this position is distilled
    t_ids: Tensor | None = None  # (M, k) the teacher's top-k ids at the distilled positions
    t_logp: Tensor | None = None  # (M, k) and their log-probabilities


def _collate(seqs: list[_Seq], pad_id: int, device) -> _Batch:
    ids, mask = pad_batch([s.ids for s in seqs], pad_id)
    targets = torch.full((len(seqs), ids.shape[1] - 1), IGNORE, dtype=torch.long)
    t_rows: list[tuple[int, int, Teacher]] = []  # (row, first completion position, teacher)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        first = max(s.start, 1)  # position first-1 predicts the first completion token
        if first < n:
            targets[row, first - 1 : n - 1] = ids[row, first:n]
            if s.goldfish > 1:
                keep = torch.tensor(goldfish_keep(s.ids, first, s.goldfish))
                targets[row, first - 1 : n - 1][~keep] = IGNORE
            if s.teacher is not None:
                t_rows.append((row, first, s.teacher))
    batch = _Batch(ids.to(device), mask.to(device), targets.to(device), int(mask.sum()))
    if t_rows:
        sel = targets != IGNORE
        flag = torch.zeros_like(targets, dtype=torch.bool)
        k = max(t.ids.shape[1] for _, _, t in t_rows)
        t_ids = torch.zeros((*targets.shape, k), dtype=torch.long)
        t_logp = torch.full((*targets.shape, k), -math.inf)
        for row, first, t in t_rows:
            s = seqs[row]
            off = first - s.start  # completion tokens cut off by a prompt of length 0
            m = len(s.ids) - first  # completion tokens within max_length
            span = slice(first - 1, first - 1 + m)
            flag[row, span] = True
            t_ids[row, span, : t.ids.shape[1]] = t.ids[off : off + m]
            t_logp[row, span, : t.ids.shape[1]] = t.logp[off : off + m].float()
        flag &= sel
        batch.t_mask = flag[sel].to(device)
        batch.t_ids = t_ids[flag].to(device)
        batch.t_logp = t_logp[flag].to(device)
    return batch


# -------------------------------------------------------------------------- the loss
class _Scorer:
    """Token log-losses at the supervised positions only.

    The LM head (a 49k-vocabulary matmul: a fifth of a 135M model's compute) runs only
    on positions that carry loss, not on prompt or padding positions. That shortcut
    assumes ``logits = lm_head(decoder(x))``, which some architectures break (Gemma's
    soft-capping, Cohere's logit scale), so it is checked once against the model's own
    forward pass and dropped if it disagrees.
    """

    def __init__(self, peft_model):
        self.model = peft_model
        base = peft_model.get_base_model()
        self.decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self.head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.fast = self.decoder is not None and self.decoder is not base and self.head is not None
        if self.fast:
            self.fast = self._agrees()

    @torch.no_grad()
    def _agrees(self) -> bool:
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(1, 5, device=_device(self.model)).unsqueeze(0)
            mask = torch.ones_like(ids)
            full = self.model(input_ids=ids, attention_mask=mask).logits.float()
            fast = self.head(self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state).float()
            return full.shape == fast.shape and torch.allclose(full, fast, rtol=1e-4, atol=1e-4)
        except Exception:  # any architecture surprise: use the plain forward
            return False
        finally:
            self.model.train(was_training)

    def token_losses(self, batch: _Batch) -> tuple[Tensor, Tensor]:
        """Per-token losses (N,) at the supervised positions, and the boolean mask
        (B, W-1) saying where they are: the cross-entropy of the target token, or,
        where a teacher is given, the top-k KL from the teacher (``topk_kl``)."""
        sel = batch.targets != IGNORE
        if self.fast:
            hidden = self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = self.head(hidden[:, :-1][sel])
        else:
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1][sel]
        logits = logits.float()
        if batch.t_mask is None or not bool(batch.t_mask.any()):
            return F.cross_entropy(logits, batch.targets[sel], reduction="none"), sel
        losses = torch.empty(logits.shape[0], device=logits.device)
        plain = ~batch.t_mask
        if bool(plain.any()):
            losses[plain] = F.cross_entropy(logits[plain], batch.targets[sel][plain], reduction="none")
        student = torch.log_softmax(logits[batch.t_mask], dim=-1).gather(-1, batch.t_ids)
        student = student.masked_fill(batch.t_logp == -math.inf, -math.inf)  # padding of a smaller k
        losses[batch.t_mask] = topk_kl(batch.t_logp, student)
        return losses, sel


def with_tail(logp_top: Tensor) -> Tensor:
    """Top-k log-probabilities (..., k) plus one bucket for the rest of the mass
    (..., k+1): a distribution that sums to 1. -inf entries (padding) count as 0."""
    captured = torch.logsumexp(logp_top, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp_top, torch.log(-torch.expm1(captured))], dim=-1)


def topk_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    """KL(teacher || student) per row over the teacher's top-k tokens and a tail bucket
    (both (..., k): log-probabilities of the same token ids). A lower bound of the full
    KL, tight when the teacher's mass sits in its top k; it is what TRL's SDFT loss
    computes (``add_tail_bucket`` + ``compute_divergence`` with alpha 0), on the
    teacher's support so that the teacher's side can be computed once and cached."""
    t, s = with_tail(teacher_logp), with_tail(student_logp)
    p = t.exp()
    terms = torch.where(p > 0, p * (t - s), torch.zeros_like(p))
    return terms.sum(-1)


def _batch_loss(scorer: _Scorer, batch: _Batch) -> Tensor:
    """Mean loss over the batch's completion tokens (a module function: tests patch it)."""
    losses, _ = scorer.token_losses(batch)
    return losses.mean()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pid is not None:
            return pid
    return 0


@torch.no_grad()
def example_losses(peft_model, tokenizer, examples: Sequence[Example], cfg: LoraConfig) -> list[float]:
    """Mean loss over each example's completion tokens under the active adapter,
    computed in padded batches of ``cfg.batch_size`` (NaN for an example without
    completion tokens)."""
    seqs = _encode(tokenizer, examples, cfg.max_length)
    was_training = peft_model.training
    peft_model.eval()
    scorer = _Scorer(peft_model)
    out: list[float] = []
    try:
        for start in range(0, len(seqs), cfg.batch_size):
            chunk = seqs[start : start + cfg.batch_size]
            batch = _collate(chunk, _pad_id(tokenizer), _device(peft_model))
            losses, sel = scorer.token_losses(batch)
            counts = sel.sum(dim=1)
            sums = torch.zeros(len(chunk), device=losses.device).index_add_(
                0, sel.nonzero()[:, 0], losses
            )
            out.extend((sums / counts).tolist())
    finally:
        peft_model.train(was_training)
    return out


# -------------------------------------------------------------------------- training
def _optimizer(params: list[Tensor], cfg: LoraConfig) -> torch.optim.Optimizer:
    try:  # the fused kernel is ~4x faster than the per-tensor loop on CPU as well
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _length_grouped(seqs: list[_Seq], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch's batches: shuffled, then grouped by length, longest first, each
    holding at most ``batch_size`` examples and at most ``batch_size`` x the median
    length in padded tokens (a long passage is not padded into a batch of short
    answers, nor are they padded to its length); the batches in a shuffled order."""
    order = torch.randperm(len(seqs), generator=generator).tolist()
    order.sort(key=lambda i: -len(seqs[i].ids))  # stable: equal lengths stay shuffled
    lengths = sorted(len(s.ids) for s in seqs)
    budget = batch_size * lengths[len(lengths) // 2]
    chunks: list[list[int]] = []
    for i in order:
        # the chunk's first (longest) example sets its padded width
        if chunks and len(chunks[-1]) < batch_size and (len(chunks[-1]) + 1) * len(seqs[chunks[-1][0]].ids) <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return [chunks[j] for j in torch.randperm(len(chunks), generator=generator).tolist()]


def _shared_step(scorer: _Scorer, batch_seqs: list[_Seq], pad_id: int, device, params: list[Tensor]) -> tuple[float, int, int]:
    """One data-parallel step's loss and gradients (see ``train``): this process's
    share of the batch, its loss summed, then the sums, the token counts and the
    gradients summed over the group. Returns (the batch's mean loss, its tokens, its
    supervised tokens), the same in every process; the gradients are left in ``params``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batch_seqs[rank::world]
    if mine:
        batch = _collate(mine, pad_id, device)
        token_losses, _ = scorer.token_losses(batch)
        loss_sum, n_tok, n_sup = token_losses.sum(), batch.n_tokens, token_losses.numel()
    else:  # a batch smaller than the group: this process adds nothing but takes part
        loss_sum, n_tok, n_sup = None, 0, 0
    totals = torch.tensor([loss_sum.item() if loss_sum is not None else 0.0, float(n_sup), float(n_tok)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    if loss_sum is not None and math.isfinite(totals[0].item()):
        (loss_sum / totals[1]).backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    return totals[0].item() / totals[1].item(), int(totals[2].item()), int(totals[1].item())


def train(
    peft_model,
    tokenizer,
    examples: Sequence[Example],
    cfg: LoraConfig,
    adapter: str = KNOWLEDGE,
    progress: Callable[[int, int, float], None] | None = None,
    distributed: bool = False,
) -> TrainResult:
    """Train one adapter on ``examples`` (it becomes the active adapter and the only
    trainable parameters). Stops at the first non-finite loss or gradient norm and
    returns ``nan=True``: the weights are then garbage and the caller restores them.

    ``distributed``: this is one of the processes of an initialised
    ``torch.distributed`` group (``agent.cluster.train_job``), each with the same model,
    examples and config. Every process draws the same batches; each computes the loss
    of its share of a batch (every world-th example), and the gradients and the loss
    are summed over the group and divided by the batch's supervised tokens, so every
    step is the single-process step on the whole batch (data parallel, up to the order
    of float sums) and every process ends with the same weights."""
    t0 = time.perf_counter()
    seqs = [s for s in _encode(tokenizer, examples, cfg.max_length) if _supervised(s) > 0]
    if not seqs:
        raise ValueError("no training example has a completion token within max_length")
    if len(seqs) < len(examples):
        log.warning("%d of %d examples have no completion token within max_length: skipped", len(examples) - len(seqs), len(examples))

    peft_model.set_adapter(adapter, inference_mode=True)
    trainable = _lora_params(peft_model, adapter)
    wanted = {id(p) for p in trainable.values()}
    for p in peft_model.parameters():
        p.requires_grad_(id(p) in wanted)
    params = list(trainable.values())

    scorer = _Scorer(peft_model)  # checked in eval mode, before dropout is switched on
    device = _device(peft_model)
    pad_id = _pad_id(tokenizer)
    optimizer = _optimizer(params, cfg)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    shuffle = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(_length_grouped(seqs, cfg.batch_size, torch.Generator().manual_seed(0)))
    total = cfg.epochs * per_epoch

    losses: list[float] = []
    last_epoch: list[tuple[float, int]] = []  # (loss, supervised tokens) of the current epoch
    tokens = 0
    nan = False
    peft_model.train()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)  # LoRA dropout
            for _epoch in range(cfg.epochs):
                last_epoch = []
                for chunk in _length_grouped(seqs, cfg.batch_size, shuffle):
                    if distributed:
                        value, n_tok, n_sup = _shared_step(scorer, [seqs[i] for i in chunk], pad_id, device, params)
                    else:
                        batch = _collate([seqs[i] for i in chunk], pad_id, device)
                        loss = _batch_loss(scorer, batch)
                        value, n_tok, n_sup = loss.item(), batch.n_tokens, int((batch.targets != IGNORE).sum())
                    losses.append(value)
                    tokens += n_tok
                    if not math.isfinite(value):
                        nan = True
                        break
                    if not distributed:
                        loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
                    if not math.isfinite(norm.item()):
                        nan = True
                        break
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    last_epoch.append((value, n_sup))
                    if progress is not None:
                        progress(len(losses), total, value)
                if nan:
                    break
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        peft_model.eval()

    if nan:
        final = losses[-1] if not math.isfinite(losses[-1]) else math.nan
        log.warning("training %r stopped at step %d/%d: non-finite loss or gradient", adapter, len(losses), total)
    else:
        n = sum(c for _, c in last_epoch)
        final = sum(v * c for v, c in last_epoch) / n
    return TrainResult(
        steps=len(losses),
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        losses=tuple(losses),
        final_loss=final,
        nan=nan,
    )
