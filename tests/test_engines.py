"""The fast engines compute the same function as the plain eager twin (on the CPU, in CI).

The GPU-only parts (bf16 on CUDA, CUDA graphs, no host synchronisation) are in tests/test_cuda.py.
"""
import copy

import pytest
import torch

import osteo
from osteo.grouped import grouped_twin_forward
from osteo.models import TwinNet, TwinOutput
from osteo.training import Engine, StepRunner, TrainConfig, make_model, train_step


def _twin(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TwinNet(alpha=0.3).to(dtype)
    with torch.no_grad():  # make the two backbones' batch-norm statistics and ACM biases differ
        for name, buf in model.named_buffers():
            if "running_mean" in name:
                buf.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".acm." in name:
                p.normal_(0, 0.3)
    return model


def _inputs(b=3, size=40, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g, dtype=dtype), torch.randn(b, 3, size, size, generator=g, dtype=dtype) * 2


@pytest.mark.parametrize("training", [True, False])
def test_grouped_forward_is_the_twin_forward(training):
    plain = _twin().train(training)
    grouped = copy.deepcopy(plain)
    x_s, x_t = _inputs()
    out = plain(x_s, x_t)
    out_g, acm_g = grouped_twin_forward(grouped, x_s, x_t)
    for name, a, b in zip(out._fields, out, out_g):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(acm_g, out.acm, rtol=1e-10, atol=1e-12)
    # gradients reach the same parameters with the same values ...
    loss = lambda o, acm: (o.logits_f ** 2).sum() + o.logits_s.sum() - o.logits_t.sum() + acm.sum() + o.g_s.mean()  # noqa: E731
    loss(out, out.acm).backward()
    loss(out_g, acm_g).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), grouped.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-11, msg=name)
    # ... and batch norm's running statistics end up the same in both backbones (train mode updates them)
    moved, before = 0, _twin().state_dict()
    for (name, a), (_, b) in zip(plain.state_dict().items(), grouped.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
        moved += "running_mean" in name and not torch.equal(a, before[name])
    assert (moved > 0) == training


def test_grouped_forward_channels_last_float32():
    model = _twin(dtype=torch.float32)
    x_s, x_t = _inputs(b=4, size=48, dtype=torch.float32)
    ref = model(x_s, x_t)
    cl = model.to(memory_format=torch.channels_last)
    out, acm = grouped_twin_forward(cl, x_s.contiguous(memory_format=torch.channels_last),
                                    x_t.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_grouped_bf16_autocast_within_bf16_tolerance_of_float32():
    """The GPU runs bf16; the CPU's bf16 autocast checks the same arithmetic here."""
    model = _twin(dtype=torch.float32).eval()
    x_s, x_t = _inputs(b=4, size=48, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x_s, x_t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = grouped_twin_forward(model, x_s, x_t)
    assert out.logits_f.dtype == torch.bfloat16  # it really ran in bf16
    for a, b in zip(ref[:3], out[:3]):
        torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)
        assert (b.float().argmax(1) == a.argmax(1)).float().mean() >= 0.75


# Why the engine comparisons below are made where they are. Measured with benchmarks/rounding_drift.py
# (2-core Xeon, torch 2.14; 1 and 2 threads, oneDNN on and off, PyTorch's kernels for AVX-512, AVX2
# and no vector instructions, and AVX2 for oneDNN too, as on a CPU without AVX-512): the engines
# compute the same function with a different order of summation (grouped vs separate convolutions),
# and so do other CPUs. In float32 the first step's loss terms differ by <= 6.8e-7 (relative),
# outputs by <= 3.3e-6 and gradients by <= 8.6e-6 of their tensor's largest entry (grouped vs
# eager, worst setting); one engine under two settings by as much (AVX2 for both libraries vs
# AVX-512: 4.7e-7, 8.6e-6, 2.4e-5). But a float32 training trajectory does not keep that: in this
# small-batch setting the difference grows 40-60x per step at first (grouped vs eager, Adam, loss
# terms at steps 1-5: 4.8e-7, 3.0e-5, 1.3e-3, 4.7e-3, 1.7e-2 with 2 threads; up to 6.2e-5, 5.0e-3,
# 2.4e-2, 3.3e-2 in other settings), and one engine run with 1 instead of 2 threads drifts as far
# (2.9e-3 at step 3; oneDNN off: 1.3e-2; AVX2: 8.1e-3). Plain SGD is no cure (lr 1e-2: 1e-2 at
# step 3). In float64 the engines agree to <= 6.4e-16 at every one of 5 Adam or SGD steps in every
# setting, and one engine under two settings to <= 7.1e-14 after 5 steps. The cause is Adam (and
# this small, noisy problem): Adam divides each gradient by its running RMS, so a gradient component
# below the rounding noise (float32: ~1e-7 of the tensor's scale) but above Adam's eps of 1e-8 moves
# its weight by a whole learning rate in a direction rounding decides; float64 noise (~1e-16) stays
# far below eps. So: trajectories are compared in float64 only, float32 for one step with a
# tolerance from the error above.


def _steps(engine: str, steps: int, size=32, batch=8, dtype=torch.float64):
    """``steps`` Adam steps of one engine on fixed random batches; returns (loss terms of every step,
    the first step's outputs, the first step's gradient of every parameter, the trained model)."""
    cfg = TrainConfig(image_size=size, batch_size=batch, pretrained=False, device="cpu", lam=0.5,
                      engine="eager" if engine == "reference" else engine)
    torch.manual_seed(0)
    model = make_model(cfg).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-300, 900, (steps, batch, size, size), generator=g).to(torch.int16)
    y = torch.randint(0, 3, (steps, batch), generator=g)
    if engine == "reference":
        run = lambda h, t: train_step(model, cfg, opt, h, t, amp=False)  # noqa: E731
    else:
        run = StepRunner(Engine.parse(engine, torch.device("cpu")), model, cfg, opt, amp=False)
    curve = []
    for i in range(steps):
        out, terms = run(hu[i], y[i])
        assert all(v.dtype == dtype for v in out)  # it really ran in this precision,
        assert {k: v.dtype for k, v in terms.items()} == dict.fromkeys(terms, dtype)  # the loss too
        if i == 0:
            out0 = [o.detach().clone() for o in out]
            grads0 = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # zeroed only by the next step
        curve.append({k: float(v.detach()) for k, v in terms.items()})
    return curve, out0, grads0, model


def _assert_same_curve(a, b, rtol):
    assert a[0].keys() == b[0].keys() == {"ce_s", "ce_t", "ce_f", "dis", "total", "acm"}
    for step, (ra, rb) in enumerate(zip(a, b)):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=rtol, abs=1e-12), (step, k, ra[k], rb[k])


