"""Issue 4: the fast engines compute the same function as the plain eager twin (on the CPU, in CI).

The GPU-only parts (bf16 on CUDA, CUDA graphs, no host synchronisation) are in tests/test_cuda.py.
"""
import copy

import pytest
import torch

import osteo
from osteo.grouped import grouped_twin_forward
from osteo.models import TwinNet
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
    torch.testing.assert_close(acm_g, plain.acm_term, rtol=1e-10, atol=1e-12)
    # gradients reach the same parameters with the same values ...
    loss = lambda o, acm: (o.logits_f ** 2).sum() + o.logits_s.sum() - o.logits_t.sum() + acm.sum() + o.g_s.mean()  # noqa: E731
    loss(out, plain.acm_term).backward()
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


def _loss_curve(engine: str, steps: int, size=32, batch=8, dtype=torch.float32):
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
        _, terms = run(hu[i], y[i])
        curve.append({k: float(v.detach()) for k, v in terms.items()})
    return curve, model


def _assert_same_curve(a, b, rtol):
    assert a[0].keys() == b[0].keys() == {"ce_s", "ce_t", "ce_f", "dis", "total", "acm"}
    for step, (ra, rb) in enumerate(zip(a, b)):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=rtol, abs=1e-6), (step, k, ra[k], rb[k])


@pytest.fixture
def float64_inputs(monkeypatch):
    """Feed the networks float64 views, so a float64 model trains end to end (no rounding to hide behind)."""
    import osteo.training as T

    plain = T.network_inputs
    monkeypatch.setattr(T, "network_inputs", lambda cfg, hu: [x.double() for x in plain(cfg, hu)])


def test_grouped_engine_same_training_in_float64(float64_inputs):
    ref, m_ref = _loss_curve("reference", 5, dtype=torch.float64)
    got, m_got = _loss_curve("grouped", 5, dtype=torch.float64)
    _assert_same_curve(ref, got, rtol=1e-9)
    assert got[-1]["total"] < got[0]["total"]  # it does learn
    for (name, p), (_, q) in zip(m_ref.state_dict().items(), m_got.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10, msg=name)


def test_grouped_engine_same_loss_curve_float32():
    """In float32 both engines round differently, and Adam's first, sign-like steps amplify that
    (eager float32 drifts from eager float64 just as much); the first steps still agree closely."""
    ref, _ = _loss_curve("reference", 3)
    got, _ = _loss_curve("grouped", 3)
    _assert_same_curve(ref, got, rtol=2e-3)
    assert ref[1]["total"] == pytest.approx(got[1]["total"], rel=1e-5)


def test_compiled_engine_same_training_in_float64(float64_inputs):
    """torch.compile (inductor; the CPU's C++ backend here) of the grouped twin: the CUDA default's code path."""
    ref, _ = _loss_curve("reference", 4, dtype=torch.float64)
    got, _ = _loss_curve("grouped+compile", 4, dtype=torch.float64)
    _assert_same_curve(ref, got, rtol=1e-9)


def test_compiled_engine_same_first_steps_float32():
    ref, _ = _loss_curve("reference", 2)
    got, _ = _loss_curve("grouped+compile", 2)
    _assert_same_curve(ref, got, rtol=1e-4)


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


def test_train_with_grouped_engine_matches_eager(separable):
    base = dict(epochs=2, batch_size=16, image_size=32, pretrained=False, device="cpu", seed=3)
    a = osteo.train(TrainConfig(engine="eager", **base), separable, progress=False)
    b = osteo.train(TrainConfig(engine="grouped", **base), separable, progress=False)
    assert (a.engine, b.engine) == ("eager", "grouped")
    for ra, rb in zip(a.history, b.history):
        assert rb["loss_total"] == pytest.approx(ra["loss_total"], rel=1e-3)
        assert rb["alpha"] == pytest.approx(ra["alpha"], abs=1e-4)
    agree = sum(p == q for p, q in zip(a.predictions["f"], b.predictions["f"])) / len(a.predictions["f"])
    assert agree >= 0.9


def test_compiled_engine_compiles_the_full_batch_only(monkeypatch):
    """One compiled shape per run: a smaller last batch runs the same function eagerly (no second
    compilation, 60-90 s on the H100), and both steps compute what the plain step computes."""
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
        model = make_model(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "compile":
            run = StepRunner(Engine.parse(cfg.engine, torch.device("cpu")), model, cfg, opt, amp=False)
        else:
            run = lambda h, t: train_step(model, cfg, opt, h, t, amp=False)  # noqa: E731
        losses[name] = [float(run(hu[:4], y[:4])[1]["total"]), float(run(hu[4:], y[4:])[1]["total"])]
    assert shapes == [(4, 32, 32)]  # the 3-slice batch did not reach the compiled function
    assert losses["compile"] == pytest.approx(losses["plain"], rel=2e-4)  # grouped vs separate float32 rounding


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
        torch.testing.assert_close(acm, ref.acm_term, rtol=1e-9, atol=1e-12)
        loss_got = loss_got + out.logits_f.pow(2).sum() + acm.sum()
        loss_ref = loss_ref + want.logits_f.pow(2).sum() + ref.acm_term.sum()
    loss_got.backward()
    loss_ref.backward()
    for m, ref in zip(twins, refs):
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)
        for (name, b), c in zip(m.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=name)
