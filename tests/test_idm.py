"""IDM: reversible couplings, equal gradients with and without invertibility, fine-tuning that helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from medidiff.datasets.cs_images import ellipse_phantom
from medidiff.methods.base import write_component
from medidiff.methods.idm import IDM, build_idm
from medidiff.metrics import psnr
from medidiff.nets.reversible import Coupling, CouplingSequence
from medidiff.nets.reversible_unet import ReversibleUNet
from medidiff.physics.measurements import BlockCS, CartesianMRI, cartesian_mask

TINY = {"channels": [16, 16], "blocks": 1, "time_channels": 32}


class ConvBody(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, context):
        return torch.tanh(self.conv(x)) * context["gain"]


def test_coupling_inverts_its_output():
    torch.manual_seed(0)
    coupling = Coupling(ConvBody())
    x1, x2 = torch.randn(2, 2, 3, 8, 8)
    y1, y2 = coupling(x1, x2, {"gain": 1.5})
    dy = torch.ones_like(y1)
    rx1, rx2, _, _ = coupling.backward_pass(y1.detach(), y2.detach(), dy, dy, {"gain": 1.5})
    assert torch.allclose(rx1, x1, atol=1e-4) and torch.allclose(rx2, x2, atol=1e-4)


def test_reversible_sequence_saves_only_its_output():
    seq = CouplingSequence([ConvBody() for _ in range(4)])
    seq.reversible = True
    out = seq(torch.randn(1, 3, 8, 8, requires_grad=True), {"gain": 1.0})
    # the autograd node of the reversible pass keeps the two output streams and nothing else
    node = out.grad_fn.next_functions[0][0]
    while type(node).__name__ != "_ReversiblePassBackward":
        node = node.next_functions[0][0]
    assert len(node.saved_tensors) == 2


def _grads(net, loss_fn, invertible: bool):
    net.zero_grad(set_to_none=True)
    net.set_invertible(invertible)
    out = loss_fn()
    out.backward()
    return out.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("operator", ["block_cs", "mri"])
def test_invertible_training_step_gives_the_plain_gradients(operator):
    torch.manual_seed(0)
    net = build_idm(TINY, steps=3).double()
    for p in net.parameters():  # move off the zero-initialised injectors so every path carries gradient
        p.data += 0.02 * torch.randn_like(p)
    x = torch.rand(2, 1, 32, 32, dtype=torch.double)
    op = BlockCS(0.25, (32, 32)) if operator == "block_cs" else CartesianMRI(cartesian_mask((32, 32), 4, seed=1))
    y = op(x)
    loss_plain, plain = _grads(net, lambda: (net(y, op) - x).abs().mean(), invertible=False)
    loss_rev, rev = _grads(net, lambda: (net(y, op) - x).abs().mean(), invertible=True)
    assert loss_plain == pytest.approx(loss_rev, abs=1e-12)
    assert plain.keys() == rev.keys() and len(plain) == len(list(net.parameters()))
    for name in plain:
        assert torch.allclose(plain[name], rev[name], atol=1e-10, rtol=1e-6), name


def test_injectors_start_as_the_pretrained_denoiser():
    torch.manual_seed(0)
    unet = ReversibleUNet(**TINY)
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([500])
    before = unet(x, t)
    unet.add_injectors(3)
    op = BlockCS(0.1, (32, 32))
    y = op(torch.rand(1, 1, 32, 32))
    after = unet(x, t, {"step": 1, "operator": op, "y": y, "pinv_y": op.pinv(y)})
    assert torch.allclose(before, after, atol=1e-6)


def test_a_few_steps_of_fine_tuning_beat_zero_filled_on_an_unseen_image(tmp_path):
    """A tiny IDM chain, trained 30 steps on ellipse phantoms, on a phantom of another seed."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_idm(TINY, steps=3)
    net.set_invertible(True)
    op = BlockCS(0.25, (32, 32))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(30):
        x = torch.stack([ellipse_phantom(32, rng)[None] for _ in range(4)])
        loss = (net(op(x), op) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unseen = ellipse_phantom(32, np.random.default_rng(12345))[None, None]
    write_component(tmp_path, "idm", net, {"model": {"unet": TINY, "steps": 3}})
    model = IDM.from_pretrained(tmp_path)  # the saved (float16) weights, as shipped
    y = op(unseen)
    assert psnr(model(y, op).clamp(0, 1), unseen) > psnr(op.pinv(y).clamp(0, 1), unseen) + 2.0


def test_idm_task_trains_from_a_denoiser_through_the_trainer(tmp_path):
    from medidiff.datasets.drr import fetch_chest_ct
    from medidiff.train import train

    fetch_chest_ct()
    common = {"seed": 0, "threads": 1, "data": {"patch": 32, "phantoms": 4}}
    (tmp_path / "denoiser.yaml").write_text(yaml.safe_dump({
        **common, "name": "dn", "kind": "denoiser", "model": {"unet": TINY},
        "train": {"batch": 2, "lr": 1e-3, "max_steps": 2}, "export": {"name": "denoiser"}}))
    denoiser = train(tmp_path / "denoiser.yaml", out_dir=tmp_path / "dn")
    (tmp_path / "idm.yaml").write_text(yaml.safe_dump({
        **common, "name": "idm", "kind": "idm",
        "model": {"denoiser": str(denoiser.with_suffix("")), "steps": 2, "invertible": True},
        "measurement": {"kind": "cartesian_mri", "accelerations": [4], "masks": ["equispaced"]},
        "train": {"batch": 2, "lr": 1e-4, "max_steps": 2}, "export": {"name": "idm"}}))
    weights = train(tmp_path / "idm.yaml", out_dir=tmp_path / "idm")
    model = IDM.from_pretrained(weights.parent)
    assert model.config["model"]["steps"] == 2 and model.config["measurement"]["kind"] == "cartesian_mri"
    op = CartesianMRI(cartesian_mask((32, 32), 4, "equispaced"))
    assert model(op(torch.rand(1, 1, 32, 32)), op).shape == (1, 1, 32, 32)
