"""The daemon's HTTP API: the learning model and seal's views, for any tool.

- ``config``: ``ApiConfig``, the ``[api]`` settings;
- ``desk``: ``Desk``, the daemon's one model lent to requests one at a time (bounded);
- ``server``: the Starlette app (OpenAI-compatible chat, documents, status, queue,
  adapters, forgetting), bearer-token auth, body limits, JSON errors;
- ``service``: the token file, uvicorn on a thread of the daemon, ``<home>/api.json``;
- ``client``: what the CLI needs to use a running daemon's API (no torch).
"""
