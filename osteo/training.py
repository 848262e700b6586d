"""Training and evaluation of the twin network and the single-input baselines (paper IV.1).

One :class:`TrainConfig` holds every setting of design section 3 and is saved with every result.
:func:`train` runs on CUDA when there is one (bf16 autocast, channels-last, data windowed on the
GPU) and on the CPU otherwise, with the same code. Each epoch ends with a checkpoint, so an
interrupted run resumes where it stopped and ends with the same weights as an uninterrupted one.

Decisions where the paper is silent (design section 3): the learning rate follows a cosine annealing
per epoch over the whole run; the reported numbers are those of the model after the last epoch (no
model selection on the test set); no augmentation by default.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from . import compile_cache, distributed
from .atomic import atomic_write, write_text_atomic
from .data import SliceData, SliceSet
from .losses import model_loss
from .manifest import LABELS
from .metrics import classification_report
from .models import DEFAULT_MODEL, MODELS, ModelOutput, check_init, model_spec
from .privacy import is_pseudonym, is_synthetic_id, pseudonymize
from .windowing import to_network_input

CHECKPOINT_FORMAT = "osteo-kit/1"


#: The pitfall switches (all off by default): how the data are split, which epoch's test result is
#: reported, and whether the windows are quantised to 8 bits as a PNG export would.
SPLIT_MODES = ("patient", "slice")
REPORT_EPOCHS = ("last", "best_on_test")
WINDOW_BITS = (None, 8)
#: Fields added after the first release, and their defaults (left out of ``to_dict`` when at them).
ADDED_FIELDS = {"init": "independent", "split": "patient", "report_epoch": "last", "window_bits": None}


@dataclass
class TrainConfig:
    """Every setting of one training run (paper IV.1 and design section 3).

    ``model`` is a name of the model registry (:data:`osteo.models.MODELS`): the twin (the proposed
    network, Eq. 2; the default) or a single network of :func:`osteo.build_model`.
    ``inputs`` names the view each branch reads: ``("s", "t")`` for the twin (Table 3 also uses
    ``("s", "s")`` and ``("t", "t")``), one view for a single network. ``lam`` is lambda of Eq. (5)
    (0 gives "Ours - L_dis"); ``alpha`` is the initial (or fixed, with ``learn_alpha=False``) fusion
    weight of Eq. (2); ``acm_weight`` weights ACM's own orthogonality term, which Eq. (5) does not
    mention. ``pretrained`` is True, False or "auto" (ImageNet weights if already downloaded).
    ``engine`` says how steps run, not what they compute (:class:`Engine`: "auto", "eager",
    "grouped", "compile", "grouped+compile", ..."+graphs").

    ``init`` (twin only) is how G_s and G_t start: "independent", "shared" (the same random
    weights) or "imagenet" (the paper's; needs the weights), see :class:`osteo.TwinNet`. Three
    switches reproduce protocol choices that inflate accuracy, all off by default and recorded
    in results when on: ``split="slice"`` (the data split by slice, so one patient's slices are in
    train and test; the data must be loaded with ``load_data(..., split="slice")``),
    ``report_epoch="best_on_test"`` (the test set is evaluated after every epoch and the best epoch
    is reported: model selection on the test set) and ``window_bits=8`` (Eq. 1 rounded to 256 grey
    levels, as in an 8-bit PNG export).
    """

    model: str = DEFAULT_MODEL
    inputs: tuple = ("s", "t")
    lam: float = 0.1
    alpha: float = 0.5
    learn_alpha: bool = True
    acm_weight: float = 0.1
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    image_size: int = 224
    pretrained: object = "auto"
    augment: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_classes: int = 3
    engine: str = "auto"
    init: str = "independent"
    split: str = "patient"
    report_epoch: str = "last"
    window_bits: int | None = None

    def __post_init__(self):
        self.inputs = tuple(self.inputs)
        for v in self.inputs:
            if v not in ("s", "t"):
                raise ValueError(f"TrainConfig.inputs: unknown view {v!r}; use 's' (HU_min -128) or 't' (HU_min -450)")
        spec = MODELS.get(self.model)
        want = spec.n_inputs if spec is not None else 1
        if len(self.inputs) != want:
            raise ValueError(f"TrainConfig: model {self.model!r} reads {want} input(s), got inputs={self.inputs}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"TrainConfig.batch_size must be an integer >= 2 (batch norm needs 2 slices per batch), got {self.batch_size!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"TrainConfig.epochs must be an integer >= 1, got {self.epochs!r}")
        if self.pretrained not in (True, False, "auto"):
            raise ValueError(f"TrainConfig.pretrained must be True, False or 'auto', got {self.pretrained!r}")
        Engine.parse(self.engine, torch.device("cuda"))  # spelling only; the device is checked by train()
        check_init(self.init, self.pretrained)
        if self.init != "independent" and (spec is None or "init" not in spec.options):
            raise ValueError(f"TrainConfig.init {self.init!r} is for the twin (networks of several backbones); "
                             f"{self.model!r} has one backbone (use pretrained for its ImageNet weights)")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"TrainConfig.split must be 'patient' or 'slice', got {self.split!r}")
        if self.report_epoch not in REPORT_EPOCHS:
            raise ValueError(f"TrainConfig.report_epoch must be 'last' or 'best_on_test', got {self.report_epoch!r}")
        if self.window_bits not in WINDOW_BITS:
            raise ValueError(f"TrainConfig.window_bits must be None (float windows) or 8, got {self.window_bits!r}")
        if self.window_bits is not None:
            self.window_bits = int(self.window_bits)  # 8.0 from a JSON file: the same config, the same key
        if self.augment:
            raise NotImplementedError("augmentation is not implemented (the paper names none); use augment=False")

    def to_dict(self) -> dict:
        """The config as JSON-ready values. Fields added after the first release (:data:`ADDED_FIELDS`)
        appear only when not at their default, so the results and run folders (:meth:`key`) made
        before them keep their keys, and a result says when one of them was changed."""
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        for k, default in ADDED_FIELDS.items():
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def key(self, data_id: str = "") -> str:
        """A short hash of the config (and of the data it trains on): the name of its run folder."""
        blob = json.dumps({"config": self.to_dict(), "data": data_id}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """What a run produced: its config, per-epoch history and test metrics for each head.

    ``history`` has one record per epoch: learning rate, training accuracy, the mean of each loss
    term over the epoch's batches (for the twin, ``loss_dis`` is the mean cos(g_s, g_t) of the
    training batches, Eq. 4, also when lambda is 0) and alpha; the first record of a twin also has
    ``cos_start``, cos(g_s, g_t) on the first batch before any update; with
    ``report_epoch="best_on_test"`` every record has ``test_acc``, the test accuracy after that epoch.
    """

    config: dict
    history: list
    test: dict
    main_head: str
    y_true: list
    predictions: dict
    alpha: float | None
    pretrained_used: bool
    device: str
    seconds: float
    data: str = ""
    versions: dict = field(default_factory=dict)
    engine: str = ""
    synthetic_version: str = ""  # the synthetic generator's version ("" for real data or a result made before versions)
    test_patient_id: list = field(default_factory=list)  # pseudonymised patient of each test slice (as y_true)
    imagenet_weights: dict | None = None  # {"file", "sha256"} of the ImageNet checkpoint loaded, else None
    reported_epoch: int | None = None  # the epoch whose model gave ``test`` (the last, unless best_on_test)

    @property
    def accuracy(self) -> float:
        return self.test[self.main_head]["accuracy"]

    @property
    def accuracy_ci95(self) -> list:
        """95 % interval of the accuracy: over patients when the test slices' patients are known."""
        return self.test[self.main_head]["accuracy_ci95"]

    def to_json(self, path) -> None:
        """Write the result atomically (a unique temporary file, then a rename)."""
        write_text_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path) -> "TrainResult":
        """Read a saved result; a file that is not one (damaged, hand-edited, another program's) is
        a :class:`CheckpointError` naming it."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            return cls(**data)
        except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: not a result file of osteo-kit ({why}); the run folder is damaged: "
                                  "remove the file to train the run again") from None


class CheckpointError(ValueError):
    """A checkpoint that is not ours, is damaged, or was made with another config."""


class TrainingInterrupted(RuntimeError):
    """Raised by ``train(..., stop_after_steps=N)``: simulates a run killed mid-epoch."""


def epoch_batches(n: int, batch_size: int, smallest: int = 2) -> list[tuple[int, int]]:
    """(start, end) of each batch of an epoch of ``n`` shuffled slices.

    Batches hold ``batch_size`` slices, the last one what is left, except that a last batch of ONE
    slice is folded into the one before (which then holds ``batch_size + 1``): batch norm cannot
    train on a single slice, and this keeps every slice in every epoch, deterministically. So 9
    slices in batches of 8 give one batch of 9; 17 give 8 + 9; 18 give 8 + 8 + 2. A run shared by
    P processes passes ``smallest=max(2, P)``, so that every process gets a slice of every batch.
    """
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < smallest:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class DeviceError(RuntimeError):
    """A device name torch does not know, or a CUDA device on a machine without one."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r}: not a device name; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='auto' or 'cpu'")
    return dev


