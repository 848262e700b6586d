"""Checkpoints are checked before use, and every command turns a user's mistake into one line
``osteo: error: <file>: <problem>`` with a non-zero exit code (a traceback only with --debug)."""
import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from osteo.cli import main as osteo_main
from osteo.training import CHECKPOINT_FORMAT, CheckpointError, TrainConfig, load_model, make_model
from test_dicom import RAW, make_ct, save

ROOT = Path(__file__).resolve().parents[1]


_OWN = object()


def make_checkpoint(path: Path, model="resnet18", epoch=None, epochs=2, config=_OWN, weights=None, **over) -> Path:
    """A checkpoint in the kit's format around freshly built weights (no training needed)."""
    inputs = ("s", "t") if model == "twin" else ("t",)
    cfg = TrainConfig(model=model, inputs=inputs, epochs=epochs, batch_size=4, image_size=32, pretrained=False,
                      device="cpu", **over)
    torch.manual_seed(0)
    state = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict() if config is _OWN else config,
             "epoch": epochs if epoch is None else epoch,
             "model": make_model(cfg).state_dict() if weights is None else weights,
             "history": "[]", "seconds": 0.0, "pretrained_used": False}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    d = tmp_path_factory.mktemp("slices")
    return [save(make_ct(RAW + k), d / f"s{k}.dcm") for k in range(3)]


def run_cli(capsys, *argv):
    rc = osteo_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("osteo: error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    for banned in ("Traceback", "weights_only", "torch.load", "trusted source"):
        assert banned not in err, err
    return lines[0]


# --- checkpoints of another model -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4, 10])
@pytest.mark.parametrize("model", ["resnet18", "twin"])
def test_checkpoint_with_another_class_count_is_refused(tmp_path, capsys, slices, k, model):
    ck = make_checkpoint(tmp_path / f"c{k}.pt", model=model, num_classes=k)
    with pytest.raises(CheckpointError, match=f"trained for {k} classes; osteo predicts 3"):
        load_model(ck)
    rc, out, err = run_cli(capsys, "predict", ck, *slices, "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, f"trained for {k} classes")
    assert not (tmp_path / "p.csv").exists()


def test_weights_of_another_head_size_are_refused(tmp_path, capsys, slices):
    two = make_model(TrainConfig(model="resnet18", inputs=("t",), num_classes=2, pretrained=False)).state_dict()
    ck = make_checkpoint(tmp_path / "mixed.pt", weights=two)  # config says 3 classes, weights have 2
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, "weights do not fit a resnet18 network")


GOOD = TrainConfig(model="resnet18", inputs=("t",), epochs=2, batch_size=4, image_size=32, pretrained=False).to_dict()
DAMAGED_CONFIGS = [
    (["resnet18"], "not a mapping"),
    ("resnet18", "not a mapping"),
    (None, "not a mapping"),
    (42, "not a mapping"),
    ({**GOOD, "colour": "red"}, "unknown field(s) colour"),
    ({**GOOD, 3: 1}, "unknown field(s) 3"),
    ({**GOOD, "model": "resnet50"}, "unknown model 'resnet50'"),
    ({**GOOD, "model": 7}, "field 'model' is 7"),
    ({**GOOD, "image_size": "abc"}, "field 'image_size' is 'abc', not an int;"),
    ({**GOOD, "lr": "fast"}, "field 'lr' is 'fast', not a float;"),
    ({**GOOD, "lam": float("nan")}, "field 'lam'"),
    ({**GOOD, "inputs": 5}, "field 'inputs' is 5"),
    ({**GOOD, "inputs": ["x"]}, "unknown view"),
    ({**GOOD, "inputs": ["s", "t"]}, "reads 1 input"),
    ({**GOOD, "epochs": 0}, "epochs must be"),
    ({**GOOD, "learn_alpha": "yes"}, "field 'learn_alpha'"),
    ({**GOOD, "num_classes": "3"}, "field 'num_classes'"),
    ({**GOOD, "num_classes": 3.0}, "field 'num_classes' is 3.0, not an int"),
    ({}, "lacks field(s) model, inputs"),
    ({k: v for k, v in GOOD.items() if k != "model"}, "lacks field(s) model;"),  # never the default twin
    ({k: v for k, v in GOOD.items() if k != "epochs"}, "lacks field(s) epochs;"),
    ({**GOOD, "image_size": 0}, "image_size 0 is not an input size"),
    ({**GOOD, "image_size": -32}, "image_size -32 is not an input size"),
    ({**GOOD, "image_size": 10**9}, "image_size 1000000000 is not an input size"),  # no 4 EB allocation
    ({**GOOD, "augment": True}, "augmentation is not implemented"),
    ({**GOOD, "pretrained": "yes"}, "pretrained must be True, False or 'auto'"),
    ({**GOOD, "engine": "warp"}, "engine 'warp'"),
    ({**GOOD, "window_bits": 7}, "window_bits must be"),
    ({**GOOD, "device": 3}, "field 'device' is 3"),
]


@pytest.mark.parametrize("config,why", DAMAGED_CONFIGS, ids=[w for _, w in DAMAGED_CONFIGS])
def test_damaged_stored_config_is_refused_naming_the_file(tmp_path, capsys, slices, config, why):
    ck = make_checkpoint(tmp_path / "damaged.pt", config=config)
    with pytest.raises(CheckpointError) as ei:
        load_model(ck)
    assert str(ei.value).startswith(f"{ck}: ") and why in str(ei.value), str(ei.value)
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, why)


