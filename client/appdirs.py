"""Where the desktop app keeps its data: the bundled server's store and the packet cache
(``MEDVIEW_HOME`` / ``MEDVIEW_CACHE`` or the XDG folders). Used by the app and by the
headless commands alike. No Qt."""
from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    base = os.environ.get("MEDVIEW_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "medview")
    return Path(base)


def default_cache_path() -> Path:
    base = os.environ.get("MEDVIEW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "medview")
    return Path(base) / "packets.sqlite"


def open_cache(path: str | Path | None = None, *, disabled: bool = False):
    """The packet cache at ``path`` (default :func:`default_cache_path`), or None when
    the command was told not to use one (``--no-cache``)."""
    if disabled:
        return None
    from .cache import PacketCache

    return PacketCache(path or default_cache_path())


def cache_for(args):
    """:func:`open_cache` from a command's ``--cache`` / ``--no-cache`` arguments."""
    return open_cache(getattr(args, "cache", None), disabled=getattr(args, "no_cache", False))
