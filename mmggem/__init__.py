"""mmggem: CLIP training with Group Generalized Mean (GGeM) pooling.

The model-level API is importable without the trainer::

    import mmggem
    model = mmggem.create_model("ViT-Ti-4-28", pooling="ggem")
    mmggem.save_model(model, "out/model")
    model, preprocess, tokenizer = mmggem.load("out/model")
"""
from typing import Any

from .version import __version__

__all__ = ["__version__", "create_model", "load", "save_model"]


def __getattr__(name: str) -> Any:
    # Lazy so that `mmggem --version` and `import mmggem.model.pooling` stay light.
    if name in ("create_model", "load", "save_model"):
        from .model import clip

        return getattr(clip, name)
    raise AttributeError(f"module 'mmggem' has no attribute {name!r}")