def make_model(cfg: TrainConfig) -> torch.nn.Module:
    """Build the network a config names (the seed must be set before, for identical weights)."""
    return model_spec(cfg.model).build(cfg)


def network_inputs(cfg: TrainConfig, hu: torch.Tensor) -> list:
    """Window a HU batch into the config's views (one tensor per branch), channels-last on CUDA."""
    views = {v: to_network_input(hu, v, bits=cfg.window_bits) for v in set(cfg.inputs)}
    if hu.is_cuda:
        views = {v: x.contiguous(memory_format=torch.channels_last) for v, x in views.items()}
    return [views[v] for v in cfg.inputs]


def forward_heads(model, cfg: TrainConfig, hu: torch.Tensor, grouped: bool = False):
    """Window a HU batch into the config's views and run the network: its output
    (:class:`osteo.models.ModelOutput`; the twin's is a :class:`osteo.models.TwinOutput`).

    ``grouped`` uses the network's batched engine when it has one (the twin's, :mod:`osteo.grouped`).
    """
    return model_spec(cfg.model).run(model, network_inputs(cfg, hu), grouped)


def loss_terms(cfg: TrainConfig, out, y: torch.Tensor, acm: torch.Tensor | None = None) -> dict:
    """All loss terms of one batch with the config's weights (:func:`osteo.losses.model_loss`):
    Eq. (5) for the twin, cross-entropy for a single network, plus ``acm_weight * |ACM term|``.

    ``acm`` replaces the output's own ACM term when given; ``out`` may also be plain logits (B, K).
    """
    if isinstance(out, torch.Tensor):
        out = ModelOutput({"main": out}, {}, {})
    if acm is not None:
        out = ModelOutput(out.logits, out.features, {**out.aux, "acm": acm}, out.main)
    return model_loss(out, y, lam=cfg.lam, acm_weight=cfg.acm_weight)


