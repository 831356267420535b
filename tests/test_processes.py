"""Processes as objects: DDPM/DDIM against diffusers' schedulers, step hooks, the residual processes'
marginals (ResShift, UPSR, Resfusion, RDDM) and their reverse steps with a perfect model."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from medidiff.diffusion.gaussian import DDIM, DDPM, cosine_alphas_cumprod
from medidiff.diffusion.process import NoiseBank
from medidiff.diffusion.rddm import RDDM
from medidiff.diffusion.resfusion import Resfusion
from medidiff.diffusion.resshift import UPSR, ResShift, resshift_etas
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


N = 200_000


def constant_pair(n=N):
    return torch.full((n, 1), 0.3), torch.full((n, 1), -0.5)


@pytest.mark.parametrize("t", [0, 120, "last"])
@pytest.mark.parametrize("noise_scale", [1.0, 0.05])
def test_resfusion_forward_marginal(t, noise_scale):
    """x_t = sqrt(abar) x0 + (1 - sqrt(abar)) (y - x0) + ns sqrt(1 - abar) eps, truncated where sqrt(abar) ~ 0.5."""
    process = Resfusion(noise_scale=noise_scale)
    t = process.truncation if t == "last" else t
    assert abs(process.alphas_cumprod[-1].sqrt().item() - 0.5) < 0.01
    x0, y = constant_pair()
    xt = process.add_noise(x0, torch.randn(N, 1, generator=torch.Generator().manual_seed(1)), torch.full((N,), t), y)
    s = process.alphas_cumprod[t].sqrt().item()
    assert xt.mean().item() == pytest.approx(s * 0.3 + (1 - s) * -0.8, abs=0.01)
    assert xt.var().item() == pytest.approx(noise_scale**2 * (1 - s**2), rel=0.03, abs=1e-6)


@pytest.mark.parametrize("noise_scale", [1.0, 0.05])
def test_resfusion_recovers_x0_from_its_resnoise_in_five_respaced_steps(noise_scale):
    """The resnoise and y determine x0 (and the noise): a perfect model samples x0 back exactly, and
    on consecutive timesteps the step is DDPM's (x_t - beta/sqrt(1-abar) resnoise)/sqrt(alpha) + noise
    (in units of the noise scale)."""
    process = Resfusion(noise_scale=noise_scale)
    x0, y = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)

    def implied(x, x0, t, y):
        s = process.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).float()
        return (x - s * x0 - (1 - s) * (y - x0)) / (noise_scale * (1 - s**2).sqrt())
    def perfect(x, t, condition):  # the training target implied by the true x0
        return process.training_target(x0, implied(x, x0, t[:1], y), t[:1], y)
    process.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    out = sample(perfect, process, torch.randn(x0.shape, generator=generator), y=y, generator=generator)
    assert torch.allclose(out, x0, atol=1e-4)

    process.set_timesteps(timesteps=[60, 59])  # consecutive: the DDPM form of the paper
    process._y = y
    xt = process.add_noise(x0, torch.randn_like(x0), torch.full((4,), 60), y)
    resnoise = process.training_target(x0, implied(xt, x0, torch.tensor([60]), y), torch.full((4,), 60), y)
    z = torch.randn_like(x0)
    a, beta = process.alphas_cumprod[60].item(), process.betas[60].item()
    var = beta * (1 - process.alphas_cumprod[59].item()) / (1 - a)
    expected = (xt - noise_scale * beta / (1 - a) ** 0.5 * resnoise) / (1 - beta) ** 0.5 + noise_scale * var**0.5 * z
    assert torch.allclose(process.step(resnoise, 60, xt, NoiseBank([z])), expected, atol=1e-5)


@pytest.mark.parametrize("t", [0, 499, 999])
def test_rddm_forward_marginal_and_targets(t):
    """I_t = I_0 + abar_t (y - I_0) + bbar_t eps; the network's target is [residual, noise]."""
    process = RDDM(noise_scale=0.5)
    x0, y = constant_pair()
    noise = torch.randn(N, 1, generator=torch.Generator().manual_seed(2))
    xt = process.add_noise(x0, noise, torch.full((N,), t), y)
    a, b = (t + 1) / 1000, (0.5 * (t + 1) / 1000) ** 0.5
    assert xt.mean().item() == pytest.approx(0.3 + a * -0.8, abs=0.01)
    assert xt.var().item() == pytest.approx(b**2, rel=0.02)
    target = process.training_target(x0, noise, torch.full((N,), t), y)
    assert target.shape == (N, 2, ) and torch.allclose(target[:, :1], y - x0) and torch.equal(target[:, 1:], noise)
    scaled = RDDM(noise_scale=0.5, residual_scale=0.05).training_target(x0, noise, torch.full((N,), t), y)
    assert torch.allclose(scaled[:, :1], (y - x0) / 0.05)  # the residual channel in units of 0.05


@pytest.mark.parametrize("residual_scale", [1.0, 0.05])
def test_rddm_perfect_model_returns_x0_in_few_deterministic_steps(residual_scale):
    process = RDDM(noise_scale=1.0, residual_scale=residual_scale)
    process.set_timesteps(5)
    x0, y = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    start = torch.randn_like(x0)
    eps = (process.initial_sample(start, y) - y) / process.noise_weights[-1].item()
    out = sample(lambda x, t, c: torch.cat([(y - x0) / residual_scale, eps], dim=1), process, start, y=y)
    assert torch.allclose(out, x0, atol=1e-5)


def test_upsr_weighs_noise_by_uncertainty():
    """Flat, certain regions get min_weight x the ResShift noise, uncertain ones the full noise."""
    process = UPSR(4, kappa=2.0, min_weight=0.25, full_uncertainty=0.05)
    y = torch.zeros(1, 1, 64, 64)
    estimate = y.clone()
    estimate[..., 32:] = 0.5  # the right half is uncertain
    weight = process.weigh_noise(y, estimate)
    assert weight[..., 5:20].max().item() == pytest.approx(0.25, abs=1e-4)
    assert weight[..., 42:56].min().item() == pytest.approx(1.0, abs=1e-4)
    n = 400
    x0 = torch.zeros(n, 1, 64, 64)
    xt = process.add_noise(x0, torch.randn(n, 1, 64, 64, generator=torch.Generator().manual_seed(3)),
                           torch.full((n,), 3), y.expand(n, -1, -1, -1))
    eta = process.etas[3].item()
    assert xt[..., 5:20].std().item() == pytest.approx(2 * 0.25 * eta**0.5, rel=0.03)
    assert xt[..., 42:56].std().item() == pytest.approx(2 * eta**0.5, rel=0.03)


def test_resshift_ode_step_moves_along_the_marginals_with_the_same_noise():
    """The deterministic step maps x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps to the same eps at eta_{t-1}."""
    process = ResShift(4, kappa=2.0)
    process.set_timesteps(4)
    process.deterministic = True
    x0, y, eps = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    process.initial_sample(eps, y)  # the sampler keeps y from its start
    xt = process.add_noise(x0, eps, torch.full((2,), 2), y)
    assert torch.allclose(process.step(x0, 2, xt), process.add_noise(x0, eps, torch.full((2,), 1), y), atol=1e-6)
