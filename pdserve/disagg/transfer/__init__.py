"""Transfer engines: how one worker rank writes KV blocks into a peer rank's device KV cache."""

from pdserve.disagg.transfer.base import TransferEngine, TransferError, open_engines

__all__ = ["TransferEngine", "TransferError", "open_engines"]
