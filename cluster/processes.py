"""Child processes a command starts itself (a `vllm serve`, a `chillguard run`): a free local port
for them, and stopping one with everything it spawned, by its own process group (start it with
``start_new_session=True``). Never ``ray stop`` / ``pkill``: they hit processes this command did not
start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group of ``proc`` (started in its own session), SIGKILL it if it is still
    there after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
