"""The experiment runner: profiles, the paper's tables as lists of configs, and a result cache.

A *profile* sizes everything: ``smoke`` (CPU, seconds to minutes, for CI), ``laptop`` (CPU, the
whole batch in about half an hour) and ``paper`` (GPU: 4500 slices, 224 px, the paper's
hyperparameters, 60 epochs, ViT 500, three seeds). Every run is cached under
``results/<profile>/runs/<key>/`` where ``key`` hashes the full config and the data, so a model
that several tables need (Ours is in Tables 2, 3, 4 and 5) trains once, and an interrupted batch
resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data import SliceData, load_data
from .models import DEFAULT_MODEL, MODELS, default_image_size, model_spec, scaled_image_size
from .metrics import accuracy_ci_seeds, compare, compare_seeds, design_effect, min_detectable_difference
from .privacy import is_synthetic_id
from .synthetic import SYNTHETIC_VERSION, SyntheticError, _test_slices, synthesize
from .training import TrainConfig, TrainResult, load_model, resolve_device, train

PROFILE_NAMES = ("smoke", "laptop", "paper")


@dataclass(frozen=True)
class Profile:
    """How big every experiment is."""

    name: str
    n_per_class: int  # synthetic slices per class
    synth_size: int  # pixels of the synthetic DICOM slices
    image_size: int  # network input (224 in the paper)
    epochs: int
    vit_epochs: int
    batch_size: int
    seeds: tuple
    slices_per_patient: int = 5  # synthetic slices per training patient (neighbouring levels)
    device: str = "auto"
    note: str = ""
    n_test_per_class: int | None = None  # synthetic test slices per class, one per patient (None: 20 %)


PROFILES = {
    "smoke": Profile("smoke", 24, 128, 64, 2, 2, 24, (0,), 2, "cpu",
                     "CI: checks that everything runs; the numbers mean nothing"),
    # laptop: 96 training slices per class (48 patients of 2) as before, and 150 test patients per
    # class (one slice each): evaluating at 64 px costs seconds, and 450 test patients tell about
    # 8 points apart where 36 patients told nothing
    "laptop": Profile("laptop", 246, 128, 64, 8, 8, 32, (0,), 2, "auto",
                      "CPU, about 16 minutes on 2 cores; small and noisy: a teaching run, not a reproduction",
                      n_test_per_class=150),
    "paper": Profile("paper", 1500, 256, 224, 60, 500, 128, (0, 1, 2), 5, "auto",
                     "the paper's sizes and hyperparameters; needs a GPU"),
}


def cpu_warning(profile: Profile) -> str | None:
    """A warning when a GPU-sized profile would train on the CPU (None otherwise)."""
    if profile.name != "paper" or resolve_device(profile.device).type != "cpu":
        return None
    return (f"warning: profile {profile.name} without a CUDA GPU: runs not yet in results/{profile.name}/runs/ "
            f"train on the CPU, for hours each ({profile.epochs} epochs on {int(2.4 * profile.n_per_class)} "
            f"slices at {profile.image_size} px; ViT-B/16 {profile.vit_epochs} epochs). Cached runs load in "
            f"seconds. For a CPU, use profile laptop.")


def resolve_profile(name: str | None = None) -> Profile:
    """``None``/``"auto"``: the ``OSTEO_PROFILE`` environment variable, else ``paper`` with CUDA, else ``laptop``."""
    if name in (None, "", "auto"):
        name = os.environ.get("OSTEO_PROFILE") or ("paper" if torch.cuda.is_available() else "laptop")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)} or 'auto'")
    return PROFILES[name]


# The paper's experiments. Each row: (label, config overrides, paper accuracy in %).
OURS = dict(model="twin", inputs=("s", "t"), lam=0.1, learn_alpha=True)
OURS_NO_DIS = dict(OURS, lam=0.0)
TABLES = {
    "table2": {
        "title": "Table 2. Ablation study",
        "rows": [
            ("ResNet18+ACM (x_s alone)", dict(model="resnet18_acm", inputs=("s",)), 64.00),
            ("ResNet18+ACM (x_t alone)", dict(model="resnet18_acm", inputs=("t",)), 68.44),
            ("Ours - L_dis", OURS_NO_DIS, 74.00),
            ("Ours", OURS, 77.11),
        ],
    },
    "table3": {
        "title": "Table 3. Ensemble perspective (no L_dis)",
        "rows": [
            ("twin, inputs (x_s, x_s)", dict(OURS_NO_DIS, inputs=("s", "s")), 63.89),
            ("twin, inputs (x_t, x_t)", dict(OURS_NO_DIS, inputs=("t", "t")), 66.67),
            ("twin, inputs (x_s, x_t)", OURS_NO_DIS, 74.00),
        ],
    },
    "table4": {
        "title": "Table 4. Fusion weight alpha (with L_dis)",
        "rows": [
            *[(f"fixed alpha = {a}", dict(OURS, alpha=a, learn_alpha=False), p)
              for a, p in ((0.1, 74.00), (0.3, 73.00), (0.5, 74.22), (0.7, 73.56), (0.9, 71.22))],
            ("learnable alpha (Ours)", OURS, 77.11),
        ],
    },
    "table5": {
        "title": "Table 5. Baselines on x_t",
        "rows": [
            ("ResNet18", dict(model="resnet18", inputs=("t",)), 66.67),
            ("ResNet18+ACM", dict(model="resnet18_acm", inputs=("t",)), 68.44),
            ("Xception", dict(model="xception", inputs=("t",)), 69.22),
            ("Inception-v3", dict(model="inception_v3", inputs=("t",)), 68.77),
            ("EfficientNet-b0", dict(model="efficientnet_b0", inputs=("t",)), 72.11),
            ("ViT-B/16", dict(model="vit_b_16", inputs=("t",)), 55.67),
            ("Ours", OURS, 77.11),
        ],
    },
}


def paper_claims(name: str) -> list:
    """The paper's "A beats B" claims in one table, as (A, B) row labels: the best row of the paper
    beats every other row; in Tables 2 and 3 also each step of the ablation."""
    rows = [(label, acc) for label, _, acc in TABLES[name]["rows"]]
    best = max(rows, key=lambda r: r[1])[0]
    claims = [(best, label) for label, _ in rows if label != best]
    if name in ("table2", "table3"):
        by_acc = sorted(dict(rows).items(), key=lambda r: r[1])
        claims += [(hi, lo) for (lo, _), (hi, _) in zip(by_acc, by_acc[1:]) if (hi, lo) not in claims]
    return claims


# Inception-v3 and Xception read 299 px where the others read 224 (design section 3; the model registry says).
LARGE_INPUT_MODELS = tuple(name for name in MODELS if default_image_size(name) != 224)


def project_root() -> Path:
    """The osteo-kit checkout we run in (found upwards from the working directory, so notebooks
    run from ``notebooks/`` share ``results/`` and ``data/`` with the command line); else the
    working directory. ``OSTEO_ROOT`` overrides it."""
    if os.environ.get("OSTEO_ROOT"):
        return Path(os.environ["OSTEO_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents[:3]):
        pp = d / "pyproject.toml"
        if pp.is_file() and 'name = "osteo-kit"' in pp.read_text(errors="replace"):
            return d
    return here


def shown_path(path) -> str:
    """A path as the notebooks and messages print it: relative to the project root (never an
    absolute path of your machine); a path outside the project shows as ``<outside the project>/<file name>``."""
    p = Path(path).resolve()
    try:
        return p.relative_to(project_root()).as_posix()
    except ValueError:
        return f"<outside the project>/{p.name}"


def synthetic_set_problem(manifest: Path, profile: Profile) -> str | None:
    """Why the synthetic set of ``manifest`` must be made again for ``profile`` (None: it is current).

    It must be made again when an older generator made it (its ``synthetic_version`` is not
    :data:`osteo.synthetic.SYNTHETIC_VERSION`) or when it has other sizes than the profile asks for.
    A manifest that the generator did not write (patient ids not in its ``SYN`` format) is an error:
    remaking the set would delete files that are not ours."""
    try:
        old = pd.read_csv(manifest)
    except Exception as e:  # noqa: BLE001 - an unreadable manifest: say so, touch nothing
        raise SyntheticError(f"{manifest}: cannot read this manifest ({e}); move the folder away to make "
                             f"the synthetic set again") from e
    ids = old["patient_id"] if "patient_id" in old.columns else pd.Series(dtype=object)
    if ids.empty or not ids.map(is_synthetic_id).all():
        raise SyntheticError(f"{manifest}: not a synthetic set made by osteo (its patient ids are not SYN...), "
                             f"so it is left alone; move it away, or read it with data_source=")
    versions = sorted(set(old["synthetic_version"].astype(str))) if "synthetic_version" in old.columns else []
    if versions != [SYNTHETIC_VERSION]:
        made = f"version {', '.join(versions)}" if versions else "a generator older than version labels"
        return f"made by {made} of the generator, not the current {SYNTHETIC_VERSION}"
    test = old[old["split"] == "test"] if "split" in old.columns else old.iloc[:0]
    n_test = _test_slices(profile.n_per_class, profile.n_test_per_class)
    if (len(old) != 3 * profile.n_per_class or old.groupby("patient_id").size().max() != profile.slices_per_patient
            or len(test) != 3 * n_test or test["patient_id"].nunique() != len(test)):
        return f"made for other sizes than profile {profile.name}"
    return None


def data_id(data: SliceData) -> str:
    """A short fingerprint of a data set: which slices (paths relative to their common folder, so
    the key does not depend on where the kit is checked out), their pixels, labels, split and image
    size. A regenerated or edited data set therefore never reuses stale cached runs."""
    h = hashlib.sha256(str(data.image_size).encode())
    paths = data.train.path + data.test.path
    base = os.path.commonpath(paths) if paths else ""
    for s in (data.train, data.test):
        h.update("|".join(os.path.relpath(p, base) for p in s.path).encode())
        h.update(s.y.numpy().tobytes())
        h.update(hashlib.blake2b(s.hu.cpu().numpy().tobytes(), digest_size=16).digest())  # the pixels too
    return h.hexdigest()[:16]


@dataclass
class Experiments:
    """Runs and caches the paper's experiments for one profile on one data set.

    >>> exp = Experiments("smoke")          # synthetic data made on first use, in data/
    >>> exp.table("table2")                  # trains what is missing, returns a DataFrame
    """

    profile: Profile | str | None = None
    results_dir: Path | str | None = None  # default: <project>/results
    data_source: str | None = None  # a manifest CSV or class folder; None = the synthetic set
    data_dir: Path | str | None = None  # where the synthetic set is made; default <project>/data
    progress: bool = True
    seeds: tuple | None = None  # override the profile's seeds (e.g. a first GPU pass with seed 0 alone)
    _data: dict = field(default_factory=dict, repr=False)
    _ids: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.profile, Profile):
            self.profile = resolve_profile(self.profile)
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds: give at least one seed")
            self.profile = dataclasses.replace(self.profile, seeds=tuple(int(x) for x in self.seeds))
        root = project_root()
        self.results_dir = Path(self.results_dir) if self.results_dir else root / "results"
        self.data_dir = Path(self.data_dir) if self.data_dir else root / "data"
        self.out = self.results_dir / self.profile.name

    # ---- data -------------------------------------------------------------------------------
    def manifest(self) -> Path:
        """The manifest used: ``data_source``, else ``OSTEO_DATA``, else the synthetic set (made on first use)."""
        src = self.data_source or os.environ.get("OSTEO_DATA")
        if src:
            return Path(src)
        p = self.profile
        d = self.data_dir / f"synthetic-{p.name}"
        m = d / "manifest.csv"
        stale = synthetic_set_problem(m, p) if m.exists() else None
        if stale:
            print(f"{shown_path(d)} was {stale}: making it again")
        if stale or not m.exists():
            synthesize(d, n_per_class=p.n_per_class, size=p.synth_size, seed=0, slices_per_patient=p.slices_per_patient,
                       progress=self.progress, overwrite=bool(stale), n_test_per_class=p.n_test_per_class)
        return m

    def data(self, image_size: int | None = None, split: str = "patient") -> SliceData:
        """The data at one image size, split by patient (or by slice, the pitfall ``TrainConfig.split``)."""
        size = image_size or self.profile.image_size
        key = size if split == "patient" else (size, split)
        if key not in self._data:
            self._data[key] = load_data(self.manifest(), image_size=size, progress=self.progress, split=split)
        return self._data[key]

    # ---- runs -------------------------------------------------------------------------------
    def config(self, seed: int = 0, **overrides) -> TrainConfig:
        """The profile's config for one experiment (the overrides name the experiment)."""
        p = self.profile
        model = overrides.get("model", DEFAULT_MODEL)
        size = scaled_image_size(model, p.image_size)
        base = dict(
            epochs=p.vit_epochs if model == "vit_b_16" else p.epochs,
            batch_size=p.batch_size,
            image_size=size,
            device=p.device,
            seed=seed,
        )
        base.update(overrides)
        return TrainConfig(**base)

    def run(self, cfg: TrainConfig) -> TrainResult:
        """Train (or load from the cache) one config."""
        return train(cfg, self.data(cfg.image_size, cfg.split), out_dir=self.run_dir(cfg), progress=self.progress)

    def trained_model(self, cfg: TrainConfig, device="cpu") -> tuple:
        """The trained network of one config with its result, ``(model, TrainResult)``, training it
        when its weights are not on disk (Grad-CAM and predictions need weights, not just numbers).

        - cached with weights: loaded, nothing trains;
        - not run yet (or interrupted): trained (or resumed) like :meth:`run`;
        - cached *without* weights (git keeps only the ``result.json`` of ``results/paper/runs/``;
          checkpoints are too large): trained again, and says so. The new run trains in the run
          folder's ``retraining/`` subfolder (an interrupted one resumes there); only when it has
          finished does its result replace the old one, then its checkpoint joins it, so the weights
          and the numbers shown belong together. Both accuracies are printed (CUDA training is not
          bit-for-bit repeatable).
        """
        d = self.run_dir(cfg)
        ckpt, res_path = d / "checkpoint.pt", d / "result.json"
        if res_path.exists() and not ckpt.exists():
            result = self._retrain_for_weights(cfg, d)
        else:
            result = self.run(cfg)
        model, _ = load_model(ckpt, device)
        return model, result

    def model(self, cfg: TrainConfig, device="cpu") -> tuple:
        """Same as :meth:`trained_model` (the older name): may train, see there."""
        return self.trained_model(cfg, device)

    def _retrain_for_weights(self, cfg: TrainConfig, d: Path) -> TrainResult:
        """Train again a run whose result is cached without its checkpoint; replace the result only
        once the new one exists (then move the checkpoint in)."""
        old = TrainResult.from_json(d / "result.json")
        stage = d / "retraining"
        print(f"{shown_path(d)}: the result of {describe(cfg)} is cached without its weights; training it again "
              f"to get them (the cached result stays until the new one is written)")
        result = train(cfg, self.data(cfg.image_size, cfg.split), out_dir=stage, progress=self.progress)
        os.replace(stage / "result.json", d / "result.json")  # first the numbers: a run without weights trains again
        os.replace(stage / "checkpoint.pt", d / "checkpoint.pt")
        shutil.rmtree(stage)  # what is left: temporary files of the finished run
        print(f"  test accuracy {100 * old.accuracy:.2f} % before ({old.device}), "
              f"{100 * result.accuracy:.2f} % now ({result.device}); the new result replaces the old")
        return result

    def run_dir(self, cfg: TrainConfig) -> Path:
        """The cache folder of one config on this data: ``results/<profile>/runs/<key>``."""
        key = cfg.image_size if cfg.split == "patient" else (cfg.image_size, cfg.split)
        if key not in self._ids:
            self._ids[key] = data_id(self.data(cfg.image_size, cfg.split))
        return self.out / "runs" / cfg.key(self._ids[key])

    def run_seeds(self, **overrides) -> list:
        return [self.run(self.config(seed=s, **overrides)) for s in self.profile.seeds]

    # ---- tables -----------------------------------------------------------------------------
    def table(self, name: str, save: bool = True) -> pd.DataFrame:
        """Run every row of a paper table (all seeds) and return it beside the paper's numbers."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; choose one of {', '.join(TABLES)}")
        rows = []
        for label, overrides, paper in TABLES[name]["rows"]:
            results = self.run_seeds(**overrides)
            rows.append(summarise(label, results, paper))
        df = pd.DataFrame(rows)
        if save:
            self.save_table(name, df)
        return df

    def fig3_table(self, save: bool = True) -> pd.DataFrame:
        """Fig. 3's numbers: per-class test accuracy (%) of the heads G_s and G_t of Ours, per seed."""
        df = pd.DataFrame(fig3_rows(self.run_seeds(**OURS)))
        if save:
            self.save_table("fig3", df)
        return df

    def paired_table(self, names=None, save: bool = True) -> pd.DataFrame:
        """Every paper claim "A beats B" of the named tables (default: those whose runs are all
        cached), tested on the same test slices: per seed and combined over seeds, the accuracy
        difference A - B in points, its 95 % interval (paired bootstrap over patients; over seeds
        and patients when combined), the exact permutation p-value over patients, the smallest
        difference the test detects with 80 % power, and whether the claim held (the interval
        excludes 0 in the paper's direction, and p < 0.05). Trains nothing."""
        names = [n for n in (names or TABLES) if not self.missing([n])]
        rows = []
        for name in names:
            table_rows = {label: (ov, p) for label, ov, p in TABLES[name]["rows"]}
            for a, b in paper_claims(name):
                ra = [self.run(self.config(seed=s, **table_rows[a][0])) for s in self.profile.seeds]
                rb = [self.run(self.config(seed=s, **table_rows[b][0])) for s in self.profile.seeds]
                paper_diff = table_rows[a][1] - table_rows[b][1]
                rows += paired_rows(TABLES[name]["title"].split(".")[0], a, b, ra, rb, paper_diff)
        df = pd.DataFrame(rows)
        if save:
            self.save_table("paired", df)
        return df

    def mcnemar_table(self, save: bool = True) -> pd.DataFrame:
        """Former name of :meth:`paired_table` (McNemar counted slices as independent; the paired
        test over patients replaces it)."""
        return self.paired_table(save=save)

    # ---- the grid ---------------------------------------------------------------------------
    def table_configs(self, names=None) -> list:
        """Every distinct config the named tables need (default all), for all seeds, in table order."""
        names = list(names or TABLES)
        for n in names:
            if n not in TABLES:
                raise ValueError(f"unknown table {n!r}; choose one of {', '.join(TABLES)}")
        seen, out = set(), []
        for n in names:
            for _, overrides, _ in TABLES[n]["rows"]:
                for seed in self.profile.seeds:
                    cfg = self.config(seed=seed, **overrides)
                    if cfg.key() not in seen:
                        seen.add(cfg.key())
                        out.append(cfg)
        return out

    def is_done(self, cfg: TrainConfig) -> bool:
        """Whether the cache holds the finished result of ``cfg`` on this data."""
        f = self.run_dir(cfg) / "result.json"
        return f.exists() and TrainResult.from_json(f).config == cfg.to_dict()

    def grid(self, names=None, worker: int = 0, n_workers: int = 1, batch_runs: int = 1) -> list:
        """Train every missing run of the named tables (resumable: finished runs come from the
        cache). ``worker``/``n_workers`` split the runs between processes that share the cache
        folder (e.g. several trainings side by side on one GPU); returns this worker's results.
        ``batch_runs`` > 1 trains up to that many missing runs that share a network, input size and
        epoch count at once as one batched network (:func:`osteo.batched.train_batched`), each
        with the result its own run would give."""
        if not 0 <= worker < n_workers:
            raise ValueError(f"worker {worker} of {n_workers}: need 0 <= worker < n_workers")
        if isinstance(batch_runs, bool) or not isinstance(batch_runs, int) or batch_runs < 1:
            raise ValueError(f"batch_runs must be an integer >= 1, got {batch_runs!r}")
        mine = self.table_configs(names)[worker::n_workers]
        if batch_runs > 1:
            self._train_batched([c for c in mine if not self.is_done(c)], batch_runs)
        results = []
        for i, cfg in enumerate(mine, 1):
            cached = self.is_done(cfg)
            res = self.run(cfg)
            results.append(res)
            print(f"[{worker + 1}/{n_workers}] {i}/{len(mine)} {describe(cfg)}: acc {100 * res.accuracy:.2f} % "
                  f"({'cached' if cached else f'{res.seconds:.0f} s on {res.device}, engine {res.engine}'})", flush=True)
        return results

    def _train_batched(self, cfgs: list, batch_runs: int) -> None:
        """Train ``cfgs`` in groups of up to ``batch_runs`` that can share one batched network."""
        from .batched import batch_key, train_batched

        groups: dict = {}
        for c in cfgs:
            groups.setdefault((batch_key(c), c.split), []).append(c)
        for group in groups.values():
            for k in range(0, len(group), batch_runs):
                part = group[k:k + batch_runs]
                data = self.data(part[0].image_size, part[0].split)
                train_batched(part, data, [self.run_dir(c) for c in part], progress=self.progress)

    def missing(self, names=None) -> list:
        """The configs of the named tables that the cache does not hold yet."""
        return [c for c in self.table_configs(names) if not self.is_done(c)]

    def save_table(self, name: str, df: pd.DataFrame, note: str | None = None) -> None:
        """Write ``tables/<name>.csv`` and ``.json`` (with the profile, and ``note`` shown under the table in REPORT.md)."""
        tdir = self.out / "tables"
        tdir.mkdir(parents=True, exist_ok=True)
        df.to_csv(tdir / f"{name}.csv", index=False)
        meta = {"title": TABLES.get(name, {}).get("title", name), "profile": dataclasses.asdict(self.profile),
                "rows": json.loads(df.to_json(orient="records"))}
        if note:
            meta["note"] = note
        (tdir / f"{name}.json").write_text(json.dumps(meta, indent=1))


