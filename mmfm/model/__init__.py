"""The transformer (plain PyTorch, built on `meta`) and its attention backends."""

from mmfm.model.init import init_weights
from mmfm.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model", "init_weights"]