@pytest.mark.parametrize("epoch,why", [("1", "not a count"), (-1, "not a count"), (True, "not a count"),
                                       (3, "exceeds the run's 2 epochs")])
def test_damaged_epoch_is_refused(tmp_path, epoch, why):
    with pytest.raises(CheckpointError, match=why):
        load_model(make_checkpoint(tmp_path / "e.pt", epoch=epoch))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_weights_of_another_shape_name_the_tensor(tmp_path, capsys, slices, k):
    other = make_model(TrainConfig(model="resnet18", inputs=("t",), num_classes=k, pretrained=False)).state_dict()
    ck = make_checkpoint(tmp_path / "shape.pt", weights=other)
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, f"fc.weight has shape [{k}, 512], the network needs [3, 512]")


def test_weights_of_another_network_name_what_is_missing(tmp_path, capsys, slices):
    resnet = make_model(TrainConfig(model="resnet18", inputs=("t",), pretrained=False)).state_dict()
    ck = make_checkpoint(tmp_path / "other.pt", model="twin", weights=resnet)
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, "weights do not fit a twin network", "missing, e.g. alpha", "unexpected tensor(s)")
    ck = make_checkpoint(tmp_path / "empty.pt", weights={})
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, "122 tensor(s) missing")


@pytest.mark.parametrize("kind,why", [
    ("plain tensor", "not an osteo checkpoint"), ("list", "not an osteo checkpoint"),
    ("state_dict alone", "not an osteo checkpoint"), ("dict without config", "lacks 'config'"),
    ("zero bytes", "not a PyTorch checkpoint file"), ("half a checkpoint", "damaged or truncated"),
    ("first 100 bytes", "damaged or truncated"), ("zip of text", "a zip archive, but not a PyTorch checkpoint"),
    ("legacy torch format", "not an osteo checkpoint"), ("text", "not a PyTorch checkpoint file"),
])
def test_other_shapes_of_checkpoint_file_give_one_line(tmp_path, capsys, slices, kind, why):
    import zipfile

    ck = tmp_path / "c.pt"
    sd = make_model(TrainConfig(model="resnet18", inputs=("t",), pretrained=False)).state_dict()
    if kind == "plain tensor":
        torch.save(torch.zeros(3), ck)
    elif kind == "list":
        torch.save([1, 2, 3], ck)
    elif kind == "state_dict alone":
        torch.save(sd, ck)
    elif kind == "dict without config":
        torch.save({"format": CHECKPOINT_FORMAT, "model": sd, "epoch": 1}, ck)
    elif kind == "zero bytes":
        ck.write_bytes(b"")
    elif kind in ("half a checkpoint", "first 100 bytes"):
        data = make_checkpoint(tmp_path / "good.pt").read_bytes()
        ck.write_bytes(data[: len(data) // 2] if kind == "half a checkpoint" else data[:100])
    elif kind == "zip of text":
        with zipfile.ZipFile(ck, "w") as z:
            z.writestr("notes.txt", "hello")
    elif kind == "legacy torch format":
        torch.save({"a": torch.zeros(2)}, ck, _use_new_zipfile_serialization=False)
    else:
        ck.write_text("epoch 3, accuracy 0.9\n")
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, why)
    assert not (tmp_path / "p.csv").exists()


def test_damaged_or_non_finite_weights_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a mapping of tensors"):
        load_model(make_checkpoint(tmp_path / "a.pt", weights=[torch.zeros(2)]))
    with pytest.raises(CheckpointError, match="not a mapping of tensors"):
        load_model(make_checkpoint(tmp_path / "b.pt", weights={"fc.weight": "zeros"}))
    sd = make_model(TrainConfig(model="resnet18", inputs=("t",), pretrained=False)).state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values \(fc.weight\)"):
        load_model(make_checkpoint(tmp_path / "c.pt", weights=sd))


def _weights(model="resnet18", **over):
    cfg = TrainConfig(model=model, inputs=("s", "t") if model == "twin" else ("t",), pretrained=False, **over)
    torch.manual_seed(0)
    return make_model(cfg).state_dict()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
                                   torch.complex64])
