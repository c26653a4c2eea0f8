"""Helpers for the child processes pdserve starts (launch, bench): free loopback ports, parent-death signals, and
the listeners a process holds.

Knows nothing about what runs in the children: only sockets, ports and a pre-exec hook.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

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


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """The TCP listeners process `pid` holds, as (address, port): '0.0.0.0' or '::' is every interface.
    Read from /proc (Linux): the process's socket inodes matched against its network namespace's tables."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                hex_addr, hex_port = fields[1].split(":")
                found.append((_proc_address(hex_addr, family), int(hex_port, 16)))
    return sorted(set(found))


def _proc_address(hex_addr: str, family: int) -> str:
    """/proc/net/tcp's address: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)
