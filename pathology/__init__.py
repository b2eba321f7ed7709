"""Pathology: whole-slide images as JPEG 2000 tile pyramids (issue 6; SPEC W1-W7, H3, H5).

No Qt anywhere in this package. Modules, bottom up:

``tilesource``  one TileSource interface for every slide format (TIFF/SVS, DICOM WSI,
                OpenSlide when installed, plain images, arrays)
``pyramid``     the stored pyramid (J2K tile codestreams per level) and the ingest
``catalogue``   patient -> pathology exam -> slide (SQLite, foreign keys), tier journal,
                generated-tile records, reading stations
``qc``          colour cast, blur, folds, bubbles (thresholds configurable)
``store``       tier folders + catalogue + ingest-with-QC
``tiers``       recent / mid / long / temp; copy-verify-commit-delete moves; idle scheduler
``organise``    gather one patient; pre-distribute to reading-station caches
``sr``          the super-resolution generator, numpy inference; ``train_sr`` trains it
                (PyTorch, optional); ``srdata`` the real histology it learns from
``srqueue``     the SR priority queue (view pre-empts background) and the temp-tier cache
``provider``    tiles from the local store or through the packet protocol
``viewport``    which level/tiles to show and prefetch; the pinned tile cache
``render``      headless rendering (``medview render --slide``); ``cli`` the commands

Server side, :mod:`server_stub.slides` exposes slides through the packet protocol;
the Qt pane is :mod:`viewer.slideview`. Layering: ``pathology`` imports ``codestream``,
``client`` (session, cache, pool) and two generic helpers of ``server_stub``
(``dbutil.Db``, ``faults.point``); it never imports ``viewer``.
"""
