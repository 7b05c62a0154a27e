"""Data: the on-disk layouts, writing shards and eval sets, the training loader, the demo dataset.

- ``formats``: the training-shard and CLIP_benchmark eval-set layouts (constants, small readers).
- ``write``: building shards and eval sets from folders and caption files.
- ``loader``: the webdataset pipeline training reads (``TrainLoader``).
- ``demo``: the embedded Fashion-MNIST subset and its captions.

Submodules are imported on use so that ``import mmggem.data.formats`` stays light.
"""
