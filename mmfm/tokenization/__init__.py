"""Tokenization: the unified vocabulary and one tokenizer per modality (text, DNA, SVG).

`Tokenizers` (tokenizers.py) is the entry point: trained from a recipe in `tokenizers/`,
it turns a raw record into a framed token document.
"""
