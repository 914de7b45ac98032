#!/usr/bin/env bash
# The same model trained three ways on 4 CPU ranks, data parallel, tensor parallel and pipeline
# parallel, beside one device: per-rank memory (weights, grads, Adam state, activations),
# bytes sent per step by each group, step time, and the planner's prediction of each.
#
#   bash examples/compare_strategies.sh [--num-layers 8 --hidden-size 64 --steps 3]
#
# What to look for: dp4 keeps everything a single device holds on every rank and pays one
# all-reduce of the grads per step; tp4 divides weights, grads and state by 4 but sends
# activations twice per layer per pass; pp4 divides them by 4 too and sends only the
# boundary activations, at the price of the pipeline bubble. The times are CPU and gloo:
# the shape of the trade-off, not GPU speed.
set -euo pipefail
cd "$(dirname "$0")/.."
python tools/compare_parallelism.py --layouts single dp4 tp4 pp4 "$@"
