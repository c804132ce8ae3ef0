"""Step events: what a wake cycle, a sleep or an editor round is doing now.

A phase calls ``on_event(Event(...))`` when one of its named steps starts and ends,
and while a long step advances (optimiser steps). Progress bars, logs and the speed
benchmark all read these events; none of them parses message text or wraps the
phase's collaborators to find out where it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

START, END, ADVANCE = "start", "end", "advance"

# The wake cycle's steps, in order (``train`` and ``score`` once per trial).
WAKE_STEPS = ("questions", "baseline", "generate", "train", "score", "evaluate", "commit", "track")


@dataclass(frozen=True)
class Event:
    step: str  # e.g. questions | baseline | generate | train | score | evaluate | commit | track
    phase: str = START  # start | end | advance
    message: str = ""  # one short line for a person
    candidate: int | None = None  # the trial's candidate index (train, score)
    policy: str | None = None  # the candidate's self-edit policy
    done: int | None = None  # advance: units done so far (e.g. optimiser steps) ...
    total: int | None = None  # ... out of this many
    tokens: int = 0  # end of train: tokens trained on
    steps: int = 0  # end of train: optimiser steps taken
    loss: float | None = None  # advance / end of train: the latest (final) loss


OnEvent = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default listener: nobody is watching."""


def describe(e: Event) -> str:
    """One line for a person: the message, and for an advance its count and loss."""
    text = e.message or e.step
    if e.phase == ADVANCE and e.total:
        text += f": step {e.done}/{e.total}" + (f", loss {e.loss:.3f}" if e.loss is not None else "")
    return text


def log_lines(say: Callable[[str], None], every_s: float = 5.0) -> OnEvent:
    """A listener for plain logs: each event that carries a message, and of a long
    step's advances the first, the last and one every ``every_s`` seconds."""
    last = [0.0]

    def on_event(e: Event) -> None:
        if e.phase == ADVANCE:
            now = time.monotonic()
            if e.done == 1 or e.done == e.total or now - last[0] >= every_s:
                last[0] = now
                say(describe(e))
        elif e.message:
            say(e.message)

    return on_event
