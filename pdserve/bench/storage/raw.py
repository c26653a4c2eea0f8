"""`pdserve bench storage`'s raw Mooncake baseline: a fresh master and two spawned client processes, one putting
and the other getting exactly the objects one request of each length moves. Knows the clients only by
Mooncake's Python API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pdserve.bench.storage.modes import DEFAULT_LOCAL_BUFFER, DEFAULT_SEGMENT_BYTES
from pdserve.bench.transfer.client import ratio
from pdserve.bench.transfer.workload import KVLayout
from pdserve.config import parse_size
from pdserve.piped_child import PipedChild
from pdserve.procs import port_allocator
from pdserve.store.base import StoreError

RAW_START_TIMEOUT_S = 120.0  # a spawned client imports pdserve (torch): seconds on a loaded machine
RAW_REPLY_TIMEOUT_S = 120.0


def _raw_client(conn: Connection, options: dict[str, Any]) -> None:
    """Child process (spawn): one Mooncake Store client with one registered buffer of options["nbytes"] (random
    bytes for the putter, zeros for the getter), answering the parent's JSON commands {"op", "keys", "size"}:
    put / get / remove the keys at consecutive `size`-byte slices of the buffer, digest the first slices,
    where (the replicas' transport endpoints), stop. Its stderr goes to options["log_path"]."""
    import numpy as np

    log = os.open(options["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)  # Mooncake's glog lines go to the log, shown only when the client fails
    os.close(log)
    from mooncake.store import MooncakeDistributedStore

    def reply(message: dict[str, Any]) -> None:
        conn.send_bytes(json.dumps(message).encode())

    client = None
    try:
        client = MooncakeDistributedStore()
        code = client.setup(
            options["local_hostname"],
            options["metadata"],
            options["global_segment_size"],
            options["local_buffer_size"],
            "tcp",
            "",
            options["master"],
        )
        if code != 0:
            client = None  # NOTE: never call into a client whose setup failed: Mooncake crashes the process
            reply({"error": f"setup against {options['master']} failed with code {code}"})
            return
        nbytes = options["nbytes"]
        buffer = (
            np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
            if options["fill"]
            else np.zeros(nbytes, dtype=np.uint8)
        )
        code = client.register_buffer(buffer.ctypes.data, nbytes)
        if code != 0:
            reply({"error": f"register_buffer of {nbytes} bytes failed with code {code}"})
            return
        reply({"hostname": client.get_hostname()})
        while (command := json.loads(conn.recv_bytes()))["op"] != "stop":
            reply(_answer(client, buffer, command))
    except (EOFError, OSError):
        pass  # the parent went away
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        with contextlib.suppress(OSError):
            reply({"error": f"{type(e).__name__}: {e}"})
    finally:
        if client is not None:
            client.close()


def _answer(client: Any, buffer: Any, command: dict[str, Any]) -> dict[str, Any]:
    """The reply to one of the parent's commands (see _raw_client) about the client's registered `buffer`."""
    op, keys, size = command["op"], command.get("keys", []), command.get("size", 0)
    base, nbytes = buffer.ctypes.data, buffer.nbytes
    ptrs, sizes = [base + i * size for i in range(len(keys))], [size] * len(keys)
    if len(keys) * size > nbytes:
        return {"error": f"{len(keys)} objects of {size} bytes exceed the {nbytes}-byte buffer"}
    started = time.perf_counter()
    if op == "put":
        codes = client.batch_put_from(keys, ptrs, sizes)
    elif op == "get":
        codes = client.batch_get_into(keys, ptrs, sizes)
    elif op == "remove":
        codes = client.batch_remove(keys, True)  # force: a get leaves a lease
    elif op == "digest":
        view = buffer[: len(keys) * size]
        return {"digest": hashlib.blake2b(view.tobytes(), digest_size=16).hexdigest()}
    elif op == "where":
        replicas = client.batch_get_replica_desc(keys)
        return {
            "endpoints": [
                r.get_memory_descriptor().buffer_descriptor.transport_endpoint
                for key in keys
                for r in replicas.get(key, [])
                if r.is_memory_replica()
            ]
        }
    else:
        return {"error": f"unknown op {op!r}"}
    seconds = time.perf_counter() - started
    expected = size if op == "get" else 0  # get answers the bytes read, put and remove 0
    bad = [c for c in codes if c != expected]
    return {"seconds": seconds, "num_ok": len(codes) - len(bad), "codes": sorted(set(bad))[:5]}


class RawClient:
    """A spawned Mooncake Store client (_raw_client) and the pipe to it; its log is `log_dir`/raw-<name>.log."""

    def __init__(self, name: str, options: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"raw-{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._child = PipedChild(
            _raw_client,
            (options | {"log_path": str(self.log_path)},),
            f"pdserve-raw-{name}",
            f"the raw {name}",
            StoreError,
            self._tail,
        )
        try:
            self.hostname = str(self._recv(RAW_START_TIMEOUT_S)["hostname"])
        except BaseException:
            self.close()
            raise

    def ask(self, op: str, keys: Sequence[str] = (), size: int = 0) -> dict[str, Any]:
        self._child.send(json.dumps({"op": op, "keys": list(keys), "size": size}).encode())
        return self._recv(RAW_REPLY_TIMEOUT_S)

    def _tail(self, num_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-num_lines:]
        except OSError:
            return ""
        return f"; the last lines of its log ({self.log_path}):\n" + "\n".join(lines) if lines else ""

    def _recv(self, timeout_s: float) -> dict[str, Any]:
        reply = json.loads(self._child.recv(timeout_s))
        if "error" in reply:
            raise StoreError(f"the raw {self.name} failed: {reply['error']}{self._tail()}")
        return dict(reply)

    def close(self) -> None:
        """Stop the child (killing it after 30 s: Mooncake's teardown takes seconds); safe twice."""
        self._child.close(json.dumps({"op": "stop"}).encode(), 30.0)


def _checked(reply: dict[str, Any], op: str, num_keys: int) -> float:
    if reply["num_ok"] != num_keys:
        raise StoreError(
            f"raw Mooncake {op}: {num_keys - reply['num_ok']} of {num_keys} objects failed, codes {reply['codes']}"
        )
    return float(reply["seconds"])


def _rates(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "seconds": [round(s, 6) for s in seconds],
        "seconds_best": round(best, 6),
        "seconds_median": round(median, 6),
        "gb_per_s_best": round(nbytes / best / 1e9, 6),
        "gb_per_s_median": round(nbytes / median / 1e9, 6),
    }


def measure_raw(
    lengths: list[dict[str, Any]], layout: KVLayout, store_options: dict[str, Any], repeats: int, log_dir: Path
) -> dict[str, Any]:
    """Add each length's `raw` figures (the same objects through Mooncake alone); returns the setup's facts."""
    from pdserve.store.master import MasterProcess

    allocate = port_allocator()
    master = MasterProcess(port=allocate(), metadata_port=allocate())
    options = master.store_config() | {
        "local_hostname": str(store_options.get("local_hostname", "127.0.0.1")),
        "global_segment_size": parse_size(store_options.get("global_segment_size", DEFAULT_SEGMENT_BYTES)),
        "local_buffer_size": parse_size(store_options.get("local_buffer_size", DEFAULT_LOCAL_BUFFER)),
        "nbytes": max(x["num_objects"] for x in lengths) * layout.bytes_per_block,
    }
    print(
        f"[storage] raw Mooncake baseline: master {options['master']}, segments of "
        f"{options['global_segment_size'] / 2**20:.0f} MiB, buffers of {options['nbytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    with master, contextlib.ExitStack() as stack:
        putter = RawClient("putter", options | {"fill": True}, log_dir)
        stack.callback(putter.close)
        getter = RawClient("getter", options | {"fill": False}, log_dir)
        stack.callback(getter.close)
        for x in lengths:
            _measure_length(putter, getter, x, layout.bytes_per_block, repeats)
        return {
            "master_argv": master.command(),
            "clients": {"putter": putter.hostname, "getter": getter.hostname},
            "options": {k: v for k, v in options.items() if k != "fill"},
            "repeats": repeats,
        }


def _measure_length(putter: RawClient, getter: RawClient, x: dict[str, Any], size: int, repeats: int) -> None:
    """Add the `raw` figures of length record `x`: one untimed round (its copy checked, its placement counted),
    then `repeats` timed ones, each putting, getting and removing x's objects of `size` bytes."""
    n = x["num_objects"]
    puts, gets, placement = [], [], {"putter": 0, "getter": 0, "other": 0}
    for r in range(repeats + 1):
        keys = [f"pdserve-bench-raw-{x['input_len']}-{r}-{i}" for i in range(n)]
        put_s = _checked(putter.ask("put", keys, size), "put", n)
        get_s = _checked(getter.ask("get", keys, size), "get", n)
        if r == 0:  # untimed: connections are set up; check the copy and where the objects went
            if putter.ask("digest", keys, size)["digest"] != getter.ask("digest", keys, size)["digest"]:
                raise StoreError(
                    f"raw Mooncake: the getter read other bytes than the putter put ({n} objects of {size} bytes)"
                )
            for endpoint in putter.ask("where", keys)["endpoints"]:
                who = {putter.hostname: "putter", getter.hostname: "getter"}.get(endpoint, "other")
                placement[who] += 1
        else:
            puts.append(put_s)
            gets.append(get_s)
        _checked(putter.ask("remove", keys), "remove", n)
    nbytes = n * size
    x["raw"] = {
        "num_objects": n,
        "object_nbytes": size,
        "nbytes": nbytes,
        "repeats": repeats,
        "placement": placement,
        "put": _rates(nbytes, puts),
        "get": _rates(nbytes, gets),
    }
    storage = x["storage"]
    x["put_over_raw"] = ratio(storage["put_gb_per_s"], x["raw"]["put"]["gb_per_s_median"])
    x["get_over_raw"] = ratio(storage["get_gb_per_s"], x["raw"]["get"]["gb_per_s_median"])
    print(
        f"[storage] raw, {x['input_len']} tokens ({n} objects of {size / 2**10:.0f} KiB): put "
        f"{x['raw']['put']['gb_per_s_median']:.2f} GB/s, get {x['raw']['get']['gb_per_s_median']:.2f} GB/s "
        f"(median of {repeats})",
        flush=True,
    )
