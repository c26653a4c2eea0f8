"""Helpers for the child processes pdserve starts (launch, bench): free loopback ports and parent-death signals.

Knows nothing about what runs in the children: only sockets, ports and a pre-exec hook.
"""

from __future__ import annotations

import ctypes
import signal
import socket
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_allocator() -> Callable[[], int]:
    """free_port(), never the same port twice."""
    taken: set[int] = set()

    def allocate() -> int:
        while (port := free_port()) in taken:
            pass
        taken.add(port)
        return port

    return allocate


def sigterm_on_parent_death() -> Callable[[], None] | None:
    """A pre-exec hook: Linux sends the child SIGTERM if its parent dies without stopping it (SIGKILL).

    None where prctl is not available (not Linux). NOTE: Linux sends the signal when the parent *thread*
    that started the child ends, so start children from a thread that outlives them.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child must not dlopen after fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
