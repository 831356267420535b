#!/usr/bin/env bash
# The exact commands behind the shipped bone-suppression weights (see the model card for times).
# Run from the repository root after `make drr-data`. Stage 0 (phantom/*.yaml) is the previous,
# phantom-only release; the shipped models are fine-tuned from it (their `init:`) on real-CT DRRs +
# phantom pairs. Stage 0 ran on 2 CPU cores (its configs say how long); on a GPU it is retrained,
# not reproduced bit for bit. Run folders: ~/.cache/medidiff/runs/<name>; a stopped command resumes.
# DEVICE=cuda (the shipped run: one H200, about 4 minutes including data) or cpu (many hours on
# 2 cores); PYTHON names the interpreter. Budgets are wall-clock minutes in the configs.
set -euo pipefail
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
C=configs/bone_suppression
train() { "$PYTHON" -m medidiff.train --device "$DEVICE" "$@"; }
train $C/phantom/vqgan.yaml
train $C/phantom/ldm.yaml
"$PYTHON" -m medidiff.methods.bone_suppression_training --device "$DEVICE" $C/ldm.yaml  # DRR + phantom pairs
train $C/vqgan.yaml --export models/bone_suppression
train $C/ldm.yaml --export models/bone_suppression & ldm=$!
train $C/regression.yaml --export models/bone_suppression & regression=$!
wait $ldm; wait $regression
# the regression baseline trained on from that run's weights, 40 minutes on one CPU core (a session later)
OMP_NUM_THREADS=1 "$PYTHON" -m medidiff.train $C/regression_resumed.yaml --export models/bone_suppression
# the int8 model shipped beside the LDM (accelerate: {int8: {}}), made from its final weights (about a minute)
OMP_NUM_THREADS=1 "$PYTHON" -m medidiff.acceleration.make_int8 models/bone_suppression/ldm
