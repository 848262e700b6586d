"""ImageNet weights without the internet: a local HTTP server serves small checkpoints (success, a
timeout, a 404, a truncated and a corrupted file, a hash mismatch); `osteo weights` status, download
and import; the weights used are recorded in the result. The torch cache is a temporary folder."""
import hashlib
import http.server
import io
import os
import signal
import threading
import time

import pytest
import torch
import torchvision

import osteo.weights as ow
from conftest import make_separable
from osteo.cli import main
from osteo.models import build_model
from osteo.training import TrainConfig, TrainResult, train
from osteo.weights import WeightsError, WeightsFile

TEST_LIMIT_S = 120  # every test here ends within this, or fails (a hang, not slowness: the slowest takes ~35 s on a busy 2-core CPU)


@pytest.fixture(autouse=True)
def _bounded_time():
    def too_slow(signum, frame):
        raise TimeoutError(f"test ran longer than {TEST_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _checkpoint_bytes(seed=0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(100, dtype=torch.float32) + seed}, buf)
    return buf.getvalue()


class _Server:
    """Serves ``files`` (name -> bytes) under /good/, /slow/ (answers after ``delay`` s), /trunc/
    (announces the full length, sends half), /flip/ (one byte changed); anything else is a 404."""

    def __init__(self, files: dict, delay: float = 3.0):
        files_, delay_ = files, delay

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                _, mode, name = (self.path.split("/", 2) + ["", ""])[:3]
                body = files_.get(name)
                if body is None or mode not in ("good", "slow", "trunc", "flip"):
                    self.send_error(404, "Not Found")
                    return
                if mode == "slow":
                    time.sleep(delay_)
                send = body
                if mode == "trunc":
                    send = body[: len(body) // 2]
                if mode == "flip":
                    i = len(body) // 2
                    send = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(send)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tiny():
    """A small checkpoint and the WeightsFile whose name publishes its sha256 prefix."""
    body = _checkpoint_bytes()
    digest = hashlib.sha256(body).hexdigest()
    wf = WeightsFile(f"https://example.invalid/models/tiny-{digest[:8]}.pth")
    return body, digest, wf


@pytest.fixture
def server(tiny):
    body, _, wf = tiny
    s = _Server({wf.name: body, "impostor-00000000.pth": _checkpoint_bytes(seed=1)})
    yield s
    s.close()


def _cache_files():
    d = ow.cache_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_download_success_lands_verified_in_the_cache(server, tiny):
    body, digest, wf = tiny
    path = ow.download(wf, base_url=f"{server.base}/good", timeout=5)
    assert path == ow.cache_dir() / wf.name and path.read_bytes() == body
    assert ow.verify(path, wf) == digest
    assert _cache_files() == [wf.name]  # no temporary file left
    assert ow.download(wf, base_url=f"{server.base}/nowhere", timeout=5) == path  # cached: no request


def test_environment_variable_overrides_the_url(server, tiny, monkeypatch):
    _, digest, wf = tiny
    monkeypatch.setenv("OSTEO_WEIGHTS_URL", f"{server.base}/good/")
    assert ow.source_url(wf) == f"{server.base}/good/{wf.name}"
    assert ow.verify(ow.download(wf, timeout=5), wf) == digest
    monkeypatch.delenv("OSTEO_WEIGHTS_URL")
    assert ow.source_url(wf) == wf.url


def test_timeout_is_short_and_says_so(server, tiny):
    wf = tiny[2]
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=rf"/slow/{wf.name}: no answer within 0.5 s"):
        ow.download(wf, base_url=f"{server.base}/slow", timeout=0.5)
    assert time.perf_counter() - t0 < 2.5  # the server answers after 3 s
    assert _cache_files() == []


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv("OSTEO_WEIGHTS_TIMEOUT", "2.5")
    assert ow.timeout_s() == 2.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("OSTEO_WEIGHTS_TIMEOUT", bad)
        with pytest.raises(WeightsError, match="OSTEO_WEIGHTS_TIMEOUT"):
            ow.timeout_s()


def test_404(server, tiny):
    wf = WeightsFile("https://example.invalid/absent-12345678.pth")
    with pytest.raises(WeightsError, match=r"/good/absent-12345678.pth: HTTP 404 Not Found"):
        ow.download(wf, base_url=f"{server.base}/good", timeout=5)
    assert _cache_files() == []


def test_truncated_transfer_is_refused(server, tiny):
    body, _, wf = tiny
    with pytest.raises(WeightsError, match=rf"/trunc/{wf.name}: (truncated: received {len(body) // 2} of {len(body)} "
                                           r"bytes|the transfer broke off)"):
        ow.download(wf, base_url=f"{server.base}/trunc", timeout=5)
    assert _cache_files() == []


def test_corrupted_file_is_refused_with_both_hashes(server, tiny):
    body, digest, wf = tiny
    with pytest.raises(WeightsError) as e:
        ow.download(wf, base_url=f"{server.base}/flip", timeout=5)
    msg = str(e.value)
    assert f"/flip/{wf.name}: sha256 " in msg and f"published hash {digest[:8]}..." in msg and "nothing was saved" in msg
    got = msg.split("sha256 ")[1].split()[0]
    assert len(got) == 64 and got != digest
    assert _cache_files() == []


def test_hash_mismatch_of_another_checkpoint(server, tmp_path):
    wf = WeightsFile("https://example.invalid/impostor-00000000.pth")  # served, but its hash is not 00000000...
    with pytest.raises(WeightsError, match=r"impostor-00000000.pth: sha256 [0-9a-f]{64} does not match the published "
                                           r"hash 00000000\.\.\."):
        ow.download(wf, base_url=f"{server.base}/good", timeout=5)
    assert _cache_files() == []


def test_auto_downloads_then_falls_back_with_one_attempt(monkeypatch):
    """pretrained="auto" for a real network: a download from the local server; a second network
    whose download fails trains from scratch with a warning, and is not tried again."""
    torch.manual_seed(5)
    sd = torchvision.models.resnet18().state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    wf = WeightsFile(f"https://example.invalid/resnet18-{digest[:8]}.pth")
    monkeypatch.setitem(ow.WEIGHTS, "resnet18", wf)
    s2 = _Server({wf.name: body})
    try:
        monkeypatch.setenv("OSTEO_WEIGHTS_URL", f"{s2.base}/good")
        m = build_model("resnet18", pretrained="auto")
        assert m.pretrained_used and m.imagenet_weights == {"file": wf.name, "sha256": digest}
        assert torch.equal(m.conv1.weight, sd["conv1.weight"])
        assert ow.cache_path("resnet18").is_file()

        calls = []
        real_open = ow._open
        monkeypatch.setattr(ow, "_open", lambda url, timeout: calls.append(url) or real_open(url, timeout))
        with pytest.warns(UserWarning, match=r"efficientnet_b0_rwightman-7f5810bc.pth for efficientnet_b0 not "
                                             r"available \(.*HTTP 404 Not Found\); training from scratch"):
            e = build_model("efficientnet_b0", pretrained="auto")
        assert e.pretrained_used is False and e.imagenet_weights is None
        build_model("efficientnet_b0", pretrained="auto")
        assert len(calls) == 1  # the failure is remembered within the process
        with pytest.raises(WeightsError, match="HTTP 404"):  # True tries again, and fails clearly
            build_model("efficientnet_b0", pretrained=True)
        assert len(calls) == 2
    finally:
        s2.close()


def test_result_records_the_weights_used(tmp_path, monkeypatch):
    data = make_separable(n_per_class=6, size=32)
    torch.manual_seed(7)
    sd = torchvision.models.resnet18().state_dict()
    ck = ow.cache_dir()
    ck.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    wf = WeightsFile(f"https://example.invalid/resnet18-{digest[:8]}.pth")
    (ck / wf.name).write_bytes(buf.getvalue())
    for net in ("resnet18", "resnet18_acm"):
        monkeypatch.setitem(ow.WEIGHTS, net, wf)
    base = dict(epochs=1, batch_size=16, image_size=32, device="cpu", seed=0)
    for cfg in (TrainConfig(model="resnet18", inputs=("t",), pretrained=True, **base),
                TrainConfig(pretrained="auto", init="shared", **base)):
        res = train(cfg, data, out_dir=tmp_path / cfg.model, progress=False)
        assert res.pretrained_used is True
        assert res.imagenet_weights == {"file": wf.name, "sha256": digest}
        assert TrainResult.from_json(tmp_path / cfg.model / "result.json").imagenet_weights == res.imagenet_weights
    res = train(TrainConfig(model="resnet18", inputs=("t",), pretrained=False, **base), data, progress=False)
    assert res.pretrained_used is False and res.imagenet_weights is None


# --- osteo weights: status, download, import ------------------------------------------------------

def _known(monkeypatch, wf, *networks):
    for net in networks:
        monkeypatch.setitem(ow.WEIGHTS, net, wf)


def test_cli_status_download_and_import(server, tiny, tmp_path, monkeypatch, capsys):
    body, digest, wf = tiny
    _known(monkeypatch, wf, "resnet18", "resnet18_acm")
    assert main(["weights", "status"]) == 0  # nothing is there yet: a report, not an error
    out = capsys.readouterr().out
    assert out.count("missing") == 6 and wf.name in out

    monkeypatch.setenv("OSTEO_WEIGHTS_URL", f"{server.base}/good")
    assert main(["weights", "download", "resnet18"]) == 0
    assert (ow.cache_dir() / wf.name).read_bytes() == body
    capsys.readouterr()
    assert main(["weights", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    verified = [ln for ln in lines if "verified" in ln]
    assert len(verified) == 2 and all(ln.split()[0] in ("resnet18", "resnet18_acm") for ln in verified)
    assert all(digest in ln for ln in verified)

    # the others are missing on this server: download of all fails, naming each file, non-zero exit
    assert main(["weights", "download"]) == 1
    err = capsys.readouterr().err
    assert "osteo: error: " in err and "inception_v3_google-0cc3c7bd.pth: HTTP 404" in err.replace(f"{server.base}/good/", "")

    assert main(["weights", "download", "alexnet"]) == 2
    assert capsys.readouterr().err.strip().startswith("osteo: error: alexnet: no ImageNet weights known for this network")


def test_import_verifies_and_writes_atomically(tiny, tmp_path, monkeypatch, capsys):
    body, digest, wf = tiny
    _known(monkeypatch, wf, "resnet18")
    carried = tmp_path / "usb" / "renamed.pth"  # recognised by its hash, not its name
    carried.parent.mkdir()
    carried.write_bytes(body)
    assert main(["weights", "import", str(carried)]) == 0
    assert (ow.cache_dir() / wf.name).read_bytes() == body
    assert f"{wf.name}" in capsys.readouterr().out
    assert _cache_files() == [wf.name]


def test_import_refuses_a_mismatching_file(tiny, tmp_path, monkeypatch, capsys):
    body, digest, wf = tiny
    _known(monkeypatch, wf, "resnet18")
    bad = tmp_path / wf.name  # the right name, the wrong contents
    bad.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    bad_digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert main(["weights", "import", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"osteo: error: {bad}: sha256 {bad_digest} does not match the published hash {digest[:8]}... of "
                   f"{wf.name}; not imported")
    assert _cache_files() == []

    other = tmp_path / "something.pth"
    other.write_bytes(b"hello")
    assert main(["weights", "import", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"osteo: error: {other}: sha256 {hashlib.sha256(b'hello').hexdigest()} matches none of "
                          f"the published ImageNet weights (") and "\n" not in err
    assert main(["weights", "import", str(tmp_path / "absent.pth")]) == 1
    assert capsys.readouterr().err.strip() == f"osteo: error: {tmp_path / 'absent.pth'}: no such file"
    assert main(["weights", "import", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"osteo: error: {tmp_path}: is a folder; name the checkpoint files in it"
    assert _cache_files() == []


def test_import_of_several_files_imports_the_good_ones_and_fails(tiny, tmp_path, monkeypatch, capsys):
    body, digest, wf = tiny
    _known(monkeypatch, wf, "resnet18")
    good, bad = tmp_path / "a.pth", tmp_path / "b.pth"
    good.write_bytes(body)
    bad.write_bytes(b"junk")
    assert main(["weights", "import", str(bad), str(good)]) == 1
    assert _cache_files() == [wf.name]
    assert f"{bad}:" in capsys.readouterr().err


def test_cached_file_with_wrong_hash_shows_in_status(tiny, monkeypatch, capsys):
    body, digest, wf = tiny
    _known(monkeypatch, wf, "resnet18")
    ow.cache_dir().mkdir(parents=True, exist_ok=True)
    (ow.cache_dir() / wf.name).write_bytes(b"junk")
    junk = hashlib.sha256(b"junk").hexdigest()
    rows = {r["network"]: r for r in ow.status()}
    assert rows["resnet18"]["state"] == "HASH MISMATCH" and rows["resnet18"]["sha256"] == junk
    assert rows["vit_b_16"]["state"] == "missing"
    assert main(["weights", "status"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"osteo: error: {ow.cache_dir() / wf.name}: sha256 {junk} does not match the published hash "
                   f"{digest[:8]}... of {wf.name}; delete it, then `osteo weights download resnet18` or "
                   f"`osteo weights import FILE`")


def test_published_names_carry_hash_prefixes():
    names = {net: wf.name for net, wf in ow.WEIGHTS.items()}
    assert set(names) == {"resnet18", "resnet18_acm", "inception_v3", "efficientnet_b0", "vit_b_16", "xception"}
    assert names["resnet18"] == names["resnet18_acm"] == "resnet18-f37072fd.pth"
    assert {net: wf.sha256_prefix for net, wf in ow.WEIGHTS.items()} == {
        "resnet18": "f37072fd", "resnet18_acm": "f37072fd", "inception_v3": "0cc3c7bd",
        "efficientnet_b0": "7f5810bc", "vit_b_16": "c867db91", "xception": "43020ad28"}
    with pytest.raises(ValueError, match="no sha256 prefix"):
        WeightsFile("https://example.invalid/model.pth").sha256_prefix