def forward_loss(model, cfg: TrainConfig, hu: torch.Tensor, y: torch.Tensor, grouped: bool = False):
    """Window, forward and every loss term: the unit that :class:`Engine` compiles. Returns (output, terms)."""
    out = forward_heads(model, cfg, hu, grouped)
    return out, loss_terms(cfg, out, y, out.aux.get("acm"))


def train_step(model, cfg: TrainConfig, opt, hu: torch.Tensor, y: torch.Tensor, amp: bool):
    """One plain (eager, separate branches) optimisation step on a HU batch; returns (output, loss terms).

    The reference the fast engines are tested against; :func:`train` runs a :class:`StepRunner`.
    """
    with torch.autocast(hu.device.type, dtype=torch.bfloat16, enabled=amp):
        out, terms = forward_loss(model, cfg, hu, y)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt.step()
    return out, terms


ENGINE_FLAGS = ("grouped", "compile", "graphs")


@dataclass(frozen=True)
class Engine:
    """How a training step is executed; never what it computes (tests hold every engine to the eager one).

    Written as a string in ``TrainConfig.engine``: ``"eager"`` (plain PyTorch, the two backbones one
    after the other), or ``+``-joined flags: ``grouped`` (the twin's backbones as one batched
    network, :mod:`osteo.grouped`), ``compile`` (``torch.compile`` of window + forward + loss),
    ``graphs`` (compile with CUDA graphs, ``mode="reduce-overhead"``; CUDA only, implies compile).
    ``"auto"``: ``eager`` on the CPU, where we measured the grouped network ~10 % slower and
    compilation costs more than a short run saves; ``grouped`` on CUDA. Measured on one H100
    (results/bench/, 224 px, batch 128): eager 1,390 images/s, grouped 2,010, grouped+compile
    3,280, grouped+graphs 3,380; but compiling took 60-90 s per batch shape there, about what it
    saves on a 60-epoch paper run of 3600 slices (about 110 s grouped; a run now compiles one
    shape, see :class:`StepRunner`). Ask for ``grouped+compile`` or ``grouped+graphs`` for longer runs.
    """

    grouped: bool = False
    compile: bool = False
    graphs: bool = False

    @classmethod
    def parse(cls, text: str, device: torch.device) -> "Engine":
        if text == "auto":
            return cls(grouped=True) if device.type == "cuda" else cls()
        flags = set() if text == "eager" else set(text.split("+"))
        unknown = flags - set(ENGINE_FLAGS)
        if unknown or not flags and text != "eager":
            raise ValueError(f"TrainConfig.engine {text!r}: use 'auto', 'eager' or '+'-joined flags of {ENGINE_FLAGS}")
        if "graphs" in flags and device.type != "cuda":
            raise ValueError(f"TrainConfig.engine {text!r}: CUDA graphs need a CUDA device, this run is on {device.type}")
        return cls("grouped" in flags, "compile" in flags or "graphs" in flags, "graphs" in flags)

    def __str__(self) -> str:
        flags = [f for f in ENGINE_FLAGS if getattr(self, f) and not (f == "compile" and self.graphs)]
        return "+".join(flags) or "eager"

    def runner(self, model, cfg: TrainConfig, opt, amp: bool) -> "StepRunner":
        return StepRunner(self, model, cfg, opt, amp)


