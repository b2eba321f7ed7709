"""Client library: session, packet cache, progressive transfers and decoding. No Qt."""
from .cache import PacketCache
from .pool import INTERACTION, PREFETCH, VISIBLE, CancelToken, WorkerPool
from .series import (Callbacks, Cancelled, Decoded, ImageProgress, SeriesData, Transfer,
                     TransferError, TransferProgress, run_in_order)
from .session import ConnectionFailed, ServerError, Session

__all__ = ["PacketCache", "WorkerPool", "CancelToken", "INTERACTION", "VISIBLE", "PREFETCH",
           "Callbacks", "Cancelled", "Decoded", "ImageProgress", "SeriesData", "Transfer",
           "TransferError", "TransferProgress", "run_in_order", "Session", "ServerError", "ConnectionFailed"]
