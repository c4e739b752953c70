"""The DeepSpeed trainer behind ``launch/train.py``: one module per job.

cli (flags and early checks), data (files -> tokenized datasets, per-rank order),
embedded (the default model and task), engine (DeepSpeed config and engine),
checkpoint (atomic save / resume), metrics (progress bar and metrics.jsonl),
evaluate (held-out loss and multiple-choice accuracy), parallel (tensor parallelism:
TP size, TP/DP groups, layer sharding, gathered adapter export).
"""
