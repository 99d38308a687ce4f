"""models/offload.py: weights moved to the host and back keep their bytes, their sharing and their Parameter
objects; offload=auto's choice follows the free memory (injected here: these hosts have no GPU)."""
import logging

import pytest
import torch
from torch import nn

from comfyui_parallel_diffusion import models
from comfyui_parallel_diffusion.models import offload
from comfyui_parallel_diffusion.parallel import LocalRunner
from comfyui_parallel_diffusion.parallel.comm import Comm


def test_round_trip_keeps_bytes_views_and_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(6, 4))
    model[2].weight = model[1].weight  # tied
    fused = torch.randn(12, 4)
    model[0].register_buffer("fused", fused, persistent=False)
    model[0].weight = nn.Parameter(fused[:6], requires_grad=False)  # a view into a buffer, as a fused q/k/v
    model[1].register_buffer("steps", torch.arange(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    weights = offload.Offloaded(model, Comm.single())
    # fused (q/k/v) + the biases + the tied weight once + the int64 buffer
    assert weights.nbytes == 12 * 4 * 4 + (6 + 4 + 4 + 4 * 6) * 4 + 3 * 8
    x = torch.randn(2, 4)
    expected = model[1](model[0](x))
    for _ in range(2):
        weights.offload()
        assert all(p.is_meta for p in model.parameters()) and model[1].steps.is_meta
        weights.restore()
        assert list(model.parameters()) == params  # the same objects: whatever holds them sees them back
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert model[2].weight is model[1].weight
        assert model[0].weight.data_ptr() == model[0].fused.data_ptr()
        assert torch.equal(model[1](model[0](x)), expected)


def test_spread_gives_each_member_about_a_share():
    """Storages go to the member with the fewest bytes so far, largest first: every member holds about 1/n."""
    comm = Comm.single()
    weights = offload.Offloaded(nn.Linear(2, 2), comm)
    weights._members = lambda: 3
    sizes = [100, 90, 60, 50, 40, 30, 20, 10]
    owners = weights._spread(sizes)
    load = [sum(s for s, o in zip(sizes, owners) if o == m) for m in range(3)]
    assert sorted(load) == [130, 130, 140]


def test_decide():
    assert offload.decide("auto", needed=10, free=11) is False
    assert offload.decide("auto", needed=12, free=11) is True
    assert offload.decide("auto", needed=10 ** 12, free=None) is False  # the CPU: nothing to gain
    assert offload.decide("offload", needed=1, free=None) is True
    assert offload.decide("resident", needed=10 ** 12, free=1) is False
    with pytest.raises(ValueError, match="offload must be one of auto, resident, offload"):
        offload.decide("maybe", 1, 1)


@pytest.mark.parametrize("free_gib, offloads", [(1000, False), (1, True)])
def test_auto_follows_the_free_memory(tiny_zimage, monkeypatch, caplog, free_gib, offloads):
    """Z-Image's loader with offload=auto on a device reporting `free_gib`: resident with plenty, offloading with
    too little, and the log says which."""
    monkeypatch.setattr(offload, "free_memory", lambda device: free_gib * offload.GiB)
    runner = LocalRunner(models)
    with caplog.at_level(logging.INFO, logger=offload.__name__):
        runner.load("z", "zimage", path=str(tiny_zimage), offload="auto")
    model = runner.models["z"][1]
    assert model.weights.offloaded is offloads
    assert all(p.is_meta for p in model.transformer.parameters()) is offloads  # the text encoder's turn first
    said = "weights move to the host between stages" if offloads else "all weights resident"
    assert f"Z-Image: offload=auto: {said}" in caplog.text
