"""ImageNet weights: where they come from, how they are checked, and how to carry them offline.

The paper trained every network from ImageNet weights (section IV.1). The six networks of the kit
use five checkpoint files (ResNet18+ACM, and both branches of the twin, load ResNet18's):
torchvision's for ResNet18, Inception-v3, EfficientNet-b0 and ViT-B/16, timm's for Xception. Each
file name carries the first hex digits of the file's sha256 (``resnet18-f37072fd.pth``), the hash
its publisher gives; a file is used only when its sha256 starts with them.

Files live in torch's cache, ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``),
where torchvision and timm keep them too. :func:`obtain` finds a verified file there, else
downloads it (from ``OSTEO_WEIGHTS_URL`` when set: a folder URL holding files of the same names),
with a short timeout (``OSTEO_WEIGHTS_TIMEOUT`` seconds, default 10). A download is written to a
temporary file beside its destination and renamed only once verified: the cache never holds a
partial or foreign file. ``osteo weights status | download | import FILE...`` does the same from
the command line.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .atomic import AtomicFile

__all__ = ["NETWORKS", "WEIGHTS", "WeightsError", "WeightsFile", "cache_dir", "download", "import_file",
           "obtain", "sha256_file", "status", "verify", "weights_file"]

DEFAULT_TIMEOUT = 10.0


class WeightsError(RuntimeError):
    """ImageNet weights that cannot be had or cannot be trusted; the message starts with the file."""


@dataclass(frozen=True)
class WeightsFile:
    """One published checkpoint: its URL; its file name carries the published sha256 prefix."""

    url: str

    @property
    def name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the last ``-`` of the name (torch.hub's convention)."""
        m = re.search(r"-([0-9a-f]{6,64})\.[^-]*$", self.name)
        if not m:
            raise ValueError(f"{self.name}: the file name carries no sha256 prefix")
        return m.group(1)


def _tv(weights) -> WeightsFile:
    return WeightsFile(weights.url)


def _table() -> dict:
    from torchvision import models as tvm

    resnet18 = _tv(tvm.ResNet18_Weights.IMAGENET1K_V1)
    return {
        "resnet18": resnet18,
        "resnet18_acm": resnet18,  # the ResNet part of ResNet18+ACM, and of both branches of the twin
        "inception_v3": _tv(tvm.Inception_V3_Weights.IMAGENET1K_V1),
        "efficientnet_b0": _tv(tvm.EfficientNet_B0_Weights.IMAGENET1K_V1),
        "vit_b_16": _tv(tvm.ViT_B_16_Weights.IMAGENET1K_V1),
        # timm's legacy_xception (classic Xception, Cadene's port); a test checks timm still names it
        "xception": WeightsFile("https://github.com/rwightman/pytorch-image-models/releases/download/"
                                "v0.1-cadene/xception-43020ad28.pth"),
    }


#: The networks whose ImageNet weights the kit knows, and their files (ResNet18+ACM shares ResNet18's).
WEIGHTS: dict = _table()
NETWORKS = tuple(WEIGHTS)


def weights_file(network: str) -> WeightsFile:
    if network not in WEIGHTS:
        raise ValueError(f"no ImageNet weights known for {network!r}; known: {', '.join(NETWORKS)}")
    return WEIGHTS[network]


def cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: torch's cache of downloaded weights (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(network: str) -> Path:
    return cache_dir() / weights_file(network).name


def timeout_s() -> float:
    text = os.environ.get("OSTEO_WEIGHTS_TIMEOUT", "")
    try:
        t = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise WeightsError(f"OSTEO_WEIGHTS_TIMEOUT: {text!r} is not a number of seconds") from None
    if not t > 0:
        raise WeightsError(f"OSTEO_WEIGHTS_TIMEOUT: {text!r} must be a positive number of seconds")
    return t


def source_url(wf: WeightsFile, base_url: str | None = None) -> str:
    """Where ``wf`` is downloaded from: ``base_url`` (or ``OSTEO_WEIGHTS_URL``) + its name, else its own URL."""
    base = base_url or os.environ.get("OSTEO_WEIGHTS_URL")
    return f"{base.rstrip('/')}/{wf.name}" if base else wf.url


_HASHES: dict = {}  # (path, size, mtime_ns) -> sha256: files are hashed once per process


