"""Processes as objects: DDPM/DDIM against diffusers' schedulers, step hooks, ResShift's marginals."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from medidiff.diffusion.gaussian import DDIM, DDPM, cosine_alphas_cumprod
from medidiff.diffusion.resshift import ResShift, resshift_etas
from medidiff.diffusion.sampling import sample

T = 1000


def fake_eps(x, t):
    """A deterministic stand-in for a noise estimator that depends on x and t."""
    return 0.6 * x + 0.3 * torch.sin(x * 3 + t / 100)


def diffusers_trajectory(scheduler, x, seed, **step_options):
    gen = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_eps(x, t.item()), t, x, generator=gen, **step_options).prev_sample
    return x


def our_trajectory(process, x, seed):
    gen = torch.Generator().manual_seed(seed)
    return sample(lambda x, t, c: fake_eps(x, t[0].item()), process, x, generator=gen)


@pytest.fixture()
def schedule():
    """diffusers' cosine schedule, given to both sides so that only the step arithmetic is compared."""
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_diffusers_on_a_respaced_schedule(schedule, clip):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = DDPM(schedule, [lambda x0, i, n: x0.clamp(-1, 1)] if clip else [])
    ours.set_timesteps(20)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                           clip_sample_range=1.0, variance_type="fixed_small")
    theirs.set_timesteps(timesteps=ours.timesteps)
    expected = diffusers_trajectory(theirs, x, seed=1)
    got = our_trajectory(ours, x, seed=1)
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()
    assert not torch.allclose(got, our_trajectory(ours, x, seed=2), atol=1e-2)  # really stochastic


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers(schedule, clip):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=clip,
                           clip_sample_range=1.0, set_alpha_to_one=True, timestep_spacing="leading")
    theirs.set_timesteps(10)
    ours = DDIM(schedule, [lambda x0, i, n: x0.clamp(-1, 1)] if clip else [])
    ours.set_timesteps(timesteps=theirs.timesteps.tolist())
    expected = diffusers_trajectory(theirs, x, seed=1, use_clipped_model_output=True)
    got = our_trajectory(ours, x, seed=1)
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


def test_cosine_schedule_is_diffusers_squaredcos(schedule):
    assert torch.allclose(cosine_alphas_cumprod(T).float(), schedule, atol=1e-4)


def test_step_hooks_see_every_step_with_its_index():
    seen = []

    def hook(x0, i, n):
        seen.append((i, n))
        return x0

    process = DDPM(cosine_alphas_cumprod(T), [hook])
    process.set_timesteps(7)
    sample(lambda x, t, c: x, process, torch.zeros(1, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert seen == [(i, 7) for i in range(7)]


def test_set_timesteps_refuses_bad_requests():
    process = DDIM(cosine_alphas_cumprod(T))
    for bad in ({"steps": 0}, {"steps": T + 1}, {"timesteps": [3, 5]}, {}):
        with pytest.raises(ValueError):
            process.set_timesteps(**bad)
    process.set_timesteps(10)
    assert process.timesteps[0] == T - 1 and process.timesteps[-1] == 0 and len(process.timesteps) == 10


def test_resshift_schedule_follows_the_paper():
    etas = resshift_etas(15, kappa=2.0, power=0.3, min_noise_level=0.04)
    assert etas[0].item() == pytest.approx(0.02**2) and etas[-1].item() == pytest.approx(0.99**2)
    assert torch.all(etas[1:] > etas[:-1])


@pytest.mark.parametrize("t", [0, 7, 14])
def test_resshift_forward_marginal(t):
    """x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps: mean and variance over many samples."""
    process = ResShift(15, kappa=2.0)
    n = 200_000
    x0, y = torch.full((n, 1), 0.3), torch.full((n, 1), -0.5)
    xt = process.add_noise(x0, torch.randn(n, 1, generator=torch.Generator().manual_seed(t)), torch.full((n,), t), y)
    eta = process.etas[t].item()
    assert xt.mean().item() == pytest.approx(0.3 + eta * (-0.8), abs=4 * 2 * eta**0.5 / n**0.5)
    assert xt.var().item() == pytest.approx(4 * eta, rel=0.02)


def test_resshift_reverse_step_keeps_the_marginals():
    """With the true x0 as the model output, one step from q(x_t | x0, y) lands on q(x_{t-1} | x0, y)."""
    process = ResShift(4, kappa=2.0)
    process.set_timesteps(4)
    n, t = 200_000, 2
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.full((n, 1), 0.3), torch.full((n, 1), -0.5)
    xt = process.add_noise(x0, torch.randn(n, 1, generator=gen), torch.full((n,), t), y)
    prev = process.step(x0, t, xt, gen)
    eta = process.etas[t - 1].item()
    assert prev.mean().item() == pytest.approx(0.3 - 0.8 * eta, abs=0.01)
    assert prev.var().item() == pytest.approx(4 * eta, rel=0.02)
    assert torch.equal(process.step(x0, 0, xt, gen), x0)  # the last step returns the x0 estimate


def test_resshift_sampling_starts_from_the_degraded_image_and_needs_its_T():
    process = ResShift(4)
    with pytest.raises(ValueError, match="T = 4"):
        process.set_timesteps(3)
    process.set_timesteps(4)
    y = torch.full((1, 1, 4, 4), 0.7)
    starts = []

    def model(x, t, condition):
        starts.append(x.clone())
        return condition  # a perfect restorer that knows the answer
    clean = torch.full_like(y, 0.2)
    out = sample(model, process, torch.zeros_like(y), clean, y=y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(starts[0], y) and torch.equal(out, clean)