def _assert_same_step(ref, got, tol):
    """Outputs and every parameter's gradient of one step agree to ``tol`` of the tensor's scale.

    Scale: a tensor's largest entry; for gradients at least 1e-3 of the model's largest gradient,
    since some are mathematically zero (ACM's K/Q bias: softmax ignores a constant) and hold only
    rounding noise of the rest.
    """
    (_, out_r, grads_r, _), (_, out_g, grads_g, _) = ref, got
    for name, a, b in zip(TwinOutput._fields, out_r, out_g):
        torch.testing.assert_close(b, a, rtol=0, atol=tol * float(a.abs().max()), msg=name)
    assert grads_r.keys() == grads_g.keys() and len(grads_r) > 100
    top = max(float(v.abs().max()) for v in grads_r.values())
    assert top > 0
    for name, a in grads_r.items():
        b = grads_g[name]
        assert b is not None and b.dtype == a.dtype, name
        torch.testing.assert_close(b, a, rtol=0, atol=tol * max(float(a.abs().max()), 1e-3 * top), msg=name)


@pytest.fixture
def float64_inputs(monkeypatch):
    """Feed the networks float64 views, so a float64 model trains end to end (no rounding to hide behind)."""
    import osteo.training as T

    plain = T.network_inputs
    monkeypatch.setattr(T, "network_inputs", lambda cfg, hu: [x.double() for x in plain(cfg, hu)])


