"""The bind-address shim: Mooncake's listeners on the address a deployment names, never on every interface.

Mooncake's transfer engine (its RPC and TCP data ports) and the master's HTTP metadata server bind to the
wildcard address whatever host they are given. `bindhost.c`, built once with the machine's C compiler into
the cache directory and preloaded (LD_PRELOAD) into the processes that run Mooncake, sends every wildcard
bind to PDSERVE_BIND_HOST (127.0.0.1 by default) instead. It reads that variable on each bind, so a process
names the host before each listener it opens (`bind_here`). PDSERVE_BIND_HOST=* opts out: wildcard binds stay
on every interface, and nothing is built.

Pure Python: no torch. docs/security.md says what listens where.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pdserve.config import cache_dir

SOURCE = Path(__file__).with_name("bindhost.c")
HOST_VAR = "PDSERVE_BIND_HOST"
ANY_INTERFACE = "*"
DEFAULT_HOST = "127.0.0.1"


class ShimUnavailable(RuntimeError):
    """The shim cannot be built here (no C compiler, or the build failed)."""


def bind_host() -> str:
    """The address wildcard binds go to: PDSERVE_BIND_HOST, or loopback."""
    return os.environ.get(HOST_VAR) or DEFAULT_HOST


def shim_path() -> Path:
    """The built shim, building it on first use (keyed by the source's hash, so an edit rebuilds it)."""
    source = SOURCE.read_bytes()
    target = cache_dir() / "native" / f"bindhost-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ShimUnavailable(
            "no C compiler (cc) to build pdserve's bind-address shim, without which Mooncake listens on every "
            "interface; install one (apt-get install gcc), or set PDSERVE_BIND_HOST='*' to accept that"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(built), str(SOURCE), "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ShimUnavailable(f"building pdserve's bind-address shim failed ({' '.join(cmd)}):\n{done.stderr}")
        os.replace(built, target)  # atomic: concurrent builders each install a whole file
    return target


def preload_env(host: str | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the shim preloaded and wildcard binds sent to `host` (default:
    bind_host()), for a child that runs Mooncake. Unchanged where the host is '*'. Raises ShimUnavailable."""
    result = dict(os.environ if env is None else env)
    host = host or result.get(HOST_VAR) or DEFAULT_HOST
    if host == ANY_INTERFACE or result.get(HOST_VAR) == ANY_INTERFACE:
        return result
    host = address_of(host)
    preload = [p for p in result.get("LD_PRELOAD", "").split(":") if p]
    shim = str(shim_path())
    result["LD_PRELOAD"] = ":".join([shim, *[p for p in preload if p != shim]])
    result[HOST_VAR] = host
    return result


def bind_here(host: str) -> None:
    """Before this process opens a Mooncake listener for `host`: wildcard binds go there, and Mooncake
    advertises it (MC_TCP_BIND_ADDRESS). Leaves an opt-out ('*') alone."""
    if os.environ.get(HOST_VAR) == ANY_INTERFACE:
        return
    address = address_of(host)
    os.environ[HOST_VAR] = address
    os.environ["MC_TCP_BIND_ADDRESS"] = address


def address_of(host: str) -> str:
    """`host` as an IP literal (the shim binds addresses, not names): a name is resolved here, once."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve the bind host {host!r}: {e}") from None


def is_preloaded() -> bool:
    """Whether the shim is loaded into this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/bindhost-" in maps
