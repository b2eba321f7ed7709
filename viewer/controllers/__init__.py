"""The main window's controllers: each owns one concern of :class:`viewer.mainwindow.MainWindow`
and the state that goes with it; the window builds the widgets and menus and wires them.

- :mod:`.series`      the series shown in the stack view: its loader, focus, cine, resolution
- :mod:`.transfers`   progress panel, status bar, cancel / resume, server busy, cache upkeep
- :mod:`.connection`  bundled server or login, what changes when the session does
- :mod:`.browse`      study browser searches, PACS queries and retrieve, thumbnails
- :mod:`.files`       local import (dialogs, drag and drop) and study export
- :mod:`.reading`     the reading dock: version / policy sentence, diagnosis, priors
- :mod:`.presets`     window presets (menu, histogram window, saving)
- :mod:`.threed`      MPR and VR windows
- :mod:`.slides`      slide windows and the reading station's worklist
- :mod:`.preferences` the preferences dialog and what its settings change

A controller is given the window and reaches its widgets and sibling controllers through
it; it never imports :mod:`viewer.mainwindow`. Whatever waits on the network, reads files
or decodes runs in a :class:`viewer.workers.Task` (the worker pool) or in the series
loader; the slots here only move results onto widgets.
"""