class StepRunner:
    """Runs optimisation steps of one model with an :class:`Engine`; ``runner(hu, y) -> (output, terms)``.

    With ``compile``, window + forward + loss of a FULL batch (``cfg.batch_size`` slices) is one
    ``torch.compile``d function with static shapes; any other batch (the last of an epoch: 3600
    slices in batches of 128 leave 16; or ``batch_size + 1``, see :func:`epoch_batches`) runs the same function eagerly on the same weights, so a run
    compiles one shape only (each shape took 60-90 s on the H100). Backward and the optimiser stay
    eager. With ``graphs``, each compiled step starts a new CUDA-graph step, and outputs are read
    before the next. The compiled work is saved after the first compiled step and loaded by the
    next run of the same configuration (:mod:`osteo.compile_cache`), which then skips compiling.
    """

    def __init__(self, engine: Engine, model, cfg: TrainConfig, opt, amp: bool):
        self.engine, self.model, self.cfg, self.opt, self.amp = engine, model, cfg, opt, amp
        self.plain = functools.partial(forward_loss, model, cfg, grouped=engine.grouped)
        self.compiled = self.cache_file = None
        if engine.compile:
            mode = "reduce-overhead" if engine.graphs else None
            compile_cache.use_kit_folder_for_torch()
            self.compiled = torch.compile(self.plain, mode=mode, dynamic=False)
            self.cache_file = compile_cache.cache_file(cfg.to_dict(), next(model.parameters()).device)
            self.cache_loaded = compile_cache.load(self.cache_file)

    def __call__(self, hu: torch.Tensor, y: torch.Tensor):
        fn = self.plain
        if self.compiled is not None and hu.shape[0] == self.cfg.batch_size:
            fn = self.compiled
            if self.engine.graphs:
                torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(hu.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out, terms = fn(hu, y)
        self.opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.opt.step()
        if fn is self.compiled and self.cache_file is not None:  # forward and backward compiled: keep them
            compile_cache.save(self.cache_file)
            self.cache_file = None
        return out, terms


def head_logits(cfg: TrainConfig, out) -> dict:
    """Logits of each head of a network's output, the prediction head first (twin: f, s, t; single: main)."""
    if isinstance(out, torch.Tensor):
        return {"main": out}
    logits = out.logits
    return {out.main: logits[out.main], **{h: v for h, v in logits.items() if h != out.main}}


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, data: SliceSet, device=None, batch_size: int | None = None,
             grouped: bool = False) -> tuple[dict, dict]:
    """Predict every test slice; returns (metrics per head, predicted class per head).

    ``grouped`` uses the network's batched engine when it has one (:mod:`osteo.grouped`), same function.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds: dict[str, list] = {}
    bs = batch_size or max(cfg.batch_size, 256)
    amp = cfg.amp and device.type == "cuda"
    try:
        for i in range(0, len(data), bs):
            hu = data.hu[i : i + bs].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = forward_heads(model, cfg, hu, grouped=grouped)
            for head, logits in head_logits(cfg, out).items():
                preds.setdefault(head, []).append(logits.argmax(1))
    finally:
        model.train(was_training)
    preds = {h: torch.cat(p).cpu().numpy() for h, p in preds.items()}
    y = data.y.cpu().numpy()
    groups = list(data.patient_id) if len(data.patient_id) == len(y) else None  # patient-level intervals
    metrics = {h: classification_report(y, p, cfg.num_classes, LABELS, groups=groups) for h, p in preds.items()}
    return metrics, {h: p.tolist() for h, p in preds.items()}


def _pseudonymous(patient_id, synthetic: bool = False) -> str:
    """A patient id fit for a result file: pseudonyms as they are, ``SYN`` ids as they are only in
    data the synthetic generator made (``synthetic``: its manifest names the generator's version),
    anything else pseudonymised (a hospital id may start with SYN)."""
    pid = str(patient_id)
    return pid if (synthetic and is_synthetic_id(pid)) or is_pseudonym(pid) else pseudonymize(pid)


def _made_by_generator(data: SliceData) -> bool:
    """True for data whose manifest names a version of the synthetic generator ("synthetic-N")."""
    parts = str(getattr(data, "synthetic_version", "") or "").split("+")
    return all(re.fullmatch(r"synthetic-\d+", v) for v in parts)


def _versions() -> dict:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def save_checkpoint(path, state: dict) -> None:
    """Save atomically: write a temporary file, then rename (a kill never leaves half a checkpoint)."""
    with atomic_write(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load an osteo checkpoint with ``weights_only=True`` (tensors and plain data only: nothing in
    the file is ever run); refuse anything else with a :class:`CheckpointError` naming the file.

    Checked here: the file is a PyTorch archive holding a dict in our format with ``config`` (a
    mapping), ``model`` (a mapping of tensors) and ``epoch`` (an integer). :func:`load_model`
    checks the rest before it builds a network.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file (a run folder holds checkpoint.pt)")
    try:
        with warnings.catch_warnings():  # torch's notes about pickle protocols in foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, foreign objects refused by weights_only
        raise CheckpointError(f"{path}: {_load_problem(path, e)}") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if isinstance(fmt, str) and fmt != CHECKPOINT_FORMAT and fmt.startswith(CHECKPOINT_FORMAT.split("/")[0] + "/"):
        raise CheckpointError(f"{path}: an osteo checkpoint of format {fmt!r}, which this version of osteo-kit "
                              f"cannot read (it reads {CHECKPOINT_FORMAT!r}); use the osteo-kit version that wrote it")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an osteo checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    for k in ("config", "model", "epoch"):
        if k not in state:
            raise CheckpointError(f"{path}: osteo checkpoint lacks {k!r}; it is damaged")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: the stored config is a {type(state['config']).__name__}, not a mapping; "
                              "the checkpoint is damaged")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{path}: the stored weights are not a mapping of tensors; the checkpoint is damaged")
    if isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise CheckpointError(f"{path}: the stored epoch {state['epoch']!r} is not a count; the checkpoint is damaged")
    return state


def _load_problem(path: Path, e: Exception) -> str:
    """Why torch.load failed, in our words: torch's own text is never passed on (it advises
    re-running ``torch.load`` with ``weights_only=False``, which would run code from the file)."""
    text = str(e)
    with open(path, "rb") as fh:
        head = fh.read(4)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m or (("Weights only load failed" in text or "WeightsUnpickler" in text) and head[:1] in (b"\x80", b"P")):
        what = f"a pickled Python object ({m.group(1)})" if m else "pickled Python code or objects"
        return (f"not a loadable osteo checkpoint: it holds {what}, not only tensors and plain data; "
                "refused without running anything from it")
    if head.startswith(b"PK"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "not a loadable osteo checkpoint: damaged or truncated (its zip archive cannot be read)"
        if not any(n.endswith("data.pkl") for n in names):
            return "not a loadable osteo checkpoint: a zip archive, but not a PyTorch checkpoint (no data.pkl in it)"
        return "not a loadable osteo checkpoint: damaged or truncated (its zip archive cannot be read)"
    return "not a loadable osteo checkpoint: not a PyTorch checkpoint file"


def _config_problem(cfg: dict) -> str | None:
    """What is wrong with a stored config mapping (None if nothing): unknown or ill-typed fields."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    bad_keys = [k for k in cfg if not isinstance(k, str)]
    unknown = sorted(str(k) for k in cfg if k not in fields)
    if bad_keys or unknown:
        return f"the stored config has unknown field(s) {', '.join(unknown)}; not made by this version of osteo-kit, or damaged"
    lacking = [n for n in fields if n not in cfg and n not in ADDED_FIELDS]  # never filled in with defaults
    if lacking:
        return f"the stored config lacks field(s) {', '.join(lacking)}; the checkpoint is damaged"
    for name, value in cfg.items():
        default = fields[name].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif isinstance(default, str) and name != "pretrained":
            ok = isinstance(value, str)
        elif isinstance(default, tuple):
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        else:
            ok = True
        if not ok:
            return f"the stored config field {name!r} is {value!r}, not {_article(type(default).__name__)}; the checkpoint is damaged"
    return None


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


