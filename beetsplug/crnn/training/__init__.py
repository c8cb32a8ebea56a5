"""What only training and evaluation import (crnnembed and the searches never do); nothing here imports beets.

- ``train``: crnn-train and ``beet crnntrain DATA`` (options, ``run``), built from ``losses``,
  ``sampling`` (the data of a run, an epoch's crops), ``fit`` (the fit loop) and ``card`` (``save_model``)
- on the user's library (``beet crnntrain QUERY``, ``beet crnneval QUERY``): ``taxonomy`` (genres and the
  artist split), ``excerpts`` (the log-mel excerpt cache), ``library_train``, ``library_eval``
- ``finetune``: crnn-finetune, a model fine-tuned from the MSD CRNN (``probe``: its softmax genre probe)
- ``dataset`` (labelled sets, log-mel cache), ``augment`` (codec versions, log-mel edits),
  ``teacher`` (musicnn targets), ``fileid`` (cache keys by file content)
- ``evaluate`` (crnn-eval), ``metrics``, ``robustness``
- ``wccn`` (crnn-wccn), ``export`` (crnn-export: the ONNX export)
"""
