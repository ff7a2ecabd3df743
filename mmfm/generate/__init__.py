"""Sampling a trained model: KV cache, samplers, modality-constrained decoding, files out.

`mmfm generate` (command.py) loads a checkpoint or an exported Hugging Face folder
(load.py), runs `generate` (engine.py) over a batch of prompts with the model's KV cache
(`mmfm.model.cache`), a sampler (sampling.py) and the vocabulary's span grammar
(constraints.py, over the id layout of layout.py), then decodes every generated span into a
file (outputs.py).
"""
