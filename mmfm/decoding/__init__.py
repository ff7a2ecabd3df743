"""Sampling a model in one process: KV cache, samplers, modality-constrained decoding, files out.

`generate` (engine.py) runs a batch of prompts with the model's KV cache
(`mmfm.model.cache`), a sampler (sampling.py) and the vocabulary's span grammar
(constraints.py, over the id layout of layout.py); prompts.py tokenizes prompts with files
as training tasks' prompts; outputs.py decodes every generated span into a file. Below
`train`, so that a run can sample its own model; `mmfm generate` (mmfm.generate) loads a
checkpoint or an exported Hugging Face folder and drives these.
"""
