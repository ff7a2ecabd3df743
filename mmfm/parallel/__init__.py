"""Parallelism: one device mesh; tensor + sequence, pipeline and fully-sharded data parallel.

Only this package touches process groups; the model stays plain PyTorch and `parallelize()`
applies every layout to it from outside.
"""