def sha256_file(path) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def verify(path, wf: WeightsFile) -> str:
    """The sha256 of ``path``; WeightsError unless it starts with the prefix published in ``wf``'s name."""
    digest = sha256_file(path)
    if not digest.startswith(wf.sha256_prefix):
        raise WeightsError(f"{path}: sha256 {digest} does not match the published hash {wf.sha256_prefix}... "
                           f"of {wf.name}")
    return digest


def _identify(digest: str):
    return next((wf for wf in dict.fromkeys(WEIGHTS.values()) if digest.startswith(wf.sha256_prefix)), None)


def _open(url: str, timeout: float):
    """urlopen with a deadline on the whole wait for an answer (name lookup included), in a daemon thread."""
    box: dict = {}

    def go():
        try:
            box["resp"] = urllib.request.urlopen(url, timeout=timeout)
        except BaseException as e:  # handed to the caller
            box["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise WeightsError(f"{url}: no answer within {timeout:g} s (offline, or a firewall?)")
    err = box.get("err")
    if isinstance(err, urllib.error.HTTPError):
        raise WeightsError(f"{url}: HTTP {err.code} {err.reason}") from err
    if isinstance(err, urllib.error.URLError):
        reason = err.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise WeightsError(f"{url}: no answer within {timeout:g} s (offline, or a firewall?)") from err
        raise WeightsError(f"{url}: {reason}") from err
    if isinstance(err, (socket.timeout, TimeoutError)):
        raise WeightsError(f"{url}: no answer within {timeout:g} s (offline, or a firewall?)") from err
    if err is not None:
        raise WeightsError(f"{url}: {type(err).__name__}: {err}") from err
    return box["resp"]


def download(network_or_file, base_url: str | None = None, timeout: float | None = None,
             progress: bool = False) -> Path:
    """Download one checkpoint into the cache, verified; returns its path (already there: no download).

    ``network_or_file`` is a network name or a :class:`WeightsFile`. The file is streamed to a
    temporary file in the cache folder and renamed into place only when complete and matching its
    published hash; otherwise WeightsError (no answer within ``timeout`` seconds, HTTP errors, a
    stalled or truncated transfer, a hash mismatch) and nothing is left in the cache.
    """
    wf = network_or_file if isinstance(network_or_file, WeightsFile) else weights_file(network_or_file)
    dest = cache_dir() / wf.name
    if dest.is_file():
        verify(dest, wf)
        return dest
    url = source_url(wf, base_url)
    timeout = timeout_s() if timeout is None else float(timeout)
    resp = _open(url, timeout)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = AtomicFile(dest, "wb", suffix=".part")
    except OSError as e:
        resp.close()
        raise WeightsError(f"{dest.parent}: cannot write {wf.name} there ({e.strerror or e})") from e
    try:
        with resp:
            digest = _stream(resp, part.file, url, timeout, wf.name if progress else None)
        if not digest.startswith(wf.sha256_prefix):
            raise WeightsError(f"{url}: sha256 {digest} does not match the published hash {wf.sha256_prefix}... "
                               f"of {wf.name}; nothing was saved")
        part.commit()
    except OSError as e:  # a full disk, a read-only cache
        part.discard()
        raise WeightsError(f"{dest}: cannot write the download ({e.strerror or e})") from e
    except BaseException:
        part.discard()
        raise
    return dest


def _stream(resp, f, url: str, timeout: float, bar_name: str | None) -> str:
    """Copy a response into ``f`` (checking its Content-Length); returns the sha256 of what came."""
    expected = resp.headers.get("Content-Length")
    expected = int(expected) if expected and expected.isdigit() else None
    h, got = hashlib.sha256(), 0
    bar = None
    if bar_name is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=expected, unit="B", unit_scale=True, desc=bar_name, leave=False)
    while True:
        try:
            chunk = resp.read(1 << 20)
        except (socket.timeout, TimeoutError):
            raise WeightsError(f"{url}: the transfer stalled (no data for {timeout:g} s after {got} bytes)") from None
        except Exception as e:  # a connection cut short (http.client.IncompleteRead, resets)
            raise WeightsError(f"{url}: the transfer broke off after {got} bytes ({type(e).__name__})") from e
        if not chunk:
            break
        f.write(chunk)
        h.update(chunk)
        got += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if expected is not None and got != expected:
        raise WeightsError(f"{url}: truncated: received {got} of {expected} bytes")
    return h.hexdigest()


