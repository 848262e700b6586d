"""Checks that only a machine with an NVIDIA GPU can run (skipped elsewhere, e.g. in CI)."""
import pytest
import torch

import osteo
from osteo.training import TrainConfig

pytestmark = pytest.mark.cuda


def test_twin_trains_on_cuda_with_bf16_and_beats_chance(separable):
    cfg = TrainConfig(epochs=8, batch_size=16, image_size=32, device="cuda", amp=True, pretrained=False, seed=1)
    res = osteo.train(cfg, separable, progress=False)
    assert res.device != "cpu"
    assert res.history[-1]["loss_total"] < 0.7 * res.history[0]["loss_total"]
    assert res.accuracy > 0.6


def test_cuda_and_cpu_compute_the_same_function(separable):
    from osteo.training import forward_heads, make_model

    cfg = TrainConfig(image_size=32, pretrained=False)
    torch.manual_seed(0)
    model = make_model(cfg).eval()
    hu = separable.test.hu[:8]
    with torch.no_grad():
        ref = forward_heads(model, cfg, hu)
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward_heads(model, cfg, hu.cuda())
    for a, b in zip(ref[:3], out[:3]):
        torch.testing.assert_close(b.float().cpu(), a, atol=0.1, rtol=0.05)