#: The input sizes a stored config may name (a slice is resized to image_size x image_size).
_MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE = 16, 4096


def checkpoint_config(state: dict, path) -> TrainConfig:
    """The TrainConfig of a loaded checkpoint, after every check a prediction relies on: known
    fields of the right types, a known model, the 3 classes of :data:`osteo.LABELS`, an epoch
    within the run. Every failure is a :class:`CheckpointError` naming ``path``. The config
    returned builds the bare architecture (``pretrained=False``, ``init="independent"``): the
    checkpoint holds every weight, so no ImageNet file is needed to load it."""
    cfg = state["config"]
    problem = _config_problem(cfg)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    model = cfg.get("model", TrainConfig.model)
    if not isinstance(model, str) or model not in MODELS:
        raise CheckpointError(f"{path}: the stored config names an unknown model {model!r} "
                              f"(known: {', '.join(MODELS)}); not an osteo-kit model")
    k = cfg.get("num_classes", TrainConfig.num_classes)
    if k != len(LABELS):
        raise CheckpointError(f"{path}: trained for {k} classes; osteo predicts {len(LABELS)} "
                              f"({', '.join(LABELS)}): not a checkpoint for this task")
    size = cfg["image_size"]
    if not _MIN_IMAGE_SIZE <= size <= _MAX_IMAGE_SIZE:
        raise CheckpointError(f"{path}: the stored image_size {size} is not an input size osteo uses "
                              f"({_MIN_IMAGE_SIZE} to {_MAX_IMAGE_SIZE} pixels); the checkpoint is damaged")
    try:
        config = TrainConfig.from_dict({**cfg, "pretrained": False, "init": "independent"})
        TrainConfig.from_dict(cfg)  # the stored values themselves, as load_model returns them
    except (ValueError, TypeError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: the stored config is invalid ({str(e).replace('TrainConfig.', '').replace('TrainConfig: ', '')})") from None
    if state["epoch"] > config.epochs:
        raise CheckpointError(f"{path}: the stored epoch {state['epoch']} exceeds the run's {config.epochs} epochs; "
                              "the checkpoint is damaged")
    return config


def load_model(path, device="cpu", allow_unfinished: bool = False) -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild the trained network of a checkpoint (for prediction and Grad-CAM).

    The checkpoint is checked before use (:func:`load_checkpoint`, :func:`checkpoint_config`; the
    weights must fit the network and be finite). The checkpoint of an unfinished run (saved after
    epoch e < epochs: the run was stopped) is refused unless ``allow_unfinished=True``; then it
    loads with a warning (:class:`UnfinishedRunWarning`). Every failure is a :class:`CheckpointError`.
    """
    state = load_checkpoint(path)
    cfg = checkpoint_config(state, path)
    epoch = state["epoch"]
    if epoch < cfg.epochs:
        note = f"{path}: unfinished training run (saved after epoch {epoch} of {cfg.epochs})"
        if not allow_unfinished:
            raise CheckpointError(f"{note}; finish it by running the same training again (it resumes), "
                                  "or allow unfinished checkpoints (osteo predict --allow-unfinished) to use it as it is")
        warnings.warn(f"{note}: its predictions are those of a partly trained network", UnfinishedRunWarning, stacklevel=2)
    try:
        model = make_model(cfg)
    except ValueError as e:  # the network's own checks of the stored options (input size, ...)
        raise CheckpointError(f"{path}: the stored config cannot build a {cfg.model} network "
                              f"({str(e).removeprefix('osteo/models.py: ')})") from None
    misfit = _weights_misfit(model.state_dict(), state["model"])
    if misfit:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.model} network with {cfg.num_classes} classes ({misfit})")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.model} network ({str(e).splitlines()[0][:300]})") from None
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: the weights hold NaN or infinite values ({bad[0]}{' and more' if len(bad) > 1 else ''})")
    bad = [k for k, v in state["model"].items() if k.endswith("running_var") and bool((v < 0).any())]
    if bad:
        raise CheckpointError(f"{path}: the batch-norm statistics hold negative variances ({bad[0]}"
                              f"{' and more' if len(bad) > 1 else ''}); the checkpoint is damaged")
    if "alpha" in state["model"] and not cfg.learn_alpha and float(state["model"]["alpha"]) != float(torch.tensor(cfg.alpha, dtype=state["model"]["alpha"].dtype)):
        raise CheckpointError(f"{path}: the fixed alpha in the weights ({float(state['model']['alpha']):g}) differs from "
                              f"the stored config's alpha ({cfg.alpha:g}); the checkpoint is damaged")
    cfg = TrainConfig.from_dict(state["config"])
    return model.to(device).eval(), cfg


def _weights_misfit(expected: dict, stored: dict) -> str | None:
    """What keeps ``stored`` weights from loading into a network whose own are ``expected`` (None if
    nothing): the first tensor of another shape, then missing and unexpected names."""
    for k, v in expected.items():
        if k in stored and tuple(stored[k].shape) != tuple(v.shape):
            return f"{k} has shape {list(stored[k].shape)}, the network needs {list(v.shape)}"
    for k, v in expected.items():  # load_state_dict would cast silently: int or half weights are not ours
        if k in stored and stored[k].dtype != v.dtype:
            return f"{k} is stored as {str(stored[k].dtype).removeprefix('torch.')}, the network needs {str(v.dtype).removeprefix('torch.')}"
    missing = [k for k in expected if k not in stored]
    extra = [k for k in stored if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    return "; ".join(parts) or None


class UnfinishedRunWarning(UserWarning):
    """A checkpoint of a run stopped before its last epoch was loaded (``allow_unfinished=True``)."""


def _rng_state(device) -> dict:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device) -> None:
    torch.set_rng_state(s["cpu"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _check_data_split(cfg: TrainConfig, data: SliceData) -> None:
    """The data must be split as ``cfg.split`` says: by patient (no patient in train and test) or by slice."""
    made = getattr(data, "split", "patient")
    if made != cfg.split:
        raise ValueError(f"{data.source or 'data'}: split by {made}, but TrainConfig.split is {cfg.split!r}; "
                         f"load the data with load_data(..., split={cfg.split!r})")
    if cfg.split == "patient":
        shared = sorted(set(data.train.patient_id) & set(data.test.patient_id))
        if shared:
            raise ValueError(f"{data.source or 'data'}: patient {shared[0]} is in both train and test "
                             f"({len(shared)} patients); a patient-level split keeps each patient on one side")


@dataclass
class _Run:
    """One training run in progress: the network, its optimiser and what a checkpoint carries."""

    cfg: TrainConfig
    device: torch.device
    model: torch.nn.Module
    engine: Engine
    opt: torch.optim.Optimizer
    sched: object
    pretrained_used: bool
    imagenet_weights: dict | None
    history: list = field(default_factory=list)
    start_epoch: int = 0
    seconds: float = 0.0
    best: dict | None = None  # report_epoch="best_on_test": {"epoch", "test", "predictions"} of the best epoch so far
    steps_done: int = 0
    world: distributed.World | None = None  # under torchrun: this process's place in the run

    @property
    def main(self) -> bool:
        """The process that prints and writes files (the only one, outside torchrun)."""
        return self.world is None or self.world.main

    def batches(self, n: int) -> list[tuple[int, int]]:
        """The epoch's batches of ``n`` slices (:func:`epoch_batches`), as every process cuts them."""
        return epoch_batches(n, self.cfg.batch_size, smallest=max(2, self.world.size) if self.world else 2)

    @property
    def spec(self):
        return model_spec(self.cfg.model)


def cached_result(cfg: TrainConfig, out_dir) -> TrainResult | None:
    """The saved result of ``cfg`` in the run folder ``out_dir`` (the run cache), or None."""
    path = Path(out_dir) / "result.json"
    if path.exists():
        res = TrainResult.from_json(path)
        if res.config == cfg.to_dict():
            return res
    return None


def _start_run(cfg: TrainConfig, device: torch.device) -> _Run:
    """The freshly initialised network (seeded), its engine, optimiser and learning-rate schedule."""
    torch.manual_seed(cfg.seed)
    model = make_model(cfg)
    pretrained_used = bool(getattr(model, "pretrained_used", False))
    imagenet_weights = getattr(model, "imagenet_weights", None)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    engine = Engine.parse(cfg.engine, device)
    # fused: one kernel for all of Adam's arithmetic on CUDA (the same update as the default foreach)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return _Run(cfg, device, model, engine, opt, sched, pretrained_used, imagenet_weights)


def resume_run(run: _Run, ckpt_path: Path) -> None:
    """Continue ``run`` from its checkpoint: weights, history, time, and (if unfinished) optimiser,
    schedule and random state, so it ends with the same weights as an uninterrupted run."""
    cfg = run.cfg
    state = load_checkpoint(ckpt_path)
    if state["config"] != cfg.to_dict():
        raise CheckpointError(f"{ckpt_path}: made with another config; remove the folder or pick another out_dir")
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_path}: weights do not fit a {cfg.model} network "
                              f"({str(e).splitlines()[0][:300]}); remove the folder or pick another out_dir") from None
    try:  # what resuming needs besides the weights: a damaged part is named, never a traceback
        part = "history"
        run.history = json.loads(state["history"])
        if not isinstance(run.history, list):
            raise TypeError(f"a {type(run.history).__name__}, not a list")
        run.start_epoch = int(state["epoch"])
        part = "seconds"
        run.seconds = float(state.get("seconds", 0.0))
        run.pretrained_used = bool(state.get("pretrained_used", run.pretrained_used))
        run.imagenet_weights = state["imagenet_weights"] if "imagenet_weights" in state else run.imagenet_weights
        part = "best"
        run.best = json.loads(state["best"]) if state.get("best") else None
        if run.start_epoch < cfg.epochs:
            part = "optimizer"
            run.opt.load_state_dict(state["optimizer"])
            part = "scheduler"
            run.sched.load_state_dict(state["scheduler"])
            part = "rng"
            _set_rng_state(state["rng"], run.device)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        what = "missing" if part not in state else f"damaged ({type(e).__name__})"
        raise CheckpointError(f"{ckpt_path}: the saved training state '{part}' is {what}, so the run cannot resume; "
                              "remove the folder or pick another out_dir") from None


