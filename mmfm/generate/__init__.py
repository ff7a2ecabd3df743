"""`mmfm generate`: load a checkpoint or an exported Hugging Face folder (load.py) and sample it
with `mmfm.decoding` (command.py): encode the prompts, generate, write every span as a file.
"""
