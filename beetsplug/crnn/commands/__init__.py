"""The beets commands, one module per command family; ``plugin.py`` only registers them.

- ``embed``: ``beet crnnembed`` and the import stage (analyse, store the attributes)
- ``index``: ``beet crnnindex`` and the similarity index files the searches load
- ``similar``: ``beet similar`` (tracks, ``-a`` albums) and ``beet crnnpath`` (song paths), their
  playlists
- ``mixes``: ``beet crnnplaylists``, the saved mixes in ``crnn.playlists`` (and after imports)
- ``radio``: ``beet crnnradio``, the library end of the MPD radio in ``radio.py``
- ``train``: ``beet crnntrain`` and ``beet crnneval``, on a library query or on labelled DATA
- ``common``: what several of them share (progress bar, one-line errors, argparse options as beets options)

Each module has ``add_options(parser)`` and ``run(plugin, lib, opts, args)``; the plugin passes
itself for its config, its model card and its log.
"""