def save_run(run: _Run, ckpt_path: Path, epoch: int) -> None:
    """The checkpoint after ``epoch``; only an unfinished run keeps what resuming needs."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": run.cfg.to_dict(),
        "epoch": epoch,
        "model": run.model.state_dict(),
        "history": json.dumps(run.history),
        "seconds": run.seconds,
        "pretrained_used": run.pretrained_used,
        "imagenet_weights": run.imagenet_weights,
        "best": json.dumps(run.best) if run.best is not None else "",
    }
    if epoch < run.cfg.epochs:  # optimiser, schedule and random state: 2/3 of the file
        state.update(optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), rng=_rng_state(run.device))
    save_checkpoint(ckpt_path, state)


def train_epoch(run: _Run, epoch: int, train_set: SliceSet, step_fn, bar, stop_after_steps=None) -> dict:
    """One epoch of optimisation steps (``epoch`` counts from 0); returns its history record.

    The record: learning rate, training accuracy of the prediction head, the mean of each loss
    term, the network's learned scalars (the twin's alpha) and, after the first epoch of a network
    with L_dis, ``cos_start`` (L_dis of the first batch, before any update).
    """
    cfg, device, n = run.cfg, run.device, len(train_set)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).to(device)
    rows, correct, names = [], torch.zeros((), device=device), None
    for lo, hi in run.batches(n):
        idx = order[lo:hi]
        if run.world is not None:  # this process's share of the global batch
            idx = idx[run.world.share(hi - lo)]
        hu, y = train_set.hu[idx], train_set.y[idx]
        out, terms = step_fn(hu, y)
        names = list(terms)
        rows.append(torch.stack([terms[k].detach().float() for k in names]))
        correct += (out.logits[out.main].argmax(1) == y).sum()
        bar.update(1)
        run.steps_done += 1
        if stop_after_steps is not None and run.steps_done >= stop_after_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after {run.steps_done} steps (stop_after_steps)")
    if run.world is not None:
        correct = run.world.sum(correct)
    return epoch_record(run, epoch, names, rows, correct, n, t0)


def epoch_record(run: _Run, epoch: int, names: list, rows: list, correct, n: int, t0: float) -> dict:
    """The end of an epoch of ``run`` (shared with :mod:`osteo.batched`): stop on a non-finite loss,
    step the schedule, add the time since ``t0`` and return the history record of :func:`train_epoch`
    from each step's loss terms ``rows`` (named ``names``) and the ``correct`` count of ``n`` slices."""
    values = torch.stack(rows).cpu().numpy()  # one host sync per epoch
    bad = ~np.isfinite(values)
    if bad.any():
        s, t = np.argwhere(bad)[0]
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {s + 1}: term {names[t]!r} = "
                                 f"{values[s, t]}; stopping (last good checkpoint: epoch {epoch})")
    run.sched.step()
    run.seconds += time.perf_counter() - t0
    rec = {"epoch": epoch + 1, "lr": run.opt.param_groups[0]["lr"], "train_acc": float(correct) / n}
    rec.update({f"loss_{k}": float(v) for k, v in zip(names, values.mean(0))})
    rec.update(run.spec.scalars(run.model))
    if epoch == 0 and "dis" in names:  # cos(g_s, g_t) on the first batch, before any update: where the cosine starts
        rec["cos_start"] = float(values[0, names.index("dis")])
    return rec


