"""Measuring instruments of ``seal bench speed``: the machine's matmul FLOP/s, the
FLOPs a model executes (``FlopMeter``, checked against torch's ``FlopCounterMode``),
and peak resident memory."""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------ the machine
def matmul_flops(n: int = 2048, reps: int = 10, warmup: int = 2) -> dict:
    """FLOP/s of an fp32 ``n`` x ``n`` matrix multiply on the model's device, with
    torch's current thread count: the best and the median of ``reps`` timed runs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    b = torch.randn(n, n, generator=gen).to(device)
    c = torch.empty(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        times.append(time.perf_counter() - t0)
    flop = 2 * n**3
    return {"n": n, "reps": reps, "threads": torch.get_num_threads(), "device": device.type,
            "best": flop / min(times), "median": flop / statistics.median(times)}


# ------------------------------------------------------------------ counting FLOPs
def attention_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """(query, key) pairs an attention call computes: all of them, or with a causal
    mask and no explicit one (torch's top-left alignment) only the lower triangle,
    which the kernel skips to (a slight undercount: it also computes the masked part
    of the blocks on the diagonal)."""
    if not causal:
        return q_len * k_len
    if q_len <= k_len:
        return q_len * (q_len + 1) // 2
    return k_len * (k_len + 1) // 2 + (q_len - k_len) * k_len


def attention_flops(q_shape, k_shape, v_shape, causal: bool = False) -> tuple[int, int]:
    """(forward, backward) FLOPs of one scaled-dot-product attention call, as torch's
    flop counter formulas count them (the backward recomputes the scores: 5 matmuls)."""
    *lead, q_len, d = q_shape
    k_len, dv = k_shape[-2], v_shape[-1]
    heads = math.prod(lead)  # batch x query heads (grouped KV heads are broadcast)
    pairs = attention_pairs(q_len, k_len, causal)
    return 2 * heads * pairs * (d + dv), 2 * heads * pairs * (3 * d + 2 * dv)


class FlopMeter:
    """Counts, live, the FLOPs of every matrix multiply a model executes inside the
    ``with`` block: each ``F.linear`` call (2·rows·in·out; what ``nn.Linear`` and
    peft's LoRA layers run) and each ``F.scaled_dot_product_attention`` call; when a
    call builds an autograd graph, also the backward matmuls autograd will run for it
    (one per input that requires a gradient: a frozen weight gets no weight-gradient
    matmul). It assumes a backward follows every forward made with gradients on, as
    it does in training. Elementwise work (norms, activations, softmax) is not
    counted, as torch's flop counter does not count it."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self._saved: tuple | None = None

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __enter__(self) -> FlopMeter:
        if self._saved is not None:
            raise RuntimeError("FlopMeter is already counting")
        linear, sdpa = self._saved = (F.linear, F.scaled_dot_product_attention)

        def counted_linear(input, weight, *args, **kwargs):
            f = 2 * (input.numel() // max(input.shape[-1], 1)) * weight.shape[0] * weight.shape[1]
            self.forward += f
            if torch.is_grad_enabled():
                self.backward += f * (int(input.requires_grad) + int(weight.requires_grad))
            return linear(input, weight, *args, **kwargs)

        def counted_sdpa(query, key, value, *args, **kwargs):
            mask = kwargs.get("attn_mask", args[0] if args else None)
            causal = bool(kwargs.get("is_causal", args[2] if len(args) > 2 else False)) and mask is None
            fwd, bwd = attention_flops(query.shape, key.shape, value.shape, causal)
            self.forward += fwd
            if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
                self.backward += bwd
            return sdpa(query, key, value, *args, **kwargs)

        F.linear, F.scaled_dot_product_attention = counted_linear, counted_sdpa
        return self

    def __exit__(self, *exc) -> None:
        F.linear, F.scaled_dot_product_attention = self._saved
        self._saved = None


def flop_counter_mode():
    """torch's ``FlopCounterMode``, taught the CPU flash-attention kernel (which it
    does not count by itself) with the same formulas as ``FlopMeter``."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def fwd(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, attn_mask=None, **kwargs):
        return attention_flops(query, key, value, bool(is_causal) and attn_mask is None)[0]

    def bwd(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
            out_shape=None, attn_mask=None, **kwargs):
        return attention_flops(query, key, value, bool(is_causal) and attn_mask is None)[1]

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return FlopCounterMode(display=False, custom_mapping=mapping)


# ------------------------------------------------------------------ memory
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux), so a step's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident memory now (VmRSS), else the process's peak."""
    now = _proc_status_mb("VmRSS")
    return peak_rss_mb() if now is None else now


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else the process's peak."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
