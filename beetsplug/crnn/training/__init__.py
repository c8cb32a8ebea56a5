"""What only training and evaluation run; nothing here imports beets (or TensorFlow at import time).

Every ``beet`` start imports the option code of ``beet crnntrain`` and ``beet crnneval`` (``train``,
``library_train``, ``library_eval`` and what they import: some 40 ms on 2 cores); ``crnnembed`` and the
searches run none of it.

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