@pytest.mark.parametrize("model", ["resnet18", "twin"])
def test_weights_of_another_dtype_are_refused_not_cast(tmp_path, capsys, slices, dtype, model):
    sd = _weights(model)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name].to(dtype)
    ck = make_checkpoint(tmp_path / "d.pt", model=model, weights=sd)
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, f"{name} is stored as {str(dtype).removeprefix('torch.')}, the network needs float32")
    assert not (tmp_path / "p.csv").exists()


def test_batch_norm_counter_of_another_dtype_is_refused(tmp_path):
    sd = _weights()
    name = next(k for k in sd if k.endswith("num_batches_tracked"))
    sd[name] = sd[name].float()
    with pytest.raises(CheckpointError, match=f"{name} is stored as float32, the network needs int64"):
        load_model(make_checkpoint(tmp_path / "n.pt", weights=sd))


@pytest.mark.parametrize("where", ["first", "last", "every"])
def test_negative_batch_norm_variances_are_refused(tmp_path, where):
    sd = _weights("twin")
    names = [k for k in sd if k.endswith("running_var")]
    for k in {"first": names[:1], "last": names[-1:], "every": names}[where]:
        sd[k][0] = -0.5
    with pytest.raises(CheckpointError, match="negative variances"):
        load_model(make_checkpoint(tmp_path / "v.pt", model="twin", weights=sd))


@pytest.mark.parametrize("stored", [0.7, -1.0, 2.0, 0.5000001])
def test_fixed_alpha_that_differs_from_the_config_is_refused(tmp_path, stored):
    sd = _weights("twin", learn_alpha=False, alpha=0.5)
    sd["alpha"] = torch.tensor(stored)
    with pytest.raises(CheckpointError, match=r"fixed alpha in the weights .* differs from the stored config's alpha \(0.5\)"):
        load_model(make_checkpoint(tmp_path / "a.pt", model="twin", weights=sd, learn_alpha=False, alpha=0.5))


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0, 0.0])
def test_fixed_alpha_as_trained_loads(tmp_path, alpha):
    ck = make_checkpoint(tmp_path / "a.pt", model="twin", weights=_weights("twin", learn_alpha=False, alpha=alpha),
                         learn_alpha=False, alpha=alpha)
    model, cfg = load_model(ck)
    assert float(model.alpha) == float(torch.tensor(alpha)) and cfg.learn_alpha is False


