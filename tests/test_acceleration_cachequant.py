"""CacheQuant on a tiny diffusers UNet: the dynamic-programming schedule, decoupled error correction,
save/reload, composition refusals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from medidiff.acceleration import (
    DeepCache,
    TransformError,
    applied,
    record_model_inputs,
    transforms_from_spec,
)
from medidiff.acceleration.cachequant import CacheQuant, optimal_refresh_steps, sampling_runs
from tests.test_acceleration import STEPS, rel_err, run
from tests.test_quantization_kernels import tiny_model

REFRESHES = 4


def schedule_error(errors: torch.Tensor, starts: list[int]) -> float:
    bounds = [*starts, len(errors)]
    return sum(float(errors[j, j:n].sum()) for j, n in itertools.pairwise(bounds))


def test_dp_schedule_is_the_hand_checked_optimum():
    # a cache refreshed at step 1 costs 5 per later step, at 0 and 2 1 per step, at 3 nothing; the refresh
    # at step 1 itself costs 0.5. Two refreshes: [0, 1] [2, 3] costs 1 + 1 = 2, [0] [1, 2, 3] 15.5,
    # [0, 1, 2] [3] 3; three: [0] [1] [2, 3] 1.5, [0] [1, 2] [3] 5.5, [0, 1] [2] [3] 1
    errors = torch.zeros(4, 4)
    for j, slope in enumerate([1.0, 5.0, 1.0, 0.0]):
        for i in range(j, 4):
            errors[j, i] = slope * (i - j)
    errors[1, 1] = 0.5
    assert optimal_refresh_steps(errors, 2) == [0, 2]
    assert optimal_refresh_steps(errors, 3) == [0, 2, 3]
    assert optimal_refresh_steps(errors, 2, max_gap=2) == [0, 2]
    with pytest.raises(TransformError, match="4 steps cannot be split into 3 refreshes of 2 to"):
        optimal_refresh_steps(errors, 3, min_gap=2)


def test_dp_schedule_beats_every_other_schedule():
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(9, 9, generator=gen).triu()
    for refreshes, min_gap, max_gap in ((3, 1, None), (3, 2, 4), (4, 1, 3)):
        feasible = [[0, *rest] for rest in itertools.combinations(range(1, 9), refreshes - 1)
                    if all(min_gap <= n - j <= (max_gap or 9) for j, n in itertools.pairwise([0, *rest, 9]))]
        best = min(schedule_error(errors, s) for s in feasible)
        picked = optimal_refresh_steps(errors, refreshes, min_gap, max_gap)
        assert picked in feasible and schedule_error(errors, picked) == pytest.approx(best)


@pytest.fixture(scope="module")
def model_fn():
    return tiny_model(0)


@pytest.fixture(scope="module")
def calibration(model_fn):
    return record_model_inputs(model_fn, lambda: [run(model_fn, seed) for seed in (1, 2)], every=1)


@pytest.fixture(scope="module")
def made(model_fn, calibration):
    """CacheQuant (W4A8) made once for the module, and the same without its error correction."""
    cq = CacheQuant(calibration, REFRESHES, weight_bits=4, act_bits=8, every=2)
    cq.apply(model_fn)
    cq.remove(model_fn)
    uncorrected = copy.copy(cq)
    uncorrected.correct = False
    return {True: cq, False: uncorrected}


def test_schedule_minimises_the_combined_cache_and_quantization_error(made):
    cq = made[True]
    assert cq.errors.shape == (STEPS, STEPS) and cq.refresh_steps[0] == 0 and len(cq.refresh_steps) == REFRESHES
    # the kept feature of the quantized model differs from the float one even without caching
    assert (cq.errors.diagonal() > 0).all()
    feasible = [[0, *rest] for rest in itertools.combinations(range(1, STEPS), REFRESHES - 1)
                if all(2 <= n - j <= 5 for j, n in itertools.pairwise([0, *rest, STEPS]))]  # 10 / 4 steps: half to twice
    assert schedule_error(cq.errors, cq.refresh_steps) == pytest.approx(min(schedule_error(cq.errors, s)
                                                                            for s in feasible))


def step_outputs(model_fn, runs) -> list[torch.Tensor]:
    """The model function's outputs on the calibration runs' inputs, fed in order."""
    outs = []
    with torch.no_grad():
        for calls in runs:
            model_fn.reset_hooks()
            outs += [model_fn(x, t, c) for x, t, c in calls]
    return outs


def test_error_correction_lowers_the_error_on_calibration_data(model_fn, calibration, made):
    runs = sampling_runs(calibration)
    reference = step_outputs(model_fn, runs)
    errors = {}
    for correct, cq in made.items():
        with applied(model_fn, cq):
            errors[correct] = sum(float((o - r).pow(2).sum()) for o, r in zip(step_outputs(model_fn, runs), reference,
                                                                                strict=True))
    assert errors[True] < errors[False]
    a, b = made[True].cache_fix
    refreshed = torch.tensor([i in made[True].refresh_steps for i in range(STEPS)])
    assert (a[refreshed] == 1).all() and (b[refreshed] == 0).all() and not (a[~refreshed] == 1).all()


def test_cachequant_stays_close_saves_reloads_and_removes(model_fn, made, tmp_path):
    baseline = run(model_fn)
    with applied(model_fn, made[True]):
        out = run(model_fn)
        assert 0 < rel_err(out, baseline) < 0.5
    assert torch.equal(run(model_fn), baseline)
    path = made[True].save(tmp_path / "cq.safetensors")
    (loaded,) = transforms_from_spec({"cachequant": {"file": str(path)}})
    assert loaded.refresh_steps == made[True].refresh_steps
    with applied(model_fn, loaded):
        assert torch.equal(run(model_fn), out)
    with pytest.raises(TransformError, match="was made for other weights"):
        loaded.apply(tiny_model(1))


def test_cachequant_refusals_are_clear(model_fn, calibration, made):
    with applied(model_fn, DeepCache(interval=2)), pytest.raises(TransformError, match="remove deepcache first"):
        made[True].apply(model_fn)
    uneven = type(calibration)(calibration.inputs[:-1])
    with pytest.raises(TransformError, match="whole sampling runs"):
        sampling_runs(uneven)
    with pytest.raises(TransformError, match="refreshes is 11"):
        CacheQuant(calibration, 11).apply(model_fn)
