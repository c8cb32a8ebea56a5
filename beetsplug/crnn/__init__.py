"""beets-crnn: a CRNN listens to your library; find tracks that sound alike.

beets finds the plugin class here; it lives in ``plugin.py``. Without beets (a machine that only
trains or exports a model) the package still imports, without the plugin class.
"""

try:
    import beets  # noqa: F401
except ImportError:  # training and export need no beets
    pass
else:
    from .plugin import CrnnPlugin  # noqa: F401
