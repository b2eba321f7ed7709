"""Offscreen rendering of the stack view, for ``medview snapshot`` and tests.

It renders the very :class:`~viewer.stackview.StackView` the desktop app shows, so a
snapshot is what a user would see (overlays included unless switched off).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from PySide6.QtCore import Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication

from imaging.model import DecodedImage, ImageMeta, SeriesInfo
from .stackview import StackView

__all__ = ["ensure_application", "render_view_to_image"]

_app: QApplication | None = None


def ensure_application() -> QApplication:
    """The running QApplication, or a new one (offscreen platform unless one is set)."""
    global _app
    app = QApplication.instance()
    if app is None:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        _app = app = QApplication([])
    return app  # type: ignore[return-value]


def render_view_to_image(
    series_info: SeriesInfo | None,
    meta: ImageMeta,
    decoded: DecodedImage,
    *,
    window: Sequence[float] | None = None,
    size: tuple[int, int] = (512, 512),
    overlays: bool = True,
    invert: bool = False,
    patches: Sequence[DecodedImage] = (),
) -> QImage:
    """Render one image as the stack view shows it, fitted, into a ``size`` QImage (RGB32).

    ``window`` is (center, width) in modality units (default: the view's default window);
    ``patches`` are region-at-full-resolution arrays drawn over ``decoded``.
    """
    app = ensure_application()
    view = StackView()
    try:
        view.setAttribute(Qt.WidgetAttribute.WA_DontShowOnScreen, True)
        view.setMinimumSize(1, 1)
        view.resize(*size)
        view.set_series(series_info)
        if not view.set_image(decoded, meta):
            raise ValueError(f"image {meta.index + 1} ({meta.sop_instance_uid}) is not part of the series")
        for patch in patches:
            view.set_image(patch, meta)
        if window is not None:
            view.set_window(float(window[0]), float(window[1]))
        view.set_invert(invert)
        view.set_overlays_visible(overlays)
        view.show()
        app.processEvents()
        view.fit()
        image = view.grab().toImage().convertToFormat(QImage.Format.Format_RGB32)
        if (image.width(), image.height()) != tuple(size):
            image = image.scaled(size[0], size[1], Qt.AspectRatioMode.IgnoreAspectRatio,
                                 Qt.TransformationMode.SmoothTransformation)
        return image
    finally:
        view.close()
        view.deleteLater()
