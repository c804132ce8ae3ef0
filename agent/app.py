"""The composition root: the one place that builds seal's parts for a home.

``Parts(home, cfg)`` builds each part once, on first use: the store
(``<home>/store.db``), the adapter registry (``<home>/adapters``), the runtime (the
configured model) and the Learner over them. The CLI (``agent.cli.App``) and the
daemon (``build_daemon``) take their parts from here; nothing else wires them.

Importing this module imports the model's libraries: light modules (the CLI) import
it where a command needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from adapters.registry import AdapterRegistry
from store import Store

from .config import Config
from .daemon.loop import Daemon, ReadFn, SleepFn
from .events import OnEvent, ignore
from .home import Home
from .ingest import prepare
from .learner import Learner
from .runner import SCRATCH
from .runtime import Runtime
from .settings import config_items
from .sleep import sleep_phase


class Parts:
    """The parts of seal for one home and config, each built once, when first asked."""

    def __init__(self, home: Home, cfg: Config):
        self.home, self.cfg = home, cfg

    @cached_property
    def store(self) -> Store:
        self.home.ensure()
        return Store(self.home.store_file)

    @cached_property
    def registry(self) -> AdapterRegistry:
        return AdapterRegistry(self.home.adapters, self.store)

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime.load(self.cfg.model)

    @cached_property
    def learner(self) -> Learner:
        learner = Learner(self.runtime, self.store, self.registry, self.cfg.lora, self.cfg.policies, self.cfg.wake,
                          distill=self.cfg.distill)
        if self.cfg.engine.kind == "vllm":  # else the learner's default, a LocalEngine on its own model
            import os

            from .cluster.vllm_engine import VllmEngine

            e = self.cfg.engine
            learner.engine = VllmEngine(e.url, e.model, self.runtime.tokenizer, api_key=os.environ.get(e.api_key_env),
                                        adapter_dir=Path(e.adapter_dir).expanduser() if e.adapter_dir
                                        else self.home.root / "served")
        if self.cfg.runner.kind == "ray":  # else the wake cycle's default, a LocalRunner (agent.runner)
            from functools import partial

            from .cluster.ray_runner import RayRunner, learner_args

            learner.runner = RayRunner(self.cfg.runner, partial(Runtime.load, self.cfg.model), learner_args(self.cfg),
                                       self.home.root / SCRATCH)
        return learner

    def close(self) -> None:
        if "learner" in self.__dict__:
            if self.learner.runner is not None:
                self.learner.runner.close()
            self.learner.engine.close()
        if "store" in self.__dict__:  # opened
            self.store.close()


def sleeper(cfg: Config) -> SleepFn:
    """The daemon's sleep function: the sleep phase of agent.sleep with ``cfg``."""

    def sleep(learner: Learner, *, trigger: str, should_stop: Callable[[], bool],
              on_event: OnEvent = ignore) -> object:
        return sleep_phase(learner, cfg.sleep, cfg.editor, trigger=trigger, on_event=on_event, should_stop=should_stop)

    return sleep


def inbox_reader(cfg: Config) -> ReadFn:
    """How the daemon reads an inbox file: as `seal ingest FILE` does, with ``cfg``."""

    def read(path: Path, tokenizer: object) -> list:
        return prepare([str(path)], cfg=cfg.ingest, model=cfg.model, tokenizer=tokenizer)

    return read


def build_daemon(home: Home, cfg: Config, *, handle_signals: bool = False, public: bool = False) -> Daemon:
    """The daemon of ``home``: its Learner is built by ``Parts`` when first used (in
    the thread that runs the model's jobs); the resolved ``cfg`` is logged at start;
    with ``api.enabled`` it serves the HTTP API (``agent.api``; a host other than
    loopback only with ``public``)."""
    parts = Parts(home, cfg)

    def api(daemon: Daemon):
        from .api.service import start_api

        return start_api(home, cfg, daemon, public=public)

    return Daemon(home, cfg.daemon, cfg.schedule, learner_factory=lambda: parts.learner, sleep_fn=sleeper(cfg),
                  read=inbox_reader(cfg), settings=[(k, v) for k, v, _ in config_items(cfg)],
                  handle_signals=handle_signals, api=api if cfg.api.enabled else None)
