"""Task metrics from generations: what the seed papers score their models by.

A task (`TaskConfig`: segmentation, svg, dna-classify, image, text) reads its examples from a
source as `mmfm prepare` reads it (examples.py), generates every answer in batches with a
model in memory under the span grammar (run.py: `run_task`), and scores the decoded answers
against the targets (scoring.py, with the metrics of metrics.py). `mmfm eval --task` runs
it on a checkpoint; training can run it on its own model (one process).
"""
