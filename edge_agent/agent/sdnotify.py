"""Minimal systemd notify client: one datagram per message to $NOTIFY_SOCKET (abstract sockets too)."""

from __future__ import annotations

import os
import socket

from edge_agent.logs import get_logger

log = get_logger(__name__)


class SystemdNotifier:
    """Sends READY=1, WATCHDOG=1, STOPPING=1, STATUS=... ; a no-op outside systemd."""

    def __init__(self, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()  # Linux abstract namespace
        elif address.startswith("/"):
            self.address = address
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(1.0)  # a reader that stopped reading must not hang the agent
                sock.connect(self.address)
                sock.sendall(message)
            return True
        except OSError as exc:
            log.warning("sd_notify_failed", socket=self.address, error=exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")


def _watchdog_seconds(env: dict[str, str]) -> float | None:
    """WATCHDOG_USEC applies to us only when WATCHDOG_PID is unset or our pid."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
