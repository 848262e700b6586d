"""torch.compile's work kept on disk, so that a second run of the same shape does not compile again.

A compiled engine (``TrainConfig.engine="grouped+compile"``, ``"...+graphs"``) spends its first
step compiling: 60-90 s per batch shape on an H100, minutes on a laptop CPU. torch keeps compiled
kernels in a temporary per-user folder, which a fresh machine, container or cluster node does not
have. So after the first compiled step of a run the kit saves torch's cache artifacts
(``torch.compiler.save_cache_artifacts``) to one file per configuration, and a later run with the
same file loads them (``torch.compiler.load_cache_artifacts``) before it compiles. On a GPU the
file carries the compiled Triton kernels; on the CPU it carries the generated code but not the
compiled C++ kernels, which torch keeps in its own cache folder. So the kit also moves torch's
folder (``TORCHINDUCTOR_CACHE_DIR``, unless already set) into its own, where it survives reboots and
can be shared by machines of one kind. Compiled CPU code uses the instruction set of the machine
that compiled it, and torch's own cache does not tell machines apart, so both the artifacts file
and torch's folder are kept per kind of machine (:func:`machine_kind`: the CPU's instruction-set
flags, torch's kernel level, the GPU's name); a folder shared by a mixed cluster then holds one
set per kind, and no machine loads code built for another.

Folder: ``OSTEO_COMPILE_CACHE`` when set (point array jobs at a shared folder), else
``$XDG_CACHE_HOME/osteo-kit/compile`` (``~/.cache/osteo-kit/compile``); torch's own cache goes to
its ``torch/<machine kind>`` subfolder. The file name holds what the
compiled graph depends on: torch version, device, network, views, batch and image size, engine,
precision and the loss weights baked into the graph. A stale or foreign file only costs a compile:
torch checks each artifact's own key before using it. Measured by ``benchmarks/compile_cache.py``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

from .atomic import atomic_write

__all__ = ["cache_dir", "cache_file", "load", "machine_kind", "save", "use_kit_folder_for_torch"]

#: The config fields a compiled training step depends on (the others, like the seed, the learning
#: rate or the epoch count, change numbers the graph reads, not the graph).
GRAPH_FIELDS = ("model", "inputs", "batch_size", "image_size", "num_classes", "lam", "acm_weight",
                "learn_alpha", "engine", "amp", "window_bits")


def cache_dir() -> Path:
    """Where compiled work is kept: ``OSTEO_COMPILE_CACHE``, else the user's cache folder."""
    if os.environ.get("OSTEO_COMPILE_CACHE"):
        return Path(os.environ["OSTEO_COMPILE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "osteo-kit" / "compile"


@functools.lru_cache(maxsize=None)
def machine_kind() -> str:
    """What compiled code depends on beyond the program: the CPU architecture and instruction-set
    flags (from /proc/cpuinfo where there is one), torch's CPU kernel level (``ATEN_CPU_CAPABILITY``),
    and the name of every visible GPU; a short readable prefix and a hash."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    level = torch.backends.cpu.get_cpu_capability()
    parts = [platform.machine(), level, " ".join(sorted(flags.split(":")[-1].split())) or platform.processor(), *gpus]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
    return f"{platform.machine() or 'cpu'}-{level}-{digest}".lower()


def use_kit_folder_for_torch() -> None:
    """Point torch's compile cache into :func:`cache_dir` (``torch`` subfolder), unless the user chose
    a folder with ``TORCHINDUCTOR_CACHE_DIR``. torch reads the variable at every use, and writes its
    temporary default into it on first use (importing torchvision does), so the default is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((cache_dir() / "torch" / machine_kind()).resolve())


def cache_file(config: dict, device: torch.device) -> Path:
    """The artifacts file of a training step of ``config`` (a ``TrainConfig.to_dict()``) on ``device``."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = {k: config.get(k) for k in GRAPH_FIELDS}
    key = hashlib.sha256(json.dumps([torch.__version__, where, machine_kind(), what], sort_keys=True,
                                    default=str).encode()).hexdigest()
    return cache_dir() / f"{config.get('model')}-{config.get('image_size')}px-b{config.get('batch_size')}-{key[:16]}.bin"


def load(path: Path) -> bool:
    """Load saved artifacts into torch's compile caches; False when there are none (a warning, not
    an error, when the file cannot be used: the run then compiles as without it)."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return False
    except OSError as e:
        warnings.warn(f"{path}: compile cache not readable ({e.strerror}); compiling afresh", stacklevel=2)
        return False
    log = logging.getLogger("torch.compiler._cache")  # torch logs a traceback for bytes it cannot read
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        info = torch.compiler.load_cache_artifacts(blob)
    except Exception:  # torch's format for these bytes is its own: any failure means "compile"
        info = None
    finally:
        log.setLevel(level)
    if info is None:
        warnings.warn(f"{path}: not a compile cache this torch can use; compiling afresh", stacklevel=2)
        return False
    return True


def save(path: Path) -> bool:
    """Save what this process compiled so far to ``path`` (whole or not at all); False when torch had
    nothing to save or the folder is not writable (a warning: the next run compiles again)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as fh:
            fh.write(artifacts[0])
    except OSError as e:
        warnings.warn(f"{path}: compile cache not writable ({e.strerror or e}); the next run compiles again "
                      f"(set OSTEO_COMPILE_CACHE to a writable folder)", stacklevel=2)
        return False
    return True