def _test_every_epoch(run: _Run, rec: dict, test: SliceSet) -> None:
    """``report_epoch="best_on_test"`` (a pitfall, on request): the test accuracy after this epoch,
    and the best epoch so far kept as the one to report (model selection on the test set)."""
    main = run.spec.main_head
    metrics, preds = evaluate(run.model, run.cfg, test, run.device, grouped=run.engine.grouped)
    rec["test_acc"] = metrics[main]["accuracy"]
    if run.best is None or rec["test_acc"] > run.best["test"][main]["accuracy"]:
        run.best = {"epoch": rec["epoch"], "test": metrics, "predictions": preds}


def _training_set(data: SliceData, device) -> SliceSet:
    train_set = data.train.to(device)
    if len(train_set) == 0:
        raise ValueError("the training split is empty")
    if len(train_set) == 1:
        raise ValueError("the training split holds 1 slice: batch norm needs at least 2 slices to train on")
    return train_set


def _final_result(run: _Run, data: SliceData) -> TrainResult:
    """Evaluate the last epoch's model (or take the best epoch's, with best_on_test) into a TrainResult."""
    cfg, device = run.cfg, run.device
    if run.best is not None:
        metrics, preds, reported_epoch = run.best["test"], run.best["predictions"], run.best["epoch"]
    else:
        metrics, preds = evaluate(run.model, cfg, data.test, device, grouped=run.engine.grouped)
        reported_epoch = cfg.epochs
    return TrainResult(
        config=cfg.to_dict(), history=run.history, test=metrics, main_head=run.spec.main_head,
        y_true=data.test.y.cpu().tolist(), predictions=preds, alpha=run.spec.scalars(run.model).get("alpha"),
        pretrained_used=run.pretrained_used,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        seconds=run.seconds, engine=str(run.engine) + (f", {run.world.size} processes" if run.world else ""),
        data=data.describe(), versions=_versions(),
        synthetic_version=getattr(data, "synthetic_version", ""),
        test_patient_id=[_pseudonymous(p, _made_by_generator(data)) for p in data.test.patient_id],
        imagenet_weights=run.imagenet_weights, reported_epoch=reported_epoch,
    )


