"""The API's settings (``[api]`` in seal.toml)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool = field(default=True, metadata={"help": "serve the HTTP API from the daemon (false: no API, no token)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on; anything but loopback also needs `--public` (every request still needs the token)"})
    port: int = field(default=8765, metadata={"help": "TCP port; 0 = any free port (written to <home>/api.json)"})
    max_body_bytes: int = field(default=4_000_000, metadata={"help": "largest request body; larger ones get 413"})
    max_tokens: int = field(default=512, metadata={"help": "most tokens one chat completion may generate (a larger max_tokens is cut to this)"})
    default_tokens: int = field(default=256, metadata={"help": "tokens a chat completion generates when the request does not say (at most max_tokens)"})
    queue: int = field(default=8, metadata={"help": "chat requests held at once (waiting for the model or being answered); one more gets 503"})
    wait_s: float = field(default=300.0, metadata={"help": "longest a chat request waits for the model (busy learning) before 503"})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        for name in ("max_body_bytes", "max_tokens", "default_tokens", "queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.wait_s > 0:
            raise ValueError(f"wait_s must be positive, got {self.wait_s}")
        if not self.host.strip():
            raise ValueError("host is empty")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the API."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