@pytest.mark.parametrize("fmt", ["osteo-kit/2", "osteo-kit/10", "osteo-kit/1.1"])
def test_checkpoint_of_another_format_version_says_so(tmp_path, capsys, slices, fmt):
    ck = make_checkpoint(tmp_path / "f.pt")
    state = torch.load(ck, weights_only=True)
    state["format"] = fmt
    torch.save(state, ck)
    rc, out, err = run_cli(capsys, "predict", ck, slices[0], "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, f"format '{fmt}'", f"it reads '{CHECKPOINT_FORMAT}'")


@pytest.mark.parametrize("scale", [1e37, 1e38, float(torch.finfo(torch.float32).max)])
def test_weights_that_give_non_finite_outputs_give_error_rows(tmp_path, capsys, slices, scale):
    sd = _weights()
    sd["fc.weight"][:] = scale
    sd["fc.bias"][:] = -scale
    ck = make_checkpoint(tmp_path / "h.pt", weights=sd)
    rc, out, err = run_cli(capsys, "predict", ck, *slices, "--out", tmp_path / "p.csv")
    assert rc == 1
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all(r[c] == "" for r in rows for c in ("predicted", "p_normal", "p_osteopenia", "p_osteoporosis"))
    assert all("output is not finite" in r["error"] for r in rows)


@pytest.mark.parametrize("epoch,epochs", [(1, 4), (0, 4), (59, 60)])
def test_unfinished_run_is_refused_unless_allowed_then_warned(tmp_path, capsys, slices, epoch, epochs):
    ck = make_checkpoint(tmp_path / "cut.pt", model="twin", epoch=epoch, epochs=epochs)
    rc, out, err = run_cli(capsys, "predict", ck, *slices, "--out", tmp_path / "p.csv")
    assert_one_line_error(rc, err, ck, f"unfinished training run (saved after epoch {epoch} of {epochs})",
                          "--allow-unfinished")
    rc, out, err = run_cli(capsys, "predict", ck, *slices, "--out", tmp_path / "p.csv", "--allow-unfinished")
    assert rc == 0
    assert f"osteo: warning: {ck}: unfinished training run (saved after epoch {epoch} of {epochs})" in err
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("normal", "osteopenia", "osteoporosis")) - 1) < 1e-3 for r in rows)
    assert all(r["p_osteoporosis"] != "" for r in rows)


def test_finished_checkpoint_predicts_every_class_column(tmp_path, capsys, slices):
    ck = make_checkpoint(tmp_path / "ok.pt", model="twin")
    rc, out, err = run_cli(capsys, "predict", ck, *slices, "--out", tmp_path / "p.csv")
    assert rc == 0 and "osteo: " not in err
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 3 and all(r["p_osteoporosis"] and r["alpha"] for r in rows)


# --- files that are not checkpoints -------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["raw pickle", "torch.save of an object", "osteo format with an object",
                                  "text", "empty", "truncated zip", "random bytes", "folder", "missing"])
