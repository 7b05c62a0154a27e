"""Data: the on-disk layouts, writing shards and eval sets, the training loader, the demo dataset.

- ``formats``: the training-shard and CLIP_benchmark eval-set layouts (constants, small readers).
- ``write``: building shards and eval sets from folders and caption files.
- ``loader``: the webdataset pipeline training reads (``TrainLoader``); it leads down into ``shards``,
  ``stream``, ``reader``, ``samples`` and ``images``, with ``schedule`` (who reads what, with which
  seed), ``state`` (its position and JSON) and ``elastic`` (approximate resume) beside them.
- ``images``: image bytes to RGB, the rule training and evaluation share.
- ``demo``: the embedded Fashion-MNIST subset and its captions.

Submodules are imported on use so that ``import mmggem.data.formats`` stays light.
"""