_FAILED: dict = {}  # url -> why its download failed: "auto" tries each URL once per process


def obtain(network: str, required: bool) -> tuple[Path, str] | None:
    """The verified cached checkpoint of ``network`` and its sha256, downloading it when missing.

    ``required`` (``pretrained=True``): WeightsError when it cannot be had. Otherwise
    (``pretrained="auto"``): None, with a warning that says why and how to get the weights; a
    failed download is not retried in the same process. A cached file that fails its hash is an
    error either way (it is not ours: torch and the kit verify what they download).
    """
    wf = weights_file(network)
    path = cache_dir() / wf.name
    if path.is_file():
        try:
            return path, verify(path, wf)
        except WeightsError as e:
            raise WeightsError(f"{e}; delete it, then `osteo weights download {network}` or "
                               f"`osteo weights import FILE`") from None
    url = source_url(wf)
    if not required and url in _FAILED:
        reason = _FAILED[url]
    else:
        try:
            path = download(wf)
            return path, verify(path, wf)
        except WeightsError as e:
            if required:
                raise WeightsError(f"{wf.name}: the ImageNet weights for {network} cannot be had ({e}). "
                                   f"Bring them with `osteo weights import FILE`, or train from scratch "
                                   f"(pretrained=False)") from e
            reason = _FAILED[url] = str(e)
    warnings.warn(f"ImageNet weights {wf.name} for {network} not available ({reason}); training from scratch. "
                  f"To use them: `osteo weights download` on a machine with internet, or carry the file here and "
                  f"run `osteo weights import {wf.name}`. pretrained=False trains from scratch without this "
                  f"warning.", UserWarning, stacklevel=3)
    return None


def status() -> list[dict]:
    """One row per network: its file, whether it is in the cache and verified, and the sha256."""
    rows = []
    for net, wf in WEIGHTS.items():
        path = cache_dir() / wf.name
        row = {"network": net, "file": wf.name, "state": "missing", "sha256": ""}
        if path.is_file():
            digest = sha256_file(path)
            row["sha256"] = digest
            row["state"] = "verified" if digest.startswith(wf.sha256_prefix) else "HASH MISMATCH"
        rows.append(row)
    return rows


def import_file(src) -> Path:
    """Copy a checkpoint carried to this machine into the cache, after verifying it; returns its place.

    The file is recognised by its sha256 (renaming it does no harm). A file whose name is a known
    checkpoint's but whose hash is not that checkpoint's, or whose hash matches no known checkpoint,
    is refused with WeightsError naming it and the hashes; nothing is written to the cache then. The
    copy goes to a temporary file first and is renamed into place.
    """
    src = Path(src)
    if src.is_dir():
        raise WeightsError(f"{src}: is a folder; name the checkpoint files in it")
    if not src.is_file():
        raise WeightsError(f"{src}: no such file")
    try:
        digest = sha256_file(src)
    except OSError as e:
        raise WeightsError(f"{src}: cannot read it ({e.strerror or e})") from e
    wf = _identify(digest)
    if wf is None:
        named = next((w for w in WEIGHTS.values() if w.name == src.name), None)
        if named is not None:
            raise WeightsError(f"{src}: sha256 {digest} does not match the published hash "
                               f"{named.sha256_prefix}... of {named.name}; not imported")
        known = ", ".join(dict.fromkeys(w.name for w in WEIGHTS.values()))
        raise WeightsError(f"{src}: sha256 {digest} matches none of the published ImageNet weights ({known}); "
                           f"not imported")
    dest = cache_dir() / wf.name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = AtomicFile(dest, "wb", suffix=".part")
    except OSError as e:
        raise WeightsError(f"{src}: cannot write to {dest.parent} ({e.strerror or e}); not imported") from e
    try:
        with open(src, "rb") as f:
            shutil.copyfileobj(f, part.file, 1 << 20)
        part.file.flush()
        if sha256_file(part.tmp) != digest:  # the copy itself went wrong (a changing source)
            raise WeightsError(f"{src}: the copy to {dest} differs from the file; not imported")
        part.commit()
    except OSError as e:
        part.discard()
        raise WeightsError(f"{src}: cannot copy it to {dest} ({e.strerror or e}); not imported") from e
    except BaseException:
        part.discard()
        raise
    return dest
