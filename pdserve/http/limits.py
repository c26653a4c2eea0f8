"""Limits on what one HTTP request may send, shared by the API server and the router.

The defaults live here so that `pdserve serve`, `pdserve router` and `pdserve launch` agree.
"""

from __future__ import annotations

import argparse

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request body past this is a 413, answered before it is read
DEFAULT_STALL_TIMEOUT_S = 10.0  # an engine core or an instance silent this long is stalled


def add_robustness_args(parser: argparse.ArgumentParser) -> None:
    """--max-request-bytes and --stall-timeout: the same flags on `serve`, `router` and `launch`."""
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="a request body larger than this is answered 413 before it is read (default: 4 MiB)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        metavar="SECONDS",
        help="an engine core that makes no progress, or an instance that sends nothing on a request, this long "
        "has stalled: its streams end with an error event, or move to another instance (default: 10)",
    )
