"""The API inside the daemon: its token, its address file and the uvicorn thread.

``start_api(home, cfg, daemon)`` runs when the daemon's scheduler has started: it
makes sure ``<home>/token`` exists (mode 0600, made once, kept across restarts), starts
uvicorn on a thread of its own and writes ``<home>/api.json`` (its URL, for clients
such as ``seal ask``). ``ApiServer.stop`` ends it and removes that file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time

from ..home import Home
from .client import ADDRESS_FILE, TOKEN_FILE, address_path, read_address, token_path
from .config import ApiConfig
from .desk import Desk
from .server import Context, build_app

log = logging.getLogger(__name__)


class ApiStartError(RuntimeError):
    """The API could not listen (the port is taken, the address is not this machine's)."""


def ensure_token(home: Home) -> str:
    """The home's API token, made at first start (32 random bytes, URL-safe), 0600."""
    path = token_path(home)
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


class ApiServer:
    def __init__(self, home: Home, cfg: ApiConfig, ctx: Context):
        import uvicorn

        self.home, self.cfg, self.ctx = home, cfg, ctx
        config = uvicorn.Config(build_app(ctx), host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=2, limit_concurrency=max(64, 4 * cfg.queue))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="seal-api", daemon=True)
        self.url = ""

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: start() reports it
            self.server.run()

    def start(self, timeout_s: float = 15.0) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.ctx.desk.close()
                raise ApiStartError(f"the API could not listen on {self.cfg.host}:{self.cfg.port} "
                                    "(is the port taken? set api.port, or api.enabled = false)")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0].getsockname()
        host = self.cfg.host if self.cfg.host != "0.0.0.0" else "127.0.0.1"
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{sock[1]}/v1"
        info = {"url": self.url, "host": self.cfg.host, "port": sock[1], "pid": os.getpid()}
        path = address_path(self.home)
        tmp = path.with_name(f".{ADDRESS_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, path)
        log.info("API listening on %s (bearer token in %s)", self.url, token_path(self.home))
        if not self.cfg.loopback:
            log.warning("API bound to %s: reachable from other machines (every request still needs the token)",
                        self.cfg.host)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.ctx.desk.close()
        self.thread.join(timeout=5)
        info = read_address(self.home)
        if info and info.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                address_path(self.home).unlink()


def start_api(home: Home, cfg, daemon, public: bool = False) -> ApiServer:
    """The API of ``daemon`` (whose model it shares, under the daemon's model lock),
    listening. ``cfg`` is the root config. A host other than loopback needs ``public``."""
    if not cfg.api.loopback and not public:
        raise ApiStartError(f"api.host = {cfg.api.host} is not loopback: other machines could reach it; "
                            "run with --public to allow it")
    return ApiServer(home, cfg.api, context(home, cfg, daemon.loaded_learner, daemon.model_lock)).start()


def context(home: Home, cfg, loaded_learner, model_lock: threading.Lock) -> Context:
    """What the routes need, for ``home`` and the root ``cfg``: the token, a model desk
    over ``loaded_learner()`` (None while the model loads) and ``model_lock``."""
    from store import Store

    from ..runtime import load_tokenizer
    from .desk import Busy

    home.ensure()
    local = threading.local()

    def adapter_row(adapter_id: str) -> dict | None:  # the desk's own connection, on its own thread
        if getattr(local, "store", None) is None:
            local.store = Store(home.store_file)
        return local.store.adapter(adapter_id)

    tokenizers: list = []

    def tokenizer():  # its own: the model's is reconfigured while it generates, on the desk's thread
        if not tokenizers:
            tokenizers.append(load_tokenizer(cfg.model))
        return tokenizers[0]

    def conversation(messages: list[dict]) -> str:
        learner = loaded_learner()
        if learner is None:
            raise Busy("the model is still loading: try again in a few seconds")
        return learner.runtime.conversation(messages)

    desk = Desk(loaded_learner, model_lock, adapter_row, lambda row: home.adapters / row["path"], size=cfg.api.queue)
    return Context(home=home, cfg=cfg.api, ingest=cfg.ingest, token=ensure_token(home), desk=desk,
                   conversation=conversation, tokenizer=tokenizer)
