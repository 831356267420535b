"""DDNM: range-null-space diffusion recovers what an oracle denoiser knows and honours the measurements."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medidiff.diffusion.gaussian import cosine_alphas_cumprod
from medidiff.methods.ddnm import ddnm, respaced_timesteps
from medidiff.physics.measurements import BlockCS, CartesianMRI, cartesian_mask

ABAR = cosine_alphas_cumprod(1000)


def _oracle(image: torch.Tensor):
    """A model whose noise estimate is exact for ``image``: its x0 estimate is always ``image``."""
    def model_fn(x, t):
        a = ABAR[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * image) / (1 - a).sqrt()
    return model_fn


def _images(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, 64, 64, generator=gen)


def test_respaced_timesteps():
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="steps must be in"):
        respaced_timesteps(1000, 0)


@pytest.mark.parametrize("op", [BlockCS(0.1, (64, 64)), CartesianMRI(cartesian_mask((64, 64), 4))],
                         ids=["block-cs", "mri"])
def test_oracle_denoiser_is_recovered(op):
    truth = _images(0)
    x = ddnm(op, op(truth), _oracle(truth), ABAR, steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, truth, atol=1e-4, rtol=0)


def test_measurements_fix_the_range_and_the_prior_the_null_space():
    op = BlockCS(0.1, (64, 64))
    truth, belief = _images(0), _images(1)  # the model believes in another image
    y = op(truth)
    x = ddnm(op, y, _oracle(belief), ABAR, steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op(x), y, atol=1e-4, rtol=0)
    # exactly belief's null-space part plus truth's range part
    torch.testing.assert_close(x, belief - op.pinv(op(belief)) + op.pinv(y), atol=1e-4, rtol=0)


def test_random_network_output_is_measurement_consistent_and_seeded():
    torch.manual_seed(0)
    # float64: an untrained net's x0 estimates reach ~1e5 (1 / sqrt(abar_T)), beyond float32's consistency
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1)).double()

    def model_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        return net(x)

    op = BlockCS(0.25, (64, 64))
    y = op(_images(2).double())
    seen = []
    x = ddnm(op, y, model_fn, ABAR, steps=8, generator=torch.Generator().manual_seed(3),
             progress=lambda ts: seen.extend(ts) or ts)
    assert x.shape == (2, 1, 64, 64) and x.dtype == torch.float64 and torch.isfinite(x).all()
    assert seen == respaced_timesteps(1000, 8)
    torch.testing.assert_close(op(x), y, atol=1e-6, rtol=0)
    again = ddnm(op, y, model_fn, ABAR, steps=8, generator=torch.Generator().manual_seed(3))
    other = ddnm(op, y, model_fn, ABAR, steps=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x, again) and not torch.allclose(x, other)
