"""Client calls of the server policy: versions, diagnosis status and records, the
client context for the automatic version choice. No Qt; every call blocks (network).

See :mod:`server.policy_routes` for the routes and bodies.
"""
from __future__ import annotations

import os
from typing import Any

from .session import Session


def machine_context() -> dict:
    """Memory (MB) and processor count of this computer, for ``version=auto``."""
    ctx: dict[str, Any] = {"cpus": os.cpu_count() or 1}
    try:
        ctx["memory_mb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        pass
    return ctx


class PolicyClient:
    """The policy routes of one logged-in :class:`~client.session.Session`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def _send(self, method: str, path: str, body: dict | None = None, **params) -> Any:
        return self.session.request(method, path, json=body, params=params or None).json()

    # ---------------------------------------------------------------- who and where
    def me(self) -> dict:
        return self._send("GET", "/api/me")

    def set_context(self, *, link_bps: float | None = None, memory_mb: float | None = None,
                    cpus: int | None = None, place: str | None = None,
                    latency_ms: float | None = None) -> dict:
        """Tell the server what ``version=auto`` should consider (V8); see
        :class:`client.link.ContextReporter` for the measured figures."""
        body = {k: v for k, v in (("link_bps", link_bps), ("memory_mb", memory_mb),
                                  ("cpus", cpus), ("place", place),
                                  ("latency_ms", latency_ms)) if v is not None}
        return self._send("POST", "/api/session/context", body)["context"]

    # ---------------------------------------------------------------- versions
    def versions(self, series_uid: str) -> dict:
        """Versions of a series (layers, ratios, quality, purpose, allowed), the automatic
        choice with its reasons, the user's rights and the diagnosis record."""
        return self._send("GET", f"/api/series/{series_uid}/versions")

    # ---------------------------------------------------------------- diagnosis
    def diagnosis(self, study_uid: str) -> dict:
        return self._send("GET", f"/api/studies/{study_uid}/diagnosis")

    def set_status(self, study_uid: str, status: int, comment: str | None = None) -> dict:
        return self._send("PUT", f"/api/studies/{study_uid}/status",
                          {"status": status, "comment": comment})

    def add_note(self, study_uid: str, text: str) -> dict:
        return self._send("POST", f"/api/studies/{study_uid}/notes", {"text": text})

    def edit_note(self, study_uid: str, item_id: int, text: str, base_rev: int) -> dict:
        return self._send("PUT", f"/api/studies/{study_uid}/notes/{item_id}",
                          {"text": text, "base_rev": base_rev})

    def delete_note(self, study_uid: str, item_id: int, base_rev: int) -> dict:
        return self._send("DELETE", f"/api/studies/{study_uid}/notes/{item_id}", base_rev=base_rev)

    def add_annotation(self, study_uid: str, annotation: dict) -> dict:
        return self._send("POST", f"/api/studies/{study_uid}/annotations", annotation)

    def edit_annotation(self, study_uid: str, item_id: int, annotation: dict, base_rev: int) -> dict:
        return self._send("PUT", f"/api/studies/{study_uid}/annotations/{item_id}",
                          {**annotation, "base_rev": base_rev})

    def delete_annotation(self, study_uid: str, item_id: int, base_rev: int) -> dict:
        return self._send("DELETE", f"/api/studies/{study_uid}/annotations/{item_id}",
                          base_rev=base_rev)

    def save_report(self, study_uid: str, text: str, base_rev: int | None = None) -> dict:
        """Create the report (``base_rev`` None) or edit it."""
        return self._send("PUT", f"/api/studies/{study_uid}/report",
                          {"text": text, "base_rev": base_rev})

    def history(self, study_uid: str, item_id: int) -> dict:
        return self._send("GET", f"/api/studies/{study_uid}/items/{item_id}/history")