def test_grouped_engine_same_training_in_float64(float64_inputs):
    """Same outputs, loss terms and gradients of every parameter in the first step, and the same
    5-step Adam trajectory (the engines' loss terms differ by <= 6.4e-16 over 5 steps in every
    setting we tried, see above: the tolerances 1e-10 and 1e-9 leave room for far other kernels)."""
    ref = _steps("reference", 5)
    got = _steps("grouped", 5)
    _assert_same_step(ref, got, tol=1e-10)
    _assert_same_curve(ref[0], got[0], rtol=1e-9)
    assert got[0][-1]["total"] < got[0][0]["total"]  # it does learn
    for (name, p), (_, q) in zip(ref[3].state_dict().items(), got[3].state_dict().items()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10, msg=name)


def test_grouped_engine_same_first_step_float32():
    """In float32 the engines (and CPUs, thread counts, oneDNN on or off) round differently: the
    first step's outputs and gradients differ by at most 8.6e-6 of their scale and the loss terms by
    7e-7 (relative) over all settings we measured (see above); tolerances 1e-4 and 1e-5 leave an
    11x and 14x margin. Later steps are compared in float64 only."""
    ref = _steps("reference", 1, dtype=torch.float32)
    got = _steps("grouped", 1, dtype=torch.float32)
    _assert_same_step(ref, got, tol=1e-4)
    _assert_same_curve(ref[0], got[0], rtol=1e-5)


def test_compiled_engine_same_training_in_float64(float64_inputs):
    """torch.compile (inductor; the CPU's C++ backend here) of the grouped twin: the CUDA default's code path."""
    ref = _steps("reference", 4)
    got = _steps("grouped+compile", 4)
    _assert_same_step(ref, got, tol=1e-10)
    _assert_same_curve(ref[0], got[0], rtol=1e-9)


def test_compiled_engine_same_first_step_float32():
    """Inductor's float32 kernels (fused, in their own order): the first step. Measured against eager
    (benchmarks/rounding_drift.py --compile-only; oneDNN on and off): outputs <= 7.8e-6 and
    gradients <= 1.8e-5 of their scale, loss terms <= 3.3e-6 relative, 2-5x the grouped engine's;
    tolerances 3e-4 and 1e-4 leave a 16x and 30x margin."""
    ref = _steps("reference", 1, dtype=torch.float32)
    got = _steps("grouped+compile", 1, dtype=torch.float32)
    _assert_same_step(ref, got, tol=3e-4)
    _assert_same_curve(ref[0], got[0], rtol=1e-4)


def test_engine_parsing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Engine.parse("auto", cpu) == Engine()
    assert Engine.parse("auto", cuda) == Engine(grouped=True)
    assert str(Engine.parse("grouped+compile+graphs", cuda)) == "grouped+graphs"
    assert Engine.parse("graphs", cuda) == Engine(compile=True, graphs=True)
    assert str(Engine.parse("eager", cpu)) == "eager"
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine.parse("graphs", cpu)
    with pytest.raises(ValueError, match="engine 'fast'"):
        TrainConfig(engine="fast")
    with pytest.raises(ValueError, match="engine ''"):
        TrainConfig(engine="")
    assert TrainConfig(engine="grouped").key() != TrainConfig().key()


def test_train_with_grouped_engine_matches_eager(separable, float64_inputs, monkeypatch):
    """train() with either engine: the same history, alpha and predictions. In float64, as 2 epochs
    of Adam would turn float32 rounding (which differs between engines and CPUs) into ~1 % of loss."""
    import osteo.training as T

    plain = T.make_model
    monkeypatch.setattr(T, "make_model", lambda cfg: plain(cfg).double())
    base = dict(epochs=2, batch_size=16, image_size=32, pretrained=False, device="cpu", seed=3)
    a = osteo.train(TrainConfig(engine="eager", **base), separable, progress=False)
    b = osteo.train(TrainConfig(engine="grouped", **base), separable, progress=False)
    assert (a.engine, b.engine) == ("eager", "grouped")
    assert len(a.history) == len(b.history) == 2
    for ra, rb in zip(a.history, b.history):
        assert ra.keys() == rb.keys()
        for k in ra:  # the history's losses are float32 means: 1e-6 is a few float32 roundings
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9), k
        assert rb["alpha"] == pytest.approx(ra["alpha"], rel=1e-9)  # float64 and read from the model
    assert a.history[-1]["loss_total"] < a.history[0]["loss_total"]
    assert a.predictions == b.predictions and a.test == b.test


