"""Pure compute: image maths with no Qt, no HTTP and no database (layer 2 of 5).

Whole-slide pathology modules live here, bottom up:

``files``        durable files: atomic writes and checksums (used by every layer above)
``tilesource``   one TileSource interface for every slide format (TIFF/SVS, DICOM WSI,
                 OpenSlide when installed, plain images, arrays)
``pyramid``      the stored slide pyramid: level geometry, manifest, the reader
                 (:class:`~imaging.pyramid.StoredSlide`); the writer is
                 :mod:`server.slide_pyramid`
``qc``           colour cast, blur, folds, bubbles (thresholds configurable)
``sr``           the super-resolution generator, numpy inference; ``train_sr`` trains it
                 (PyTorch, optional); ``srdata`` the real histology it learns from
``viewport``     which level/tiles to show and prefetch; the pinned tile cache
``slide_sample`` the synthetic IHC sample slide and its degraded variants

Above this layer: the server's slide catalogue, store, tiers and pyramid ingest
(``server.slide_*``), the client's slide provider and SR queue
(:mod:`client.slides`, :mod:`client.srqueue`), the headless commands
(:mod:`commands.slide_cli`, :mod:`commands.slide_render`) and the Qt pane
(:mod:`viewer.slideview`). See docs/ARCHITECTURE.md.
"""