def describe(cfg: TrainConfig) -> str:
    """A short name of a run: model, inputs, lambda, alpha, seed."""
    options = model_spec(cfg.model).options  # the twin reads lambda and alpha; a single network neither
    alpha = f", alpha {'learned' if cfg.learn_alpha else cfg.alpha}" if "alpha" in options else ""
    lam = f", lambda {cfg.lam}" if "lam" in options else ""
    return f"{cfg.model} ({'+'.join(cfg.inputs)}{lam}{alpha}), seed {cfg.seed}"


def fig3_rows(results: list) -> list:
    """Fig. 3's rows: per seed and head (G_s, G_t of Ours), per-class and overall accuracy (%), each
    class with its 95 % interval over patients (``<class>_ci``) when the run knows its patients."""
    rows = []
    for r in results:
        for h, name in (("s", "G_s (x_s)"), ("t", "G_t (x_t)")):
            t = r.test[h]
            row = {"seed": r.config["seed"], "head": name}
            for lab, a in t["per_class_accuracy"].items():
                row[lab] = round(100 * a, 2)
                ci = t.get("per_class_accuracy_ci95", {}).get(lab)
                if ci:
                    row[f"{lab}_ci"] = f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"
            row.update(overall=round(100 * t["accuracy"], 2), n_test=t["n"])
            if t.get("n_patients"):
                row["n_patients"] = t["n_patients"]
            rows.append(row)
    return rows