def test_files_that_are_not_checkpoints_give_one_line(tmp_path, capsys, slices, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "x.pt"
    if kind == "raw pickle":
        p.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": Evil()}))
    elif kind == "torch.save of an object":
        torch.save({"x": Evil()}, p)
    elif kind == "osteo format with an object":
        torch.save({"format": CHECKPOINT_FORMAT, "config": GOOD, "epoch": 2, "model": {}, "extra": Evil()}, p)
    elif kind == "text":
        p.write_text("hello, I am not a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated zip":
        make_checkpoint(p)
        p.write_bytes(p.read_bytes()[:3000])
    elif kind == "random bytes":
        p.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "folder":
        p.mkdir()
    rc, out, err = run_cli(capsys, "predict", p, slices[0], "--out", tmp_path / "p.csv")
    line = assert_one_line_error(rc, err, p)
    assert not (tmp_path / "pwned.txt").exists()
    if "object" in kind or kind == "raw pickle":
        assert "refused without running anything" in line
    if kind == "missing":
        assert "no such checkpoint file" in line
    if kind == "folder":
        assert "is a folder" in line
    with pytest.raises(CheckpointError):  # --debug: the exception itself, with its traceback
        osteo_main(["predict", str(p), str(slices[0]), "--out", str(tmp_path / "p.csv"), "--debug"])


# --- every command: a user error is one line ------------------------------------------------------------


def _bad_manifest(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,label,patient_id\nnope.dcm,normal,p1\n")
    return m


@pytest.mark.parametrize("case", [
    "train: missing manifest", "train: bad manifest", "train: unknown model", "train: batch size 1",
    "train: zero epochs", "train: bad device", "train: out is a file", "train: negative lr",
    "synth: out is a file", "synth: zero per class", "synth: tiny size",
    "predict: out is a folder", "predict: out under a file", "predict: gradcam is a file", "predict: bad device",
    "grid: unknown profile", "grid: bad worker", "grid: zero batch runs", "report: unknown profile", "reproduce: unknown profile",
    "reproduce: unknown notebook",
])
def test_every_command_reports_user_errors_in_one_line(tmp_path, capsys, slices, case):
    f = tmp_path / "file.txt"
    f.write_text("x")
    ck = make_checkpoint(tmp_path / "ok.pt")
    argv, needle = {
        "train: missing manifest": (["train", tmp_path / "none.csv", "--out", tmp_path / "r"], "none.csv"),
        "train: bad manifest": (["train", _bad_manifest(tmp_path), "--out", tmp_path / "r"], "missing file"),
        "train: unknown model": (["train", _bad_manifest(tmp_path), "--model", "resnet50", "--out", tmp_path / "r"], "--model 'resnet50'"),
        "train: batch size 1": (["train", _bad_manifest(tmp_path), "--batch-size", "1", "--out", tmp_path / "r"], "batch_size"),
        "train: zero epochs": (["train", _bad_manifest(tmp_path), "--epochs", "0", "--out", tmp_path / "r"], "epochs"),
        "train: bad device": (["train", _bad_manifest(tmp_path), "--device", "gpu7", "--out", tmp_path / "r"], "gpu7"),
        "train: out is a file": (["train", _bad_manifest(tmp_path), "--out", f], "file.txt"),
        "train: negative lr": (["train", _bad_manifest(tmp_path), "--lr", "-1", "--out", tmp_path / "r"], "--lr"),
        "synth: out is a file": (["synth", f, "--n-per-class", "1", "--size", "32"], "file.txt"),
        "synth: zero per class": (["synth", tmp_path / "s", "--n-per-class", "0"], "n_per_class"),
        "synth: tiny size": (["synth", tmp_path / "s", "--n-per-class", "1", "--size", "8"], "size"),
        "predict: out is a folder": (["predict", ck, slices[0], "--out", tmp_path], "--out is a folder"),
        "predict: out under a file": (["predict", ck, slices[0], "--out", f / "p.csv"], "file.txt: not a folder"),
        "predict: gradcam is a file": (["predict", ck, slices[0], "--out", tmp_path / "p.csv", "--gradcam", f], "--gradcam"),
        "predict: bad device": (["predict", ck, slices[0], "--device", "tpu", "--out", tmp_path / "p.csv"], "'tpu'"),
        "grid: unknown profile": (["grid", "--profile", "huge"], "--profile 'huge'"),
        "grid: bad worker": (["grid", "--profile", "smoke", "--worker", "3/2"], "--worker '3/2'"),
        "grid: zero batch runs": (["grid", "--profile", "smoke", "--batch-runs", "0"], "--batch-runs 0"),
        "report: unknown profile": (["report", "--profile", "huge"], "--profile 'huge'"),
        "reproduce: unknown profile": (["reproduce", "--profile", "huge"], "--profile 'huge'"),
        "reproduce: unknown notebook": (["reproduce", "--profile", "smoke", "--notebooks", "77"], "--notebooks '77'"),
    }[case]
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, needle)


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "osteo.cli", "predict", str(bad), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"osteo: error: {bad}: not a loadable osteo checkpoint: not a PyTorch checkpoint file"
    r = subprocess.run([sys.executable, "-m", "osteo.cli", "--debug", "predict", str(bad), str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["train", "m.csv", "--out", "r", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (["train", "m.csv"], "required: --out"),
    (["synth", "out", "--n-per-class", "x"], "argument --n-per-class"),
    (["synth"], "required: out_dir"),
    (["grid", "--tables", "table9"], "invalid choice: 'table9'"),
    (["grid", "--seeds", "x"], "argument --seeds"),
    (["reproduce", "--seeds", "1.5"], "argument --seeds"),
    (["predict", "ck.pt"], "required: paths"),
    (["weights", "frob"], "invalid choice: 'frob'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: cmd"),
])
def test_bad_option_values_give_one_line_not_usage_text(capsys, argv, needle):
    rc, out, err = run_cli(capsys, *argv)
    line = assert_one_line_error(rc, err, needle)
    assert "usage:" not in err and line.endswith("--help`)")


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "1"], "--batch-size must be an integer >= 2"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 2"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--image-size", "8"], "--image-size must be an integer in [16, 4096], got 8"),
    (["--image-size", "100000"], "--image-size must be an integer in [16, 4096]"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--twins", "-2"], "--twins must be an integer >= 0"),
    (["--engines", "grouped", "turbo"], "--engines 'turbo'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bench_options_are_checked_before_measuring(capsys, monkeypatch, argv, needle):
    import osteo.bench

    measured = []
    monkeypatch.setattr(osteo.bench, "run", lambda *a, **k: measured.append(a))
    rc, out, err = run_cli(capsys, "bench", *argv)
    line = assert_one_line_error(rc, err, needle)
    assert "usage:" not in err and line.endswith("(see `osteo bench --help`)"), line
    assert measured == []  # refused before any network is built


def test_bench_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "bench", "--help")
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: osteo bench ")


def _manifest_case(tmp_path, slices, case):
    m = tmp_path / "m.csv"
    if case == "latin-1 file name":
        m.write_bytes(b"path,label,patient_id\n" + "\u00e9t\u00e9.dcm".encode("latin-1") + b",normal,p1\n")
        return m, "line 2: not UTF-8 text (byte 0xe9 at column 1)"
    if case == "binary":
        m.write_bytes(b"\xff\xfe\x00\x01garbage")
        return m, "line 1: not UTF-8 text"
    if case == "empty":
        m.write_text("")
        return m, "cannot be read as CSV"
    if case == "too few patients":
        m.write_text("path,label,patient_id\n" + "".join(f"{s},{lab},p{i}\n" for i, (s, lab) in
                                                        enumerate(zip(slices, ("normal", "osteopenia", "osteoporosis")))))
        return m, "problem(s): class normal: 1 patient, need at least 2"
    if case == "unreadable slices":
        bad = tmp_path / "bad.dcm"
        bad.write_text("not dicom")
        files = [bad] + [save(make_ct(RAW + i), tmp_path / f"ok{i}.dcm") for i in range(1, 6)]
        rows = [f"{f},{lab},p{i}\n" for i, (f, lab) in enumerate(zip(files, ["normal", "osteopenia", "osteoporosis"] * 2))]
        m.write_text("path,label,patient_id\n" + "".join(rows))
        return m, "bad.dcm: not a DICOM file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["latin-1 file name", "binary", "empty", "too few patients", "unreadable slices"])
def test_train_on_a_bad_manifest_gives_one_line_naming_it(tmp_path, capsys, slices, case):
    m, needle = _manifest_case(tmp_path, slices, case)
    rc, out, err = run_cli(capsys, "train", m, "--out", tmp_path / "run", "--model", "resnet18", "--epochs", "1",
                           "--batch-size", "2", "--image-size", "32", "--pretrained", "false", "--device", "cpu")
    err = "\n".join(x for x in err.splitlines() if "reading DICOM" not in x and x.strip())  # the progress bar
    line = assert_one_line_error(rc, err, needle)
    assert str(m) in line or "bad.dcm" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv,needle", [
    (["train", "{m}", "--out", "{r}", "--image-size", "100000"], "--image-size 100000: too large (at most 4096 pixels)"),
    (["train", "{m}", "--out", "{r}", "--image-size", "4097"], "--image-size 4097: too large (at most 4096 pixels)"),
    (["train", "{m}", "--out", "{r}", "--image-size", str(2**40)], f"--image-size {2**40}: too large"),
    (["synth", "{r}", "--size", "1000000000", "--n-per-class", "2"], "--size 1000000000: too large (at most 4096 pixels)"),
    (["synth", "{r}", "--size", "5000", "--n-per-class", "2"], "--size 5000: too large (at most 4096 pixels)"),
])
def test_image_sizes_too_large_to_allocate_are_refused_first(tmp_path, capsys, argv, needle):
    m = _bad_manifest(tmp_path)  # never read: the size is checked before anything is loaded
    argv = [a.format(m=m, r=tmp_path / "run") for a in argv]
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


