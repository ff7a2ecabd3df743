"""mmfm: one decoder-only transformer for text, image, mask, DNA, SVG and video tokens.

The engine is plain PyTorch: a Llama-style model that attends only within packed
documents, a streaming WebDataset loader, and a trainer with DCP checkpoints.
"""

__version__ = "0.1.0"
