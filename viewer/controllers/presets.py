"""Window presets: the Window menu and the presets button built from the saved presets
(CT presets apply to CT; other modalities use the DICOM window or the histogram), the
histogram window, and saving the current window as a preset."""
from __future__ import annotations

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QInputDialog, QMenu, QToolButton

from imaging import windowing

__all__ = ["PresetController"]


class PresetController(QObject):
    """Uses of the window: ``settings``, ``stack``, ``series_ctl``, ``act_default_window``,
    ``act_auto_window``, ``act_save_preset`` (the preset actions are the window's, so
    their shortcuts work everywhere)."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.actions: list[QAction] = []
        self.window_menu: QMenu | None = None
        self.button = QToolButton(window)
        self.button.setText("Presets")
        self.button.setToolTip("Window presets")
        self.button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.button_menu = QMenu(window)
        self.button.setMenu(self.button_menu)

    def attach(self, window_menu: QMenu) -> QToolButton:
        """Fill the window's Window menu and the presets button (returned, for a tool
        bar) with the presets, now and whenever they change."""
        self.window_menu = window_menu
        window_menu.setObjectName("window_presets")
        self.rebuild()
        return self.button

    def rebuild(self) -> None:
        """Window menu and preset button from the saved presets."""
        w = self.w
        info = w.series_ctl.series_info
        modality = (info.modality if info else "") or ""
        for a in self.actions:
            w.removeAction(a)
            a.deleteLater()
        self.actions = []
        menus = [m for m in (self.window_menu, self.button_menu) if m is not None]
        for menu in menus:
            menu.clear()
        for i, preset in enumerate(w.settings.presets()):
            act = QAction(f"{preset.name}  (L {preset.center:g} W {preset.width:g})", w)
            act.setData(preset)
            if i < 9:
                act.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            act.setEnabled(modality.upper() in ("CT", ""))
            act.triggered.connect(lambda _c=False, p=preset: self.apply_window(p.center, p.width))
            w.addAction(act)
            self.actions.append(act)
        for menu in menus:
            for act in self.actions:
                menu.addAction(act)
            menu.addSeparator()
            menu.addAction(w.act_default_window)
            menu.addAction(w.act_auto_window)
            menu.addSeparator()
            menu.addAction(w.act_save_preset)

    def preset_action(self, name: str) -> QAction | None:
        for act in self.actions:
            if act.data().name.lower() == name.lower():
                return act
        return None

    def apply_window(self, center: float, width: float) -> None:
        if self.w.stack.decoded() is None:
            return
        self.w.stack.set_window(center, width)
        self.w.statusBar().showMessage(windowing.window_label(center, width), 2000)

    def default_window(self) -> None:
        self.w.stack.reset_window()

    def auto_window(self) -> None:
        img, meta = self.w.stack.decoded(), self.w.stack.meta()
        if img is None or meta is None or img.pixels.ndim != 2:
            return
        values = windowing.modality_values(img.pixels, meta.rescale_slope, meta.rescale_intercept)
        self.apply_window(*windowing.histogram_window(values))

    def save_preset(self) -> None:
        window = self.w.stack.window()
        if window is None:
            return
        name, ok = QInputDialog.getText(self.w, "Save window preset", "Name:")
        if ok and name.strip():
            presets = [p for p in self.w.settings.presets() if p.name != name.strip()]
            presets.append(windowing.WindowPreset(name.strip(), *window))
            self.w.settings.set_presets(presets)
            self.rebuild()