def patients_of(r: TrainResult) -> tuple:
    """The patient of each test slice of a run, and whether it is known (results made before the
    kit stored it fall back to one 'patient' per slice, which makes intervals too narrow)."""
    ids = list(getattr(r, "test_patient_id", None) or [])
    if len(ids) == len(r.y_true):
        return ids, True
    return list(range(len(r.y_true))), False


def _shared_test_set(results: list) -> tuple:
    """y_true and patients shared by runs (seeds, or two models): they must be the same test slices."""
    y, (groups, known) = results[0].y_true, patients_of(results[0])
    for r in results[1:]:
        if list(r.y_true) != list(y) or patients_of(r)[0] != groups:
            raise ValueError(f"runs {describe(TrainConfig(**results[0].config))} and {describe(TrainConfig(**r.config))} "
                             f"were tested on different slices: they cannot be compared or pooled")
    return np.asarray(y), groups, known


def summarise(label: str, results: list, paper_acc: float | None) -> dict:
    """One table row: accuracy per seed, their mean and SD, and a 95 % interval over patients (and
    over seeds when there are several: a two-level bootstrap, seeds then patients), the test set's
    patients, slices and effective size (design effect), and the gap to the paper."""
    accs = np.array([r.accuracy for r in results]) * 100
    y, groups, known = _shared_test_set(results)
    preds = [r.predictions[r.main_head] for r in results]
    mean, lo, hi = accuracy_ci_seeds(y, preds, groups)
    de = [design_effect(y, p, groups)["deff"] for p in preds]
    deff = float(np.nanmean(de)) if known else 1.0
    if not known:
        interval = "slices as independent (patients unknown: too narrow)"
    elif len(results) == 1:
        interval = "patients (one seed: test-set sampling only)"
    else:
        interval = f"seeds and patients (two-level bootstrap, {len(results)} seeds)"
    return {
        "model": label,
        "paper_acc": paper_acc,
        "acc": round(float(accs.mean()), 2),
        "ci95_low": round(lo * 100, 2),
        "ci95_high": round(hi * 100, 2),
        "interval": interval,
        "seed_sd": round(float(accs.std(ddof=1)), 2) if len(accs) > 1 else None,
        "per_seed": [round(float(a), 2) for a in accs],
        "seeds": [r.config["seed"] for r in results],
        "n_patients": len(set(groups)) if known else None,
        "n_slices": int(len(y)),
        "design_effect": round(deff, 2),
        "n_eff": round(len(y) / deff, 1) if deff > 0 else None,
        "macro_f1": round(float(np.mean([r.test[r.main_head]["macro_f1"] for r in results])), 3),
        "qw_kappa": round(float(np.mean([r.test[r.main_head]["qw_kappa"] for r in results])), 3),
        "gap_to_paper": round(float(accs.mean()) - paper_acc, 2) if paper_acc is not None else None,
        "pretrained": bool(all(r.pretrained_used for r in results)),
        "alpha": round(float(np.mean([r.alpha for r in results])), 3) if results[0].alpha is not None else None,
        "epochs": results[0].config["epochs"],
        "device": results[0].device,
    }


