"""Trials on Ray: a pool of actors, each holding the base model (the ``ray`` extra).

``RayRunner`` is a trial runner (``agent.runner``): the wake cycle hands it its specs
and gets back, per spec, the outcome and the trained adapter as a PEFT folder with its
sha256, exactly as from the local runner. What travels:

- to the actors, each spec (by value) and, once per run, the parent version's files
  through the object store (``ray.put``); an actor checks their sha256 against the
  spec's before it loads them, and keeps the parent it loaded for the next spec;
- back, the trained adapter's two files as bytes, written here into the scratch
  folder; the wake cycle checks their sha256 again when it loads the chosen one.

The actors are driven through ``ray.util.ActorPool``. Each reserves
``runner.cpus_per_worker`` CPUs (its torch threads) and ``runner.gpus_per_worker``
GPUs (a fraction lets several small-model actors share one card). An actor that dies
(killed, out of memory) is restarted by Ray and its trial run again, up to
``runner.max_retries`` times; trials are deterministic for a seed, and nothing is
committed but by the wake cycle, after every result is in, so a retried trial is never
committed twice. Ray is imported only here: without ``runner.kind = "ray"`` nothing
about it is loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from adapters import files, lora
from adapters.names import KNOWLEDGE
from adapters.registry import AdapterRegistry
from store import Store

from ..events import END, START, Event, OnEvent, ignore
from ..learner import Learner
from ..runner import ParentRef, RunnerConfig, TrialResult, TrialSpec, run_spec
from ..runtime import Runtime

FILES = (files.WEIGHTS_NAME, files.CONFIG_NAME)


def read_adapter(folder: Path) -> dict[str, bytes]:
    """An adapter folder's two files, to travel as bytes."""
    return {name: (Path(folder) / name).read_bytes() for name in FILES}


def write_adapter(blob: dict[str, bytes], folder: Path, sha256: str | None) -> Path:
    """Bytes from ``read_adapter`` as a folder again, written as ``files.save`` writes
    (atomically); the checksum is checked by whoever loads it."""
    files.write(folder, blob[files.WEIGHTS_NAME], blob[files.CONFIG_NAME], sha256 or "")
    return folder


class TrialWorker:
    """One actor's state: the base model with its LoRA adapters, a Learner over a
    private in-memory store (a worker records nothing: the daemon's store is the only
    one), and which parent version its knowledge adapter holds."""

    def __init__(self, make_runtime: Callable[[], Runtime], learner_args: dict, threads: int,
                 train_fn: Callable | None = None):
        import torch

        torch.set_num_threads(max(1, threads))
        self.root = Path(tempfile.mkdtemp(prefix="seal-trials-"))
        store = Store(":memory:")
        self.learner = Learner(make_runtime(), store, AdapterRegistry(self.root / "adapters", store),
                               train_fn=train_fn, **learner_args)
        self.parent: str | None = None  # the knowledge version loaded (None: the base model)

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: TrialSpec, parent: dict[str, bytes] | None) -> dict:
        self._load_parent(spec.parent, parent)
        folder = self.root / f"trial-{spec.idx:02d}-{uuid.uuid4().hex[:8]}"
        try:
            r = run_spec(self.learner, spec, folder)
            blob = read_adapter(folder) if r.adapter else None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"idx": spec.idx, "outcome": r.outcome, "files": blob, "sha256": r.sha256}

    def _load_parent(self, ref: ParentRef, blob: dict[str, bytes] | None) -> None:
        if ref.id == self.parent:
            return
        if ref.id is None:
            lora.restore(self.learner.model, KNOWLEDGE, self.learner.zero)
        else:
            if blob is None:
                raise ValueError(f"trial spec names parent {ref.id} but its files were not sent")
            folder = write_adapter(blob, self.root / f"parent-{uuid.uuid4().hex[:8]}", ref.sha256)
            try:
                files.load(self.learner.model, KNOWLEDGE, folder, expected_sha256=ref.sha256)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        self.parent = ref.id


class RayRunner:
    """The specs on a pool of ``runner.workers`` actors (see the module docstring)."""

    name = "ray"

    def __init__(self, rcfg: RunnerConfig, make_runtime: Callable[[], Runtime], learner_args: dict,
                 scratch: Path, *, train_fn: Callable | None = None, poll_s: float = 5.0):
        try:
            import ray
        except ImportError:
            raise RuntimeError("runner.kind = ray needs the ray extra: pip install 'seal-daemon[ray]'") from None

        if not ray.is_initialized():
            ray.init(address=rcfg.address or None, include_dashboard=False, log_to_driver=False,
                     num_cpus=None if rcfg.address else max(1, int(rcfg.workers * rcfg.cpus_per_worker)))
        self.rcfg, self.scratch, self.poll_s = rcfg, Path(scratch), poll_s
        self._args = (make_runtime, learner_args, int(rcfg.cpus_per_worker), train_fn)
        self.actors: list = []

    def _pool(self):
        from ray.util import ActorPool

        if not self.actors:
            import ray

            actor = ray.remote(TrialWorker).options(num_cpus=self.rcfg.cpus_per_worker,
                                                    num_gpus=self.rcfg.gpus_per_worker,
                                                    max_restarts=self.rcfg.max_retries,
                                                    max_task_retries=self.rcfg.max_retries)
            self.actors = [actor.remote(*self._args) for _ in range(self.rcfg.workers)]
        return ActorPool(self.actors)

    def run(self, specs: Sequence[TrialSpec], *, beat: Callable[[], None] | None = None,
            on_event: OnEvent = ignore) -> list[TrialResult]:
        import ray

        shutil.rmtree(self.scratch, ignore_errors=True)
        if not specs:
            return []
        parents = {s.parent for s in specs}
        blobs = {p.id: ray.put(read_adapter(Path(p.path))) for p in parents if p.id is not None}
        pool = self._pool()
        by_idx = {s.idx: s for s in specs}
        got: dict[int, TrialResult] = {}
        try:
            for s in specs:
                on_event(Event("train", START, f"trial {s.idx + 1}: {s.candidate.policy} (ray)", candidate=s.idx,
                               policy=s.candidate.policy))
                pool.submit(lambda a, sp: a.run.remote(sp, blobs.get(sp.parent.id)), s)
            while pool.has_next():
                try:
                    out = pool.get_next_unordered(timeout=self.poll_s)
                except TimeoutError:
                    if beat is not None:
                        beat()
                    continue
                spec, o = by_idx[out["idx"]], out["outcome"]
                folder = (write_adapter(out["files"], self.scratch / f"trial-{spec.idx:02d}", out["sha256"])
                          if out["files"] else None)
                got[spec.idx] = TrialResult(spec, o, folder, out["sha256"])
                on_event(Event("train", END, candidate=spec.idx, policy=spec.candidate.policy,
                               tokens=o.result.tokens if o.result else 0, steps=o.result.steps if o.result else 0,
                               loss=o.result.final_loss if o.result else None))
                if beat is not None:
                    beat()
        except BaseException:
            self.close()  # tasks still running would answer the next run: start afresh
            raise
        return [got[s.idx] for s in specs]

    def worker_pids(self) -> list[int]:
        import ray

        self._pool()
        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        shutil.rmtree(self.scratch, ignore_errors=True)


def learner_args(cfg) -> dict:
    """What a worker's Learner is built with, from seal's Config."""
    return {"lora_cfg": cfg.lora, "policies": cfg.policies, "wake": cfg.wake, "distill": cfg.distill}
