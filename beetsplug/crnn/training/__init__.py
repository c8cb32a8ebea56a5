"""What only training and evaluation import (crnnembed and the searches never do); nothing here imports beets.

- ``train``: crnn-train and ``beet crnntrain DATA`` (options, ``run``)
- ``libtrain``: ``beet crnntrain QUERY`` and ``beet crnneval QUERY``, on the user's library
- ``finetune``: crnn-finetune, a model fine-tuned from the MSD CRNN (``probe``: its softmax genre probe)
- ``dataset`` (labelled sets, log-mel cache), ``augment`` (codec versions, log-mel edits),
  ``teacher`` (musicnn targets), ``fileid`` (cache keys by file content)
- ``evaluate`` (crnn-eval), ``metrics``, ``robustness``
- ``wccn`` (crnn-wccn), ``export`` (crnn-export: the ONNX export)
"""
