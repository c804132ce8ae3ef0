"""The CLI's side of the API: where a running daemon listens, and a small client.

Light on purpose (no torch, no Starlette): ``seal ask`` imports it to decide whether
to ask the daemon's model over HTTP (one model in memory, its answer streamed) or
to load the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..home import Home

TOKEN_FILE = "token"
ADDRESS_FILE = "api.json"


class ApiClientError(RuntimeError):
    """The daemon's API answered with an error, or could not be reached (one line)."""


def token_path(home: Home) -> Path:
    return home.root / TOKEN_FILE


def address_path(home: Home) -> Path:
    return home.root / ADDRESS_FILE


def read_address(home: Home) -> dict | None:
    """Where a daemon's API listens (``{"url", "host", "port", "pid"}``), or None."""
    try:
        info = json.loads(address_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("url") else None


class Client:
    def __init__(self, url: str, token: str, timeout_s: float = 600.0):
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def chat(self, messages: list[dict], on_text: Callable[[str], None], model: str = "seal",
             max_tokens: int = 64) -> str:
        """Stream a chat completion: each piece goes to ``on_text``; returns the whole text."""
        import httpx

        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
        got = []
        try:
            with httpx.stream("POST", f"{self.url}/chat/completions", json=body, headers=self._headers(),
                              timeout=httpx.Timeout(self.timeout_s, connect=5.0)) as r:
                if r.status_code != 200:
                    r.read()
                    raise ApiClientError(_message(r))
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise ApiClientError(event["error"].get("message") or "the daemon's API failed")
                    piece = event["choices"][0]["delta"].get("content") or ""
                    if piece:
                        got.append(piece)
                        on_text(piece)
        except httpx.HTTPError as e:
            raise ApiClientError(f"the daemon's API at {self.url} did not answer: {e}") from None
        return "".join(got)


    def get(self, path: str, **params) -> dict:
        """A view's JSON (``/status``, ``/queue``, ``/adapters``, ``/forgetting``)."""
        import httpx

        try:
            r = httpx.get(f"{self.url}{path}", params=params, headers=self._headers(), timeout=60)
        except httpx.HTTPError as e:
            raise ApiClientError(f"the daemon's API at {self.url} did not answer: {e}") from None
        if r.status_code != 200:
            raise ApiClientError(_message(r))
        return r.json()

    def ingest(self, documents: list[tuple[str, str, int]], questions: tuple[str, str] | None,
               title: str | None) -> tuple[int, dict]:
        """One `seal ingest` call through the API (``POST /v1/documents``, a batch):
        (status, body); the body of a refusal has ``error`` and, for duplicates, the
        documents it found known."""
        import httpx

        body = {"documents": [{"name": n, "content": text} for n, text, _ in documents], "title": title,
                "questions": {"name": questions[0], "content": questions[1]} if questions else None}
        try:
            r = httpx.post(f"{self.url}/documents", content=json.dumps(body).encode(), timeout=self.timeout_s,
                           headers={**self._headers(), "Content-Type": "application/vnd.seal.ingest+json"})
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ApiClientError(f"the daemon's API at {self.url} did not answer: {e}") from None


def _message(r) -> str:
    try:
        return f"the daemon's API answered {r.status_code}: {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"the daemon's API answered {r.status_code}"


def daemon_client(home: Home) -> Client | None:
    """A client of the daemon running on ``home``, when one runs and serves the API."""
    from ..daemon.process import running

    info = running(home)
    where = read_address(home)
    if info is None or where is None or where.get("pid") != info.get("pid"):
        return None
    try:
        token = token_path(home).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return Client(where["url"], token) if token else None


def daemon_view(home: Home, path: str, **params) -> dict | None:
    """A view's data from the daemon running on ``home`` (through its API), or None
    when none runs or its API cannot answer: the caller then reads the store itself."""
    import logging

    client = daemon_client(home)
    if client is None:
        return None
    try:
        return client.get(path, **params)
    except ApiClientError as e:
        logging.getLogger(__name__).warning("%s: reading the store instead", e)
        return None