# --- a damaged run folder: the next training names the file instead of a traceback -----------------

from conftest import make_separable  # noqa: E402
from osteo.training import TrainingInterrupted, train  # noqa: E402

_RUN = dict(model="resnet18", inputs=("t",), epochs=2, batch_size=8, image_size=32, pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def tiny_data():
    return make_separable(n_per_class=8)  # 18 training slices: batches of 8, 8 and 2


@pytest.fixture(scope="module")
def killed_run(tiny_data, tmp_path_factory):
    """The run folder of a run killed in epoch 2: the checkpoint of epoch 1, no result."""
    d = tmp_path_factory.mktemp("killed")
    with pytest.raises(TrainingInterrupted):
        train(TrainConfig(**_RUN), tiny_data, d, progress=False, checkpoint_every_s=0, stop_after_steps=4)
    assert torch.load(d / "checkpoint.pt", weights_only=True)["epoch"] == 1
    return d / "checkpoint.pt"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"unknown_field": 1}', b"\xff\xfe\x00", b"", b"null"])
def test_damaged_result_file_in_the_run_folder_is_named(tmp_path, tiny_data, content):
    (tmp_path / "result.json").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(**_RUN), tiny_data, tmp_path, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'result.json'}: not a result file of osteo-kit")
    assert (tmp_path / "result.json").read_bytes() == content  # left for the user to look at


@pytest.mark.parametrize("part,damage", [("history", "garbage"), ("history", "5"), ("history", None),
                                         ("best", "{bad"), ("optimizer", None), ("optimizer", {"state": 3}),
                                         ("scheduler", None), ("rng", None), ("rng", {"cpu": torch.zeros(3)})])
def test_damaged_training_state_of_a_killed_run_is_named_when_resuming(tmp_path, tiny_data, killed_run, part, damage):
    state = torch.load(killed_run, weights_only=True)
    if damage is None:
        del state[part]
    else:
        state[part] = damage
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(**_RUN), tiny_data, tmp_path, progress=False)
    assert str(e.value).startswith(f"{tmp_path / 'checkpoint.pt'}: the saved training state '{part}' is "
                                   f"{'missing' if damage is None else 'damaged'}"), str(e.value)


def test_killed_run_with_its_state_intact_resumes(tmp_path, tiny_data, killed_run):
    (tmp_path / "checkpoint.pt").write_bytes(killed_run.read_bytes())
    res = train(TrainConfig(**_RUN), tiny_data, tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2 and len(res.history) == 2
