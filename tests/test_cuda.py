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


ENGINES = ("eager", "grouped", "compile", "grouped+compile", "graphs", "grouped+graphs")


def _twin_and_batch(size=64, batch=16):
    from osteo.training import make_model

    cfg = TrainConfig(image_size=size, batch_size=batch, pretrained=False, lam=0.5)
    torch.manual_seed(0)
    model = make_model(cfg)
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-300, 900, (batch, size, size), generator=g).to(torch.int16)
    y = torch.randint(0, 3, (batch,), generator=g)
    return cfg, model, hu, y


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_bf16_on_cuda_matches_float32_eager(engine):
    """Logits and loss of each fast path (bf16 on the GPU) against the plain eager model
    (float32 on the CPU) on the same weights and inputs, within bf16 tolerance."""
    import copy

    from osteo.training import Engine, forward_loss

    cfg, model, hu, y = _twin_and_batch()
    with torch.no_grad():
        ref_out, ref_terms = forward_loss(copy.deepcopy(model), cfg, hu, y)  # train-mode BN, float32, CPU
    model = model.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)  # lr 0: the step changes nothing
    runner = Engine.parse(engine, torch.device("cuda")).runner(model, cfg, opt, amp=True)
    out, terms = runner(hu.cuda(), y.cuda())
    for a, b in zip(ref_out[:3], out[:3]):
        torch.testing.assert_close(b.float().cpu(), a, atol=0.15, rtol=0.05)
    for k in ("ce_s", "ce_t", "ce_f", "dis", "total"):
        assert float(terms[k]) == pytest.approx(float(ref_terms[k]), rel=0.03, abs=0.02), k


@pytest.mark.parametrize("engine", ["eager", "grouped+compile", "grouped+graphs"])
def test_no_host_synchronisation_inside_an_epoch(engine):
    """After warm-up, training steps (batch selection on the GPU, step, loss bookkeeping as train() does it) never sync."""
    from osteo.training import Engine

    cfg, model, hu, y = _twin_and_batch(batch=32)
    model = model.cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    runner = Engine.parse(engine, torch.device("cuda")).runner(model, cfg, opt, amp=True)
    hu, y = hu.cuda().repeat(4, 1, 1), y.cuda().repeat(4)
    order = torch.randperm(len(y)).cuda()

    def steps():
        rows, correct = [], torch.zeros((), device="cuda")
        for i in range(0, len(y), 32):
            idx = order[i : i + 32]
            out, terms = runner(hu[idx], y[idx])
            rows.append(torch.stack([t.detach().float() for t in terms.values()]))
            correct += (out.logits_f.argmax(1) == y[idx]).sum()
        return rows

    steps()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compiled_engine_float64_loss_curve_on_cuda(monkeypatch):
    """The compiled grouped engine follows the eager loss curve for the first Adam steps. In float64:
    in float32 the two paths' rounding (different summation orders, and other GPUs' kernels) grows
    with every Adam step (measured on the CPU: 1e-3 relative at step 3, see tests/test_engines.py),
    whereas float64 rounding stays below 1e-13 after 5 steps there."""
    import osteo.training as T
    from osteo.training import Engine

    plain = T.network_inputs
    monkeypatch.setattr(T, "network_inputs", lambda cfg, hu: [x.double() for x in plain(cfg, hu)])
    curves = {}
    for engine in ("eager", "grouped+compile"):
        cfg, model, hu, y = _twin_and_batch()
        model = model.cuda().double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        runner = Engine.parse(engine, torch.device("cuda")).runner(model, cfg, opt, amp=False)
        curves[engine] = []
        for _ in range(3):
            _, terms = runner(hu.cuda(), y.cuda())
            assert terms["total"].dtype == torch.float64  # it really ran in float64
            curves[engine].append(float(terms["total"].detach()))
    assert curves["eager"][-1] < curves["eager"][0]  # the steps did train
    assert curves["grouped+compile"] == pytest.approx(curves["eager"], rel=1e-9)


def test_batched_runs_on_cuda_take_each_runs_own_first_step(separable):
    """Four twin runs as one vmapped network on the GPU (what ``osteo grid --batch-runs 4`` trains):
    the first step's loss terms of every member equal its own plain step's. float32 without TF32,
    so only the order of summation differs: on the CPU that is <= 7e-7 relative (tests/test_engines.py);
    the tolerance 1e-4 leaves the GPU's other kernels a 100x margin."""
    import copy

    from osteo.batched import _BatchedStep
    from osteo.training import _start_run, train_step

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cfgs = [TrainConfig(image_size=64, batch_size=16, pretrained=False, device="cuda", seed=s, lam=0.1 * s)
                for s in range(4)]
        runs = [_start_run(c, torch.device("cuda")) for c in cfgs]
        refs = [copy.deepcopy(r.model) for r in runs]
        hu, y = separable.train.hu[:16].cuda(), separable.train.y[:16].cuda()
        _, terms = _BatchedStep(runs, amp=False)([hu] * 4, [y] * 4)
        for ref, cfg, got in zip(refs, cfgs, terms):
            ref.train()
            _, want = train_step(ref, cfg, torch.optim.Adam(ref.parameters(), lr=cfg.lr), hu, y, amp=False)
            for k in want:
                assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4, abs=1e-6), k
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
