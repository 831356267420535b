#!/usr/bin/env bash
# The exact commands behind the shipped restoration weights (models/restoration/<task>/; the model
# cards say how long each took). Run from the repository root after `make drr-data` (the training CT).
# CPU, one thread per run (two runs side by side on a 2-core machine); budgets are wall-clock
# minutes in the configs, so a busier machine trains fewer steps. Run folders:
# ~/.cache/medidiff/runs/<name>; a stopped command resumes from its checkpoint.
set -euo pipefail
PYTHON=${PYTHON:-python}
C=configs/restoration
train() { OMP_NUM_THREADS=1 "$PYTHON" -m medidiff.train "$@"; }
ship() { train "$C/$1_$2.yaml" --export "models/restoration/$1" "${@:3}"; }
# keep TASK METHOD LABEL: a copy of a run's current export, the init: of a config started from it
keep() { mkdir -p ~/.cache/medidiff/runs/$1_$2_$3 && cp ~/.cache/medidiff/runs/restoration_$1_$2/$2.* ~/.cache/medidiff/runs/$1_$2_$3/; }

# The shipped runs, in this order (2026-11-26, one 2-core machine shared with other jobs):
# 4x MR super-resolution: the UNet regression 90 minutes (45, resumed to 90: 2734 steps); a session later
# (2026-11-27, a faster AVX-512 CPU) ResShift (T = 4) from those weights for 1538 steps, then the regression
# itself trained 1538 steps more (the same total budget)
ship mr_sr4 regression
ship mr_sr4 regression --max-minutes 90
ship mr_sr4 resshift_from_final_regression
ship mr_sr4 regression_resumed
# 2x MR super-resolution: the same recipe at half the budget, 20 minutes then 20
ship mr_sr2 regression
keep mr_sr2 regression 20min
ship mr_sr2 resshift & ship mr_sr2 regression --max-minutes 40 & wait
# low-dose CT denoising: ResShift (T = 4) and the regression (UPSR's uncertainty estimator too), each to
# T = 15's 1776 steps (first runs 30 minutes = 1360 steps, resumed to 1776 a session later; UPSR below was
# trained against the 1360-step regression)
ship ct_denoise resshift & ship ct_denoise regression & wait
# 4x radiograph super-resolution: the regression 75 minutes (15, resumed to 45 beside other jobs, then to
# 75: 3546 steps); a session later (2026-11-27, a faster AVX-512 CPU) ResShift (T = 4) and UPSR from those
# weights (UPSR's uncertainty estimator too), 3275 steps each side by side (21 and 32 minutes), then the
# regression itself trained 3275 steps more; a session later ResShift and the regression both resumed to
# 6550 steps side by side (22 minutes each; the same total budget for both)
ship xray_sr4 regression
ship xray_sr4 regression --max-minutes 45
ship xray_sr4 regression --max-minutes 75
ship xray_sr4 resshift_from_final_regression & ship xray_sr4 upsr & wait
ship xray_sr4 regression_resumed
# the one-step student of the CT ResShift teacher (400 steps; distilled again, --fresh, from the 1776-step
# teacher); ResShift T = 15 for the 4-vs-15-step comparison
# (15 minutes, later resumed to 30: ship ct_denoise resshift15 --max-minutes 30)
ship ct_denoise one_step & ship ct_denoise resshift15 & wait
# plug-and-play: the optimal boundary conditions of the SR ResShift models (written into resshift.json)
for task in mr_sr4 xray_sr4; do
  OMP_NUM_THREADS=1 "$PYTHON" -m medidiff.methods.optimal_boundary $task --candidates 16 --pairs 8
done
# UPSR, SAM-DiffSR, Resfusion and RDDM with the T = 4 model's 1360 steps (max_steps), four side by side
ship ct_denoise upsr & ship ct_denoise samdiffsr & ship ct_denoise resfusion --fresh & ship ct_denoise rddm --fresh & wait
# the small DiT (ResShift T = 15) that the transformer transforms act on (28 minutes, exported as resshift15_dit)
ship ct_denoise dit
# the int8 models shipped beside the regressions and CT ResShift (accelerate: {int8: {}}), made from the
# final weights (about a minute)
OMP_NUM_THREADS=1 "$PYTHON" -m medidiff.acceleration.make_int8 models/restoration/{ct_denoise,mr_sr2,mr_sr4,xray_sr4}/regression \
  models/restoration/ct_denoise/resshift