def verdict(lo: float, hi: float, p: float = 0.0) -> str:
    """Did "A beats B" hold? "yes" when the difference's 95 % interval lies above 0 ("no: B better"
    below 0) and the permutation test agrees (p < 0.05: on a few dozen patients a percentile
    bootstrap is too narrow, the exact test is not); else "not shown"."""
    if p >= 0.05:
        return "not shown"
    return "yes" if lo > 0 else ("no: B better" if hi < 0 else "not shown")


def paired_rows(table: str, a: str, b: str, runs_a: list, runs_b: list, paper_diff: float | None) -> list:
    """Rows of the paired table for one claim "A beats B": one per seed and, with several seeds,
    one combined over seeds (difference, interval and minimum detectable difference in points)."""
    y, groups, known = _shared_test_set(list(runs_a) + list(runs_b))
    pa = [r.predictions[r.main_head] for r in runs_a]
    pb = [r.predictions[r.main_head] for r in runs_b]
    base = {"table": table, "a": a, "b": b, "paper_diff": None if paper_diff is None else round(paper_diff, 2)}
    out = []
    seeds = [r.config["seed"] for r in runs_a]
    todo = [(str(s), [x], [z]) for s, x, z in zip(seeds, pa, pb)]
    if len(seeds) > 1:
        todo.append(("all", pa, pb))
    for seed, xa, xb in todo:
        c = compare(y, xa[0], xb[0], groups) if len(xa) == 1 else compare_seeds(y, xa, xb, groups)
        mdd = min_detectable_difference(y, xa, xb, groups)
        out.append({**base, "seed": seed, "diff": round(100 * c.diff, 2), "ci95_low": round(100 * c.lo, 2),
                    "ci95_high": round(100 * c.hi, 2), "p_value": round(c.p, 4), "mdd80": round(100 * mdd, 2),
                    "holds": verdict(c.lo, c.hi, c.p), "n_patients": len(set(groups)) if known else None,
                    "n_slices": int(len(y))})
    return out