def test_compiled_engine_compiles_the_full_batch_only(monkeypatch, float64_inputs):
    """One compiled shape per run: a smaller last batch runs the same function eagerly (no second
    compilation, 60-90 s on the H100), and both steps compute what the plain step computes (in
    float64: the second step follows an Adam step, which float32 rounding would make CPU-dependent)."""
    import osteo.training as T

    shapes = []

    def fake_compile(fn, **kw):  # records what reaches the compiled function, then runs it as is
        assert kw == {"mode": None, "dynamic": False}
        return lambda hu, y: (shapes.append(tuple(hu.shape)), fn(hu, y))[1]

    monkeypatch.setattr(T.torch, "compile", fake_compile)
    cfg = TrainConfig(image_size=32, batch_size=4, pretrained=False, device="cpu", engine="grouped+compile")
    g = torch.Generator().manual_seed(0)
    hu = torch.randint(-300, 900, (7, 32, 32), generator=g).to(torch.int16)
    y = torch.randint(0, 3, (7,), generator=g)
    losses = {}
    for name in ("compile", "plain"):
        torch.manual_seed(0)
        model = make_model(cfg).double()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "compile":
            run = StepRunner(Engine.parse(cfg.engine, torch.device("cpu")), model, cfg, opt, amp=False)
        else:
            run = lambda h, t: train_step(model, cfg, opt, h, t, amp=False)  # noqa: E731
        losses[name] = [float(run(hu[:4], y[:4])[1]["total"]), float(run(hu[4:], y[4:])[1]["total"])]
    assert shapes == [(4, 32, 32)]  # the 3-slice batch did not reach the compiled function
    assert losses["compile"] == pytest.approx(losses["plain"], rel=1e-9)  # float64: differences ~1e-15


def test_several_twins_as_one_grouped_network():
    """grouped_twins_forward (e.g. Table 4's five twins at once): each twin gets exactly its own
    forward, ACM term, gradients and batch-norm statistics, as if it ran alone."""
    from osteo.grouped import grouped_twins_forward

    twins = [_twin(seed) for seed in (0, 1)]
    torch.manual_seed(2)
    twins.append(TwinNet(alpha=0.9, learn_alpha=False).to(torch.float64))  # a fixed alpha, as in Table 4
    refs = [copy.deepcopy(m) for m in twins]
    views = [_inputs(seed=s) for s in (1, 2, 3)]
    for m in twins + refs:
        m.train()
    got = grouped_twins_forward(twins, views)
    assert len(got) == 3
    loss_got, loss_ref = 0, 0
    for (out, acm), ref, (x_s, x_t) in zip(got, refs, views):
        want = ref(x_s, x_t)
        for a, b in zip(want, out):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(acm, want.acm, rtol=1e-9, atol=1e-12)
        loss_got = loss_got + out.logits_f.pow(2).sum() + acm.sum()
        loss_ref = loss_ref + want.logits_f.pow(2).sum() + want.acm.sum()
    loss_got.backward()
    loss_ref.backward()
    for m, ref in zip(twins, refs):
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)
        for (name, b), c in zip(m.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_grouped_engine_gives_the_eager_loss_terms(training):
    """Through the one interface (registry forward + model_loss), the grouped engine returns the
    ACM term in its output and every loss term equals the eager one (float64)."""
    from osteo.models import model_spec
    from osteo.losses import model_loss

    spec = model_spec("twin")
    plain = _twin().train(training)
    grouped = copy.deepcopy(plain)
    x_s, x_t = _inputs()
    y = torch.tensor([0, 1, 2, 1, 0, 2][: x_s.shape[0]])
    out_e = spec.run(plain, [x_s, x_t])
    out_g = spec.run(grouped, [x_s, x_t], grouped=True)
    assert out_e.aux["acm"].shape == out_g.aux["acm"].shape == (x_s.shape[0],)
    assert out_e.aux["acm"].dtype == torch.float64
    te, tg = model_loss(out_e, y, lam=0.1, acm_weight=0.1), model_loss(out_g, y, lam=0.1, acm_weight=0.1)
    assert list(te) == list(tg) == ["ce_s", "ce_t", "ce_f", "dis", "total", "acm"]
    for k in te:
        torch.testing.assert_close(tg[k], te[k], rtol=1e-10, atol=1e-12, msg=k)
    assert float(te["acm"]) > 0