def train(
    config: TrainConfig,
    data: SliceData,
    out_dir=None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    checkpoint_every_s: float = 30.0,
) -> TrainResult:
    """Train ``config`` on ``data`` and evaluate the last epoch's model on the test split.

    With ``out_dir``, a checkpoint is written after every epoch (``checkpoint.pt``) and the result
    (``result.json``) at the end; calling again with the same config returns the saved result, and
    an interrupted run resumes from its last checkpoint. Checkpoints are written at the end of an
    epoch once ``checkpoint_every_s`` seconds have passed since the last one (0: every epoch), and
    always after the last epoch, so fast GPU epochs do not wait on the disk. ``stop_after_steps`` stops training early
    (raising :class:`TrainingInterrupted`; tests use it to simulate a kill mid-epoch).

    Started by ``torchrun`` with several processes, the processes train this one run together
    (:mod:`osteo.distributed`); only the first writes files and shows progress.
    """
    cfg = config
    world = distributed.current_world()
    device = _process_device(cfg, world)
    ckpt_path = result_path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        ckpt_path, result_path = Path(out_dir) / "checkpoint.pt", Path(out_dir) / "result.json"
        cached = cached_result(cfg, out_dir)
        if cached is not None:
            return cached
    _check_data_split(cfg, data)
    run = _start_run(cfg, device)
    run.world = world
    if ckpt_path is not None and ckpt_path.exists():
        resume_run(run, ckpt_path)
    train_set = _training_set(data, device)
    steps = len(run.batches(len(train_set)))
    amp = cfg.amp and device.type == "cuda"
    step_fn = _distributed_step(run, amp) if world else run.engine.runner(run.model, cfg, run.opt, amp)
    bar = tqdm(total=cfg.epochs * steps, initial=run.start_epoch * steps, desc=f"train {cfg.model}",
               disable=not progress or not run.main, leave=False)
    last_save = time.perf_counter()
    run.model.train()
    for epoch in range(run.start_epoch, cfg.epochs):
        rec = train_epoch(run, epoch, train_set, step_fn, bar, stop_after_steps)
        if cfg.report_epoch == "best_on_test":
            _test_every_epoch(run, rec, data.test)
        run.history.append(rec)
        bar.set_postfix(epoch=epoch + 1, loss=f"{rec['loss_total']:.3f}", acc=f"{rec['train_acc']:.2f}")
        if ckpt_path is not None and run.main and (epoch + 1 == cfg.epochs or time.perf_counter() - last_save >= checkpoint_every_s):
            save_run(run, ckpt_path, epoch + 1)
            last_save = time.perf_counter()
    bar.close()
    result = _final_result(run, data)
    if result_path is not None and run.main:
        result.to_json(result_path)
    return result


def _process_device(cfg: TrainConfig, world) -> torch.device:
    """The device this process trains on: ``cfg.device``; under torchrun, a CUDA run takes GPU LOCAL_RANK."""
    device = resolve_device(cfg.device)
    if world is not None and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def _distributed_step(run: _Run, amp: bool):
    """One step of a run shared by several processes (:mod:`osteo.distributed`): this process's share
    of the global batch, forward through DistributedDataParallel, the share's part of Eq. (5) and
    ACM's term; returns (the share's output, the global batch's loss terms)."""
    cfg = run.cfg
    if cfg.engine not in ("auto", "eager"):
        raise ValueError(f"TrainConfig.engine {cfg.engine!r}: a run under torchrun uses the eager engine "
                         f"(engine='auto' or 'eager'); the faster engines run one process")
    run.engine = Engine()
    ddp = distributed.data_parallel(run.model, run.spec.run, run.device)

    def step(hu: torch.Tensor, y: torch.Tensor):
        with torch.autocast(hu.device.type, dtype=torch.bfloat16, enabled=amp):
            out = ddp(*network_inputs(cfg, hu))
            objective, terms = distributed.share_loss(model_loss(out, y, lam=cfg.lam, acm_weight=0.0), out, y,
                                                      cfg.acm_weight, run.world)
        run.opt.zero_grad(set_to_none=True)
        objective.backward()
        run.opt.step()
        return out, terms

    return step
