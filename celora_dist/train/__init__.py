"""The DeepSpeed trainer behind ``launch/train.py``: one module per job.

errors (UsageError and the JSON/YAML reader: the leaf every other module imports),
cli (flags and early checks), prepare (the run settled and checked before any work),
data (files -> tokenized datasets, per-rank order), embedded (the default model and
task), model (target-module check, loading), engine (DeepSpeed config and engine),
parallel (tensor parallelism: TP size, TP/DP groups, layer sharding, gathered adapter
export), checkpoint (atomic save / resume), run (resume-or-seed, held-out evaluation
and periodic checkpoints around the step), metrics (step records, progress bar and
metrics.jsonl), evaluate (held-out loss and multiple-choice accuracy), finish
(summary.json and the summary line).
"""
