"""Writes the teaching notebooks ``notebooks/NN_*.ipynb`` from the cell texts below.

    python notebooks/_build.py          # rewrite every notebook (no outputs, stable cell ids)

Edit the notebooks here rather than in JupyterLab, so that they stay consistent (same skeleton:
header with time per profile, one ``parameters`` cell, setup, data, run, results, "Try this",
cleanup) and are committed without outputs. ``tests/test_notebooks_clean.py`` checks the result.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

MD, CODE, PARAMS = "md", "code", "params"

SETUP = '''\
import warnings
warnings.formatwarning = lambda msg, cat, *args, **kwargs: f"{cat.__name__}: {msg}\\n"  # no file paths in outputs
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in Jupyter without ipywidgets: text bars
import gc

import numpy as np
import pandas as pd
import torch

import osteo
from osteo import plots
from osteo.experiments import OURS, OURS_NO_DIS, TABLES
pd.set_option("display.width", 160)'''

EXPERIMENTS = '''\
exp = osteo.Experiments(profile, seeds=seeds)
FIG = exp.out / "figures"
print(plots.setup_summary(exp))'''

CLEANUP_MD = "## Cleanup\nFree the memory this notebook holds (the results stay on disk, in the cache)."


def cleanup(names: str) -> str:
    return f'''\
del {names}
gc.collect()
if torch.cuda.is_available():
    torch.cuda.empty_cache()'''


def header(title: str, shows: str, needs: str, smoke: str, laptop: str, paper: str) -> str:
    return f"""# {title}

**What it shows.** {shows}

**What it needs.** {needs}

**How long.** profile `smoke`: {smoke} · profile `laptop`: {laptop} (both measured on a 2-core CPU,
notebooks run in order by `osteo reproduce`; faster with more cores) · profile `paper`: {paper} on one
NVIDIA H100 (approx.: an estimate, not measured yet). Runs that an earlier notebook already trained are loaded
from the cache under `results/<profile>/runs/` and take seconds.

*Profiles:* `smoke` only checks that everything runs (its numbers mean nothing), `laptop` gives small but
readable numbers on a CPU, `paper` uses the paper's sizes (4500 slices, 224 px, 60 epochs, three seeds)
and needs a GPU. Leave `profile = None` to pick automatically: the `OSTEO_PROFILE` environment variable,
else `paper` when PyTorch sees a CUDA GPU, else `laptop`."""


PARAMETERS = '''\
# Parameters (papermill replaces this cell when run by `osteo reproduce --profile P`)
profile = None  # None: $OSTEO_PROFILE, else "paper" with a CUDA GPU, else "laptop"
seeds = None  # None: the profile's seeds (paper: 0, 1, 2); e.g. [0] for a first, shorter pass'''

SYNTHETIC_NOTE = """\
> **Synthetic data.** Unless you pointed the kit at your own DICOM files, every number below comes from
> the kit's *synthetic* CT slices, not from the paper's private hospital data. They test whether the
> method behaves as the paper says; they are not the paper's results. The paper's numbers are shown beside
> ours, and ours carry their 95 % interval."""

TABLE_READING = """\
**How to read the table.** `paper_acc` is the paper's accuracy (%), `acc` ours (mean over the seeds),
`ci95_low`-`ci95_high` the 95 % Wilson interval of ours (all seeds' test slices pooled), `gap_to_paper`
ours minus the paper's, `per_seed` each seed's accuracy and `pretrained` whether ImageNet weights were
used (offline machines train from scratch). On 900 test slices a 95 % interval on 77 % is about
±2.7 points, so gaps of one or two points, in the paper as here, are within noise."""

NOTEBOOKS: dict[str, list] = {}

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["00_data"] = [
    (MD, header(
        "00 · The data: lumbar CT slices, DICOM and the manifest",
        "what the paper's data were and what the kit uses instead; making (or loading) the data set; "
        "example slices of each class in the two windows of Eq. (1); the distribution of trabecular HU per "
        "class; how to point the kit at your own DICOM folder.",
        "nothing: on first use the synthetic data set is written as DICOM files under `data/`.",
        "10 s", "15 s", "about 1 min (writing 4500 DICOM slices)")),
    (PARAMS, PARAMETERS + "\nn_examples = 3  # example slices shown per class"),
    (MD, "## Setup\nImports, and the experiment runner for the chosen profile (it knows the sizes, the data and where results go)."),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, """\
## What the data are
The paper used 4500 axial CT slices of lumbar vertebrae from a hospital, 1500 per class: **normal**,
**osteopenia** and **osteoporosis**. The labels came from DXA (bone densitometry), not from the CT itself.
These data are private.

The kit therefore ships a generator of *synthetic* vertebral CT slices. Each slice is written as a real
DICOM file (stored values plus RescaleSlope/RescaleIntercept, as a scanner writes them) and read back
through the same loader that reads your files. The generator follows the literature: trabecular bone of
normal, osteopenic and osteoporotic vertebrae differs by only some 30-60 HU on average and the classes
overlap a lot; scanners differ in noise, kVp, contrast and pixel spacing.

A **manifest** lists the slices: one row per DICOM file with `path`, `label`, `patient_id` and, optionally,
`split` (train/test, made at patient level so no patient is in both). The synthetic manifest has more
columns describing how each slice was made."""),
    (CODE, '''\
manifest = exp.manifest()  # writes the synthetic set on first use
df = osteo.load_manifest(manifest)
if "split" not in df.columns:  # a manifest without a split: patients split 80/20 as exp.data() does
    df = osteo.split_patients(df, test_fraction=0.2, seed=0)
print(f"{len(df)} slices of {df['patient_id'].nunique()} patients; manifest: {plots.shown_path(manifest)}")
df.drop(columns=["path"]).head()'''),
    (MD, """\
Patient ids here are pseudonyms (`SYN...` for synthetic patients). With your own data the kit
pseudonymises the ids it reads from DICOM headers and never prints names or other identifiers. How many
slices does each class have in each split?"""),
    (CODE, "pd.crosstab(df['label'], df['split'], margins=True)"),
    (MD, """\
## Example slices of each class
Each slice is shown in the two windows of Eq. (1) that the network reads (notebook 01 explains them):
`x_s` (HU -128 to 1024) and `x_t` (HU -450 to 1024). Can you tell the classes apart by eye? Radiologists
cannot, reliably: the differences are in the texture and brightness of the trabecular bone."""),
    (CODE, '''\
picks = pd.concat([df[df["label"] == lab].head(n_examples) for lab in osteo.LABELS])
slices = [osteo.read_hu(p)[0] for p in picks["path"]]
titles = [f"{lab} #{i % n_examples + 1}" for i, lab in enumerate(picks["label"])]
fig = plots.show_slices(slices, titles)
plots.save_figure(fig, FIG / "00_slices_per_class.png")
fig'''),
    (MD, """\
`osteo.read_hu` returns the slice in Hounsfield units and a dictionary of technical facts about the file.
We print only those facts; the dictionary also holds the stored patient id, which should never be printed."""),
    (CODE, '''\
hu, meta = osteo.read_hu(picks["path"].iloc[0])
print(f"{hu.shape} float32 HU, range {hu.min():.0f} to {hu.max():.0f}")
{k: meta[k] for k in ("modality", "pixel_spacing", "slice_thickness", "kvp", "rescale_slope", "rescale_intercept", "transfer_syntax")}'''),
    (MD, """\
## Trabecular HU per class
Opportunistic screening measures the mean HU of the trabecular bone in a vertebra (Pickhardt et al. 2013:
L1 ≤ 160 HU is 90 % sensitive, ≤ 110 HU over 90 % specific for osteoporosis). The synthetic manifest
records that value for each slice. The overlap of the three histograms is why the task is hard.
(Real manifests have no such column: then this plot is skipped.)"""),
    (CODE, '''\
if "trabecular_hu" in df.columns:
    fig = plots.hu_histograms(df, column="trabecular_hu")
    plots.save_figure(fig, FIG / "00_hu_histograms.png")
    display(fig)
    display(df.groupby("label")["trabecular_hu"].describe().reindex(list(osteo.LABELS)).round(1))
else:
    print("this manifest has no trabecular_hu column (real data): no histogram")'''),
    (MD, """\
## The slices as the network gets them
`exp.data()` reads every slice once, resizes it to the profile's input size and keeps it as integer HU
(the windows are computed per batch on the training device). The result is cached, so the next notebooks
load it in a second."""),
    (CODE, '''\
data = exp.data()
print(data.describe())'''),
    (MD, """\
## Your own DICOM data
Point the kit at a manifest CSV (`path,label,patient_id[,split]`, paths relative to the CSV) or at a folder
with one sub-folder per class (`normal/`, `osteopenia/`, `osteoporosis/`; patient ids are then read from
the DICOM headers and pseudonymised). Either set the environment variable before running everything:

```bash
OSTEO_DATA=/path/to/manifest.csv osteo reproduce --profile laptop
```

or, in a notebook, `osteo.Experiments(profile, data_source="/path/to/manifest.csv")`. Results are cached
separately for each data set. The loader handles RescaleSlope/Intercept, padding values, compressed
transfer syntaxes, MONOCHROME1 and flipped orientations, and refuses non-CT files with a clear message.
Here it reads a real CT slice that ships with pydicom (a thoracic vertebra, 128 × 128):"""),
    (CODE, '''\
from pydicom.data import get_testdata_file

real_hu, real_meta = osteo.read_hu(get_testdata_file("CT_small.dcm"))
print(f"real slice: {real_hu.shape}, {real_meta['pixel_spacing']} mm pixels, HU {real_hu.min():.0f} to {real_hu.max():.0f}")
plots.show_slices([real_hu], ["pydicom's CT_small.dcm"])'''),
    (MD, """\
## Try this
1. Set `n_examples = 6` in the parameters cell and look again: are there slices you would put in another class?
2. From the histograms, guess the accuracy of the best single HU threshold pair; notebook 06 fits one.
3. Make a tiny synthetic set of your own: `osteo.synthesize("data/mine", n_per_class=10, size=128, seed=1)`
   and compare its histograms."""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("df, picks, slices, hu, meta, data, real_hu, real_meta")),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["01_preprocessing"] = [
    (MD, header(
        "01 · Preprocessing: two HU windows of one slice, Eq. (1)",
        "the windowing of Eq. (1); the two views `x_s` and `x_t` of the same slice side by side; what each "
        "window keeps and loses; why the kit keeps the windows as floating point numbers rather than 8-bit "
        "grey levels.",
        "the data of notebook 00 (made on first use if missing).",
        "7 s", "8 s", "about 30 s")),
    (PARAMS, PARAMETERS),
    (MD, "## Setup"),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, r"""
## Eq. (1): from Hounsfield units to grey levels
A CT slice stores Hounsfield units (HU): air -1000, fat about -100, water 0, muscle about 50, trabecular
bone roughly 80-250, cortical bone several hundred to over 1000. A *window* maps a range of HU to the
256 grey levels of an image:

$$p = 255 \cdot \frac{HU - HU_{min}}{HU_{max} - HU_{min}}, \quad \text{clipped to } [0, 255]$$

The paper uses $HU_{max} = 1024$ for both views and two lower bounds: $HU_{min} = -128$ for
$x_s$ (a narrower window: "less texture", the paper says) and $HU_{min} = -450$ for $x_t$ (a wider
window that keeps fat and soft tissue visible). Each branch of the twin network reads one view."""),
    (CODE, '''\
print(f"x_s: HU_min = {osteo.HU_MIN_S:.0f}, x_t: HU_min = {osteo.HU_MIN_T:.0f}, both HU_max = {osteo.HU_MAX:.0f}")
tissues = pd.DataFrame({"HU": [-1000, -100, 0, 50, 178, 118, 700, 1200]},
                       index=["air", "fat", "water", "muscle", "trabecular, normal", "trabecular, osteoporosis", "cortex (thin)", "cortex (thick)"])
tissues["grey in x_s"] = osteo.window(tissues["HU"].to_numpy(float), osteo.HU_MIN_S)
tissues["grey in x_t"] = osteo.window(tissues["HU"].to_numpy(float), osteo.HU_MIN_T)
tissues.round(1)'''),
    (MD, """\
**What each window keeps and loses.** Both windows lose everything below their lower bound (air and, in
`x_s`, fat: both become black) and above 1024 HU (thick cortex saturates to white). `x_s` spreads the
remaining HU over the grey levels a little more (255/1152 grey levels per HU against 255/1474 in `x_t`),
so it shows bone brightness with more contrast but no fat; `x_t` keeps fat and marrow fat visible, which
matters because osteoporotic marrow gets fattier. The paper's idea is that two networks reading these two
views learn different features, and their fusion beats each alone (Tables 2 and 3)."""),
    (CODE, '''\
df = osteo.load_manifest(exp.manifest())
slice_hu, _ = osteo.read_hu(df[df["label"] == "normal"]["path"].iloc[0])
fig = plots.window_comparison(slice_hu)
plots.save_figure(fig, FIG / "01_windows.png")
fig'''),
    (MD, """\
## Why float windows: the grey levels between the classes
After Eq. (1) an 8-bit image keeps only whole grey levels. The classes differ by some 30-60 HU in mean
trabecular bone, which is only a handful of grey levels. Rounding to 8 bits would throw part of that small
difference away, so the kit keeps the windowed values as 32-bit floats (a decision of ours: the paper does
not say). Below: the class means of this data set on the Eq. (1) curve (left) and how many grey levels lie
between neighbouring classes in each window (right)."""),
    (CODE, '''\
if "trabecular_hu" in df.columns:
    class_hu = df.groupby("label")["trabecular_hu"].mean().reindex(list(osteo.LABELS))
else:  # real data: no per-slice trabecular HU; use the per-class means of one published cohort
    class_hu = pd.Series([178.0, 143.0, 118.0], index=list(osteo.LABELS))
    print("no trabecular_hu column: using literature means (normal 178, osteopenia 143, osteoporosis 118 HU)")
fig = plots.grey_levels_between_classes(class_hu.to_dict())
plots.save_figure(fig, FIG / "01_grey_levels.png")
fig'''),
    (CODE, '''\
gaps = pd.DataFrame({"HU": -class_hu.diff().iloc[1:]})
for v, hu_min in (("x_s", osteo.HU_MIN_S), ("x_t", osteo.HU_MIN_T)):
    gaps[f"grey levels in {v}"] = -np.diff(osteo.window(class_hu.to_numpy(), hu_min))
gaps.index = [f"{a} to {b}" for a, b in zip(osteo.LABELS[:-1], osteo.LABELS[1:])]
gaps.round(2)'''),
    (MD, """\
## What the network finally reads
`osteo.windowing.to_network_input` windows a batch of HU slices, scales to [0, 1], copies the grey slice
into three channels (the backbones were designed for RGB) and normalises with the ImageNet mean and
standard deviation. It runs on the training device, so the two views cost no extra memory."""),
    (CODE, '''\
hu_batch = exp.data().test.hu[:4]
x_s = osteo.windowing.to_network_input(hu_batch, "s")
x_t = osteo.windowing.to_network_input(hu_batch, "t")
print(f"HU batch {tuple(hu_batch.shape)} {hu_batch.dtype} -> x_s {tuple(x_s.shape)} {x_s.dtype}, mean {x_s.mean():.2f}; x_t mean {x_t.mean():.2f}")'''),
    (MD, """\
## Try this
1. Add a third window, e.g. `osteo.window(slice_hu, 50, 400)` (a "bone marrow" window), and show it with
   `plots.show_slices`: how many grey levels now separate the classes?
2. Quantise `x_s` to 8 bits (`np.floor(osteo.window(slice_hu, osteo.HU_MIN_S))`) and count the distinct grey
   levels inside the vertebral body."""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("df, slice_hu, hu_batch, x_s, x_t")),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["02_train_twin"] = [
    (MD, header(
        "02 · Training the proposed twin network (Ours)",
        "training the paper's model: two ResNet18+ACM backbones `G_s` and `G_t`, one per window, their "
        "features fused with a learnable weight alpha, trained with three cross-entropies and the "
        "dissimilarity loss (Eqs. 2-5); the loss terms per epoch; alpha over the epochs; the test "
        "confusion matrix of each head; where the checkpoint is.",
        "the data of notebook 00. Trains on a CUDA GPU when there is one (profile `smoke` always uses the CPU).",
        "12 s", "65 s", "about 2 min on one H100 (4.3 min measured with three trainings sharing it)")),
    (PARAMS, PARAMETERS),
    (MD, "## Setup"),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, r"""
## The model, Eqs. (2)-(5)
Two identical backbones read the two views: $G_s(x_s)$ and $G_t(x_t)$, each a ResNet18 with an
Attend-and-Compare Module (ACM) in every residual block, each with its own classifier head. Their pooled
512-dimensional features $g_s$ and $g_t$ are fused,

$$g = \alpha\, g_s + (1 - \alpha)\, g_t,$$

with $\alpha$ learned (starting at 0.5), and $g$ feeds a third head $F$, whose prediction is the model's.
The loss adds the three cross-entropies and a *dissimilarity* term that pushes the two feature vectors apart:

$$L = CE(G_s) + CE(G_t) + CE(F) + \lambda\, \cos(g_s, g_t), \quad \lambda = 0.1.$$

ACM also has its own orthogonality term (weight 0.1), which Eq. (5) does not mention; the kit keeps it as a
separate, reported term (`acm`). The configuration records every setting, including those the paper leaves
open (input size, split, no augmentation, ImageNet weights or not):"""),
    (CODE, '''\
cfg = exp.config(**OURS)
cfg'''),
    (CODE, '''\
data = exp.data()
print(data.describe())'''),
    (MD, """\
## Train (or load from the cache)
`exp.model` trains and evaluates once and keeps the result and a checkpoint under `results/<profile>/runs/`,
in a folder named by a hash of the configuration and the data; it returns the trained network and its
result. Tables 2-5 need the same run and load it from there. An interrupted run resumes from its last
epoch. (A result kept without its weights, as git keeps `results/paper/`, is trained again.)"""),
    (CODE, '''\
model, result = exp.model(cfg)
lo, hi = result.accuracy_ci95
print(f"test accuracy of F: {100 * result.accuracy:.1f} % (95 % CI {100 * lo:.1f}-{100 * hi:.1f} %) "
      f"on {result.test['f']['n']} test slices ({plots.data_label(exp)}); the paper: 77.11 % on its hospital data")
print(f"{result.config['epochs']} epochs on {result.device} ({result.engine} engine) in {result.seconds:.0f} s; "
      f"ImageNet weights: {'yes' if result.pretrained_used else 'no'}; learned alpha: {result.alpha:.3f}")'''),
    (MD, """\
**How the steps run (the engine).** The config's `engine` says how a step is executed, never what it
computes. On the CPU it is plain PyTorch (`eager`). On a CUDA GPU it is `grouped`: the two backbones run
as one network with twice the channels in groups, so each layer is one kernel instead of two, in bf16
with the data windowed on the GPU. On one H100 that trains 2,010 slices/s against 1,390 for the plain
twin; compiling (`engine="grouped+compile"`) reaches 3,280 but spends 60-90 s compiling first, about
what it saves on one 60-epoch run (see `results/bench/`). Tests hold every engine to the plain model."""),
    (MD, """\
## The loss terms per epoch
`ce_s`, `ce_t`, `ce_f`: cross-entropy of each head; `dis`: cos(g_s, g_t) (before the factor λ); `acm`:
ACM's orthogonality term (already weighted); `total`: what is minimised. With few epochs (profiles `smoke`
and `laptop`) the curves are short and noisy."""),
    (CODE, '''\
fig = plots.loss_curves(result.history, title=f"Ours, seed {cfg.seed} ({plots.data_label(exp)}, profile {exp.profile.name})")
plots.save_figure(fig, FIG / "02_loss_curves.png")
fig'''),
    (MD, """\
## Alpha over the epochs
Alpha weighs `g_s` against `g_t` in the fusion. The paper reports only that a learned alpha beats fixed ones
(Table 4, notebook 05); here you see where it goes."""),
    (CODE, '''\
fig = plots.alpha_curve(result.history, initial=cfg.alpha, title=f"Ours, seed {cfg.seed} ({plots.data_label(exp)})")
plots.save_figure(fig, FIG / "02_alpha.png")
fig'''),
    (MD, """\
## Test results of each head
`f` is the fused prediction (the model's output), `s` and `t` the heads of `G_s` and `G_t` on their own.
Rows are the true classes, columns the predicted ones. Macro-F1 and the quadratic-weighted kappa (which
counts a normal-vs-osteoporosis mistake worse than a neighbouring one) complete the accuracy."""),
    (CODE, '''\
heads = {"f": "F (fused)", "s": "G_s on x_s", "t": "G_t on x_t"}
fig = plots.confusion({name: result.test[h]["confusion_matrix"] for h, name in heads.items()}, osteo.LABELS,
                      title=f"Ours on the test split ({plots.data_label(exp)}, profile {exp.profile.name})")
plots.save_figure(fig, FIG / "02_confusion.png")
display(fig)
pd.DataFrame({name: {k: result.test[h][k] for k in ("accuracy", "macro_f1", "qw_kappa")} for h, name in heads.items()}).T.round(3)'''),
    (MD, """\
## The checkpoint
The trained weights are in the run folder (the path is relative to the project). `osteo.load_model`
rebuilds the network from it, for prediction (`osteo predict`) or Grad-CAM (notebook 08); `exp.model`
above called it for us."""),
    (CODE, '''\
ckpt = exp.run_dir(cfg) / "checkpoint.pt"
print(f"checkpoint: {plots.shown_path(ckpt)} ({ckpt.stat().st_size / 1e6:.0f} MB)")
print(f"{type(model).__name__} with {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; alpha = {float(model.alpha):.3f}")'''),
    (MD, """\
## Try this
1. Train with a stronger dissimilarity loss: `exp.run(exp.config(**dict(OURS, lam=0.5)))` and compare the
   `dis` curve and the accuracy.
2. Train longer: `exp.run(exp.config(**OURS, epochs=2 * exp.profile.epochs))`. Does alpha keep moving?"""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("model, data, result")),
]


# ------------------------------------------------------------------------------------------------
def table_notebook(num: str, name: str, title: str, shows: str, explain: str, after: list, times, try_this: str,
                   extra_cleanup: str = "") -> list:
    return [
        (MD, header(f"{num} · {title}", shows,
                    "the data of notebook 00; trains every configuration the table needs that is not yet in the cache "
                    "(on a CUDA GPU when there is one).", *times)),
        (PARAMS, PARAMETERS),
        (MD, "## Setup"),
        (CODE, SETUP),
        (CODE, EXPERIMENTS),
        (MD, explain),
        (CODE, f'''\
for label, overrides, paper in TABLES["{name}"]["rows"]:
    print(f"{{label:28s}} paper {{paper:.2f}} %   config: {{overrides}}")'''),
        (MD, "## Run (or load) every row, for every seed of the profile"),
        (CODE, f'''\
{name} = exp.table("{name}")  # also saved to results/<profile>/tables/{name}.csv and .json
{name}[plots.TABLE_COLUMNS]'''),
        (MD, SYNTHETIC_NOTE + "\n\n" + TABLE_READING),
        (CODE, f'''\
fig = plots.table_bars({name}, title=TABLES["{name}"]["title"], ours_label=f"reproduced ({{plots.data_label(exp)}}, profile {{exp.profile.name}})")
plots.save_figure(fig, FIG / "{name}.png")
fig'''),
        *after,
        (MD, "## Try this\n" + try_this),
        (MD, CLEANUP_MD),
        (CODE, cleanup(name + extra_cleanup)),
    ]


COMPARE = '''\
def compare(df, a, b):
    """Is row a above row b, and by more than the intervals allow?"""
    ra, rb = df.set_index("model").loc[a], df.set_index("model").loc[b]
    apart = ra["ci95_low"] > rb["ci95_high"] or rb["ci95_low"] > ra["ci95_high"]
    print(f"{a}: {ra['acc']:.2f} % [{ra['ci95_low']:.1f}, {ra['ci95_high']:.1f}] vs {b}: {rb['acc']:.2f} % "
          f"[{rb['ci95_low']:.1f}, {rb['ci95_high']:.1f}] -> difference {ra['acc'] - rb['acc']:+.2f} points; "
          f"{'intervals do not overlap' if apart else 'the intervals overlap: within noise'}")'''

NOTEBOOKS["03_ablation_dissimilarity"] = table_notebook(
    "03", "table2", "Table 2: ablation (one view, two views, dissimilarity loss)",
    "the paper's ablation study: ResNet18+ACM on `x_s` alone and on `x_t` alone, the twin network without "
    "the dissimilarity loss (Ours - L_dis) and with it (Ours), each beside the paper's accuracy.",
    """\
## The four rows
1. **ResNet18+ACM on `x_s` alone** and 2. **on `x_t` alone**: one network, one view.
3. **Ours - L_dis**: the twin network (both views, learned alpha) with λ = 0.
4. **Ours**: the same with the dissimilarity loss, λ = 0.1.

The paper: 64.00 → 68.44 → 74.00 → 77.11 %. Its claims: two views beat one, and the dissimilarity loss adds
about three points. With 900 test slices the 95 % interval is about ±2.7 points, so the last step is
within noise even in the paper; notebook 09 tests it pairwise (McNemar).""",
    [
        (MD, "## Did the paper's ordering hold here?"),
        (CODE, COMPARE + '''

compare(table2, "Ours", "Ours - L_dis")
compare(table2, "Ours - L_dis", "ResNet18+ACM (x_t alone)")
compare(table2, "ResNet18+ACM (x_t alone)", "ResNet18+ACM (x_s alone)")'''),
    ],
    ("15 s", "2 min", "about 20 min"),
    """\
1. Is λ = 0.1 a good choice? Train `exp.run_seeds(**dict(OURS, lam=0.3))` and compare with the `Ours` row.
2. `dis` is cos(g_s, g_t): 1 when the two feature vectors point the same way, 0 when orthogonal. Compare its
   last value with and without the loss: `exp.run(exp.config(**OURS)).history[-1]["loss_dis"]` and the same
   with `OURS_NO_DIS`. Does λ = 0.1 actually push the features apart?""",
)

NOTEBOOKS["04_ensemble_perspective"] = table_notebook(
    "04", "table3", "Table 3: the ensemble perspective (which views should the twins read?)",
    "whether the gain of the twin network comes from having two networks (an ensemble) or from their "
    "reading two different views: the twin trained on (x_s, x_s), (x_t, x_t) and (x_s, x_t), all without "
    "the dissimilarity loss.",
    """\
## The three rows
All three are the twin network with a learned alpha and λ = 0 (no dissimilarity loss). Only the inputs
differ: both branches read `x_s`, both read `x_t`, or one each (the proposed pairing, = "Ours - L_dis" of
Table 2, so it comes from the cache). The paper: 63.89, 66.67 and 74.00 %: two networks on the same view
are no better than one network (Table 2), so the views, not the doubling, make the difference.""",
    [
        (CODE, COMPARE + '''

compare(table3, "twin, inputs (x_s, x_t)", "twin, inputs (x_t, x_t)")
compare(table3, "twin, inputs (x_s, x_t)", "twin, inputs (x_s, x_s)")'''),
    ],
    ("15 s", "2 min", "about 15 min"),
    """\
1. Add a row with the dissimilarity loss on the same view: `exp.run_seeds(**dict(OURS, inputs=("t", "t")))`.
   Can L_dis alone make two copies of one view useful?""",
)

NOTEBOOKS["05_alpha_fusion"] = table_notebook(
    "05", "table4", "Table 4: the fusion weight alpha (fixed or learned)",
    "the twin network with the dissimilarity loss and alpha fixed at 0.1, 0.3, 0.5, 0.7, 0.9 or learned "
    "(Ours); and where the learned alpha ends in each seed.",
    """\
## The six rows
In Eq. (2), `g = alpha * g_s + (1 - alpha) * g_t`. Five rows fix alpha; the last learns it from 0.5 (Ours,
from the cache). The paper: 74.00, 73.00, 74.22, 73.56, 71.22 and 77.11 % (learned). Note that the fixed
values differ among themselves by less than the 95 % interval.""",
    [
        (MD, "## The learned alpha\nWhere alpha ends, per seed, and its path over the epochs of the first seed."),
        (CODE, '''\
ours = exp.run_seeds(**OURS)
print("learned alpha per seed:", {r.config["seed"]: round(r.alpha, 3) for r in ours})
fig = plots.alpha_curve(ours[0].history, title=f"Ours, seed {ours[0].config['seed']} ({plots.data_label(exp)})")
plots.save_figure(fig, FIG / "05_alpha_learned.png")
fig'''),
    ],
    ("30 s", "5 min", "about 35 min"),
    """\
1. Is the best fixed alpha near the learned one? Plot `table4["acc"]` of the fixed rows against alpha.
2. Initialise the learned alpha at 0.9 (`exp.run(exp.config(**dict(OURS, alpha=0.9)))`): does it end where
   it ended from 0.5?""",
    extra_cleanup=", ours",
)

NOTEBOOKS["06_baselines"] = table_notebook(
    "06", "table5", "Table 5: baselines on x_t, and a clinical reference",
    "six published networks trained on `x_t` (ResNet18, ResNet18+ACM, Xception, Inception-v3, "
    "EfficientNet-b0, ViT-B/16) beside Ours; and, as a clinical reference the paper does not have, a "
    "threshold rule on the mean trabecular HU as radiologists use for opportunistic screening.",
    """\
## The seven rows
Each baseline reads `x_t` only, with the same training recipe (Inception-v3 and Xception read 299 px
inputs scaled with the profile, the others the profile's size; ViT-B/16 trains for 500 epochs in the paper
profile, as in the paper). The paper: ResNet18 66.67, ResNet18+ACM 68.44, Xception 69.22, Inception-v3
68.77, EfficientNet-b0 72.11, ViT-B/16 55.67 and Ours 77.11 %. ViT-B/16 is far behind: transformers need
much more data (or pretraining) than 3600 slices.""",
    [
        (MD, """\
## A clinical reference: a threshold on mean trabecular HU
Opportunistic CT screening measures the mean HU of trabecular bone and applies thresholds. The kit fits two
thresholds (normal/osteopenia and osteopenia/osteoporosis) on the *training* split's trabecular HU and
applies them to the *test* split, the same test slices as the networks. This needs the per-slice
`trabecular_hu` that the synthetic manifest records; a real manifest does not have it (you would have to
measure it in a region of interest), so on real data this row is skipped."""),
        (CODE, '''\
df = osteo.load_manifest(exp.manifest())
if "split" not in df.columns:  # as exp.data() does when the manifest has no split
    df = osteo.split_patients(df, test_fraction=0.2, seed=0)
train_df, test_df = df[df["split"] == "train"], df[df["split"] == "test"]
assert sorted(test_df["path"]) == sorted(exp.data().test.path), "the rule must see the networks' test slices"'''),
        (CODE, '''\
if "trabecular_hu" in df.columns:
    pred, (t_low, t_high) = osteo.synthetic.threshold_rule(train_df, test_df, column="trabecular_hu", return_thresholds=True)
    k, n = int((pred == test_df["y"].to_numpy()).sum()), len(test_df)
    lo, hi = osteo.metrics.wilson_interval(k, n)
    clinical = pd.DataFrame([{"model": "threshold on mean trabecular HU", "paper_acc": None, "acc": round(100 * k / n, 2),
                              "ci95_low": round(100 * lo, 2), "ci95_high": round(100 * hi, 2), "n_test": n,
                              "thresholds_hu": f"osteoporosis <= {t_low:.0f} < osteopenia <= {t_high:.0f} < normal", "data": plots.data_label(exp)}])
    exp.save_table("clinical", clinical)
    display(clinical)
else:
    clinical = None
    print("skipped: this manifest has no trabecular_hu column (real data); the clinical row needs the mean "
          "trabecular HU of each slice, measured in a region of interest")'''),
        (CODE, '''\
both = pd.concat([table5, clinical]) if clinical is not None else table5
fig = plots.table_bars(both, title="Table 5 and a clinical reference", ours_label=f"reproduced ({plots.data_label(exp)}, profile {exp.profile.name})")
plots.save_figure(fig, FIG / "table5_clinical.png")
fig'''),
        (MD, """\
On synthetic data the trabecular HU is known exactly (no region to draw, no contrast or scanner
calibration to correct), so the threshold rule is stronger here than in a clinic. If a network does not
beat it, it has learned little beyond the mean brightness of the bone."""),
    ],
    ("30 s", "6 min", "about 1.5-2 h (ViT-B/16: 500 epochs, three seeds, at an assumed 1,300-2,000 images/s)"),
    """\
1. Which baseline is closest to Ours here, and is the gap larger than the intervals?
2. Fit the threshold rule on `dxa_tscore` instead (`column="dxa_tscore"`): the labels come from DXA, so
   this should be nearly perfect. Why is it not perfect?""",
    extra_cleanup=", df, train_df, test_df, clinical, both",
)

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["07_classwise_accuracy"] = [
    (MD, header(
        "07 · Fig. 3: class-wise accuracy of G_s and G_t",
        "the paper's Fig. 3: the test accuracy of each class for the two branches of the twin network on "
        "their own (heads `s` and `t` of Ours), for each seed.",
        "Ours, trained in notebook 02/03 (trained here if missing).",
        "7 s", "6 s (cached)", "about 10 s (cached)")),
    (PARAMS, PARAMETERS),
    (MD, "## Setup"),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, """\
## What the paper shows
Fig. 3 compares the per-class accuracy of `G_s` (the branch on `x_s`) and `G_t` (on `x_t`). The paper's
reading: the two are similar on osteoporosis but differ on the other classes; `G_s` is worst on normal,
`G_t` best on normal. The two branches make different mistakes, which is what makes their fusion useful.
The paper gives the figure only as bars, without numbers, so we compare the pattern, not the values."""),
    (CODE, '''\
results = exp.run_seeds(**OURS)
fig3 = exp.fig3_table()  # per-class accuracy (%) of each head, per seed; saved to results/<profile>/tables/
fig3'''),
    (MD, SYNTHETIC_NOTE),
    (CODE, '''\
fig = plots.classwise_bars(results, title=f"Fig. 3 reproduced ({plots.data_label(exp)}, profile {exp.profile.name})")
plots.save_figure(fig, FIG / "fig3.png")
fig'''),
    (MD, "## Does the paper's pattern hold here?"),
    (CODE, '''\
acc = plots.classwise_accuracy(results)
print("G_s is worst on normal:", min(acc["s"], key=acc["s"].get) == "normal")
print("G_t is best on normal:", max(acc["t"], key=acc["t"].get) == "normal")
n_class = int(np.bincount(results[0].y_true).min())
gap = abs(acc["s"]["osteoporosis"] - acc["t"]["osteoporosis"])
print(f"G_s and G_t differ on osteoporosis by {gap:.1f} points; with {n_class} test slices per class "
      f"a 95 % interval on a class accuracy is up to ±{98 / n_class ** 0.5:.0f} points")'''),
    (MD, """\
## Try this
1. Where do the two heads disagree? Compare `results[0].predictions["s"]` and `["t"]` slice by slice, and
   count how often the fused head `f` sides with each.
2. Do the same for "Ours - L_dis" (`exp.run_seeds(**OURS_NO_DIS)`): does the dissimilarity loss make the
   two branches differ more?"""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("results, fig3")),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["08_gradcam"] = [
    (MD, header(
        "08 · Fig. 4: Grad-CAM of ResNet18+ACM, G_s and G_t",
        "the paper's Fig. 4: where in the slice each network looks when it predicts the true class, for a "
        "few test slices of each class: ResNet18+ACM on `x_t`, and the two branches of Ours (`G_s` on `x_s`, "
        "`G_t` on `x_t`).",
        "the trained ResNet18+ACM (x_t) and Ours of notebooks 02-06 (trained here if missing).",
        "9 s", "8 s", "about 30 s")),
    (PARAMS, PARAMETERS + "\nn_per_class = 2  # test slices shown per class"),
    (MD, "## Setup"),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, """\
## Grad-CAM in two sentences
Grad-CAM takes the feature maps of a network's last convolutional block and weighs each map by how much
the score of a class rises when that map rises (the mean gradient). The weighted sum, rectified and
scaled to [0, 1], shows which regions raised the score; we overlay it on the slice (red: most).
The target layer is the last block of `layer4` of each backbone, as in the paper."""),
    (CODE, '''\
cfg_acm, cfg_ours = exp.config(model="resnet18_acm", inputs=("t",)), exp.config(**OURS)
acm_net, _ = exp.model(cfg_acm)  # the trained network: from the cache, or trained now
twin, _ = exp.model(cfg_ours)'''),
    (CODE, '''\
test = exp.data().test
idx = [i for c in range(len(osteo.LABELS)) for i in torch.nonzero(test.y == c)[:n_per_class, 0].tolist()]
hu, target = test.hu[idx], test.y[idx]
x_s, x_t = osteo.windowing.to_network_input(hu, "s"), osteo.windowing.to_network_input(hu, "t")'''),
    (CODE, '''\
cam_acm = osteo.grad_cam(acm_net, osteo.models.gradcam_layer(acm_net), x_t, target=target)
cam_s = osteo.grad_cam(lambda a, b: twin(a, b).logits_s, twin.G_s.layer4[-1], x_s, x_t, target=target)
cam_t = osteo.grad_cam(lambda a, b: twin(a, b).logits_t, twin.G_t.layer4[-1], x_s, x_t, target=target)
print(f"{len(idx)} slices; maps {tuple(cam_s.shape)}, values in [{float(cam_s.min()):.1f}, {float(cam_s.max()):.1f}]")'''),
    (MD, """\
Each row is one test slice (its true class on the left); the columns are the slice in `x_t`, then the map
of ResNet18+ACM on `x_t`, of `G_s` on `x_s` and of `G_t` on `x_t`."""),
    (CODE, '''\
grey_s, grey_t = osteo.window(hu, osteo.HU_MIN_S).numpy(), osteo.window(hu, osteo.HU_MIN_T).numpy()
images = [[grey_t[i], grey_t[i], grey_s[i], grey_t[i]] for i in range(len(idx))]
cams = [[None, cam_acm[i].numpy(), cam_s[i].numpy(), cam_t[i].numpy()] for i in range(len(idx))]
rows = [f"{osteo.LABELS[int(y)]} #{k % n_per_class + 1}" for k, y in enumerate(target)]
fig = plots.gradcam_grid(images, cams, rows, ["slice (x_t)", "ResNet18+ACM (x_t)", "G_s (x_s)", "G_t (x_t)"],
                         title=f"Fig. 4 reproduced ({plots.data_label(exp)}, profile {exp.profile.name})")
plots.save_figure(fig, FIG / "fig4.png")
fig'''),
    (MD, """\
And what each network predicted for these slices (Grad-CAM above explains the *true* class, whatever the
prediction):"""),
    (CODE, '''\
with torch.no_grad():
    out = twin(x_s, x_t)
    preds = {"ResNet18+ACM": acm_net(x_t), "G_s": out.logits_s, "G_t": out.logits_t, "Ours (F)": out.logits_f}
pd.DataFrame({"true": [osteo.LABELS[int(y)] for y in target],
              **{k: [osteo.LABELS[int(p)] for p in v.argmax(1)] for k, v in preds.items()}}, index=rows)'''),
    (MD, """\
**The paper's reading** of its Fig. 4: the twin's branches concentrate on the vertebra more than
ResNet18+ACM, which (for osteoporosis) also weighs regions outside the spine, and `G_s` and `G_t` look at
different regions. With the `smoke` profile (2 epochs) the maps are close to noise; look at them after the
`laptop` or `paper` profile. Grad-CAM is at the resolution of `layer4` (1/32 of the input: 2 x 2 cells
at the laptop profile's 64 px, 7 x 7 at 224 px), so maps are coarse. A map that stays dark everywhere
is an answer too: no region raised the score of that class (the ReLU of Grad-CAM removes negative
evidence), which is what happens for a class the network rarely predicts, often osteopenia."""),
    (MD, """\
## Try this
1. Explain the *predicted* class instead of the true one: `target=out.logits_f.argmax(1)`.
2. Measure how much of each map falls on bone: `(cam_s * (hu > 150)).sum((1, 2)) / cam_s.sum((1, 2))`;
   is it higher for `G_s` or for ResNet18+ACM?"""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("acm_net, twin, test, hu, x_s, x_t, cam_acm, cam_s, cam_t, out, preds")),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["09_report"] = [
    (MD, header(
        "09 · The report: every table beside the paper's",
        "every reproduced table (2-5) beside the paper's numbers, with 95 % intervals, seeds and the gap; a "
        "paired test (McNemar) of Ours against Ours - L_dis on the same test slices; and `REPORT.md`, which "
        "collects it all (with the clinical reference and Fig. 3's numbers).",
        "the results of notebooks 03-07 (with `train_missing = True`, the default, any run still missing is "
        "trained here, so this notebook alone reproduces every table; `osteo reproduce --tables ...` sets it "
        "to False and reports only the tables whose runs are all done).",
        "6 s (cached)", "6 s (cached)", "about 10 s (cached)")),
    (PARAMS, PARAMETERS + "\ntrain_missing = True  # False: report only the tables whose runs are all in the cache"),
    (MD, "## Setup"),
    (CODE, SETUP),
    (CODE, EXPERIMENTS),
    (MD, SYNTHETIC_NOTE + "\n\n" + TABLE_READING),
    (CODE, '''\
missing = {} if train_missing else {name: exp.missing([name]) for name in TABLES}  # runs not in the cache
tables = {name: exp.table(name) for name in TABLES if not missing.get(name)}  # trains what is missing, if asked
for name, t in tables.items():
    print(TABLES[name]["title"])
    display(t[plots.TABLE_COLUMNS + (["alpha"] if name == "table4" else [])])
for name, runs in missing.items():
    if runs:
        print(f"{TABLES[name]['title']}: not run yet ({len(runs)} runs missing; `osteo reproduce --tables {name}` makes it)")'''),
    (MD, r"""
## A paired test: Ours vs Ours - L_dis
Both models classify the *same* test slices, so the right test compares them slice by slice rather than
comparing two intervals. McNemar's test looks only at the slices where they disagree: `b` slices Ours gets
right and Ours - L_dis wrong, `c` the reverse. If the dissimilarity loss made no difference, `b` and `c`
would be equally likely; the exact two-sided p-value says how surprising the observed split is. One test
per seed (the paper reports a single run)."""),
    (CODE, '''\
# one row per seed; b, c: the slices only Ours / only Ours - L_dis gets right (Table 2's runs)
mcnemar = exp.mcnemar_table() if "table2" in tables else "Table 2 not run yet"
mcnemar'''),
    (MD, """\
A p-value above 0.05 means these test slices cannot tell the two models apart. For scale: the paper's
3.11-point gain on 900 slices is 28 slices net; McNemar's test would call that significant (p < 0.05) only
if the two models disagreed on fewer than about 200 slices, a number the paper does not report."""),
    (MD, "## REPORT.md\nEverything above, written to `results/<profile>/REPORT.md` (also `osteo report --profile P`)."),
    (CODE, '''\
from IPython.display import Markdown
from osteo.report import write_report

report = write_report(exp.out)
print(f"written: {plots.shown_path(report)}")
Markdown(report.read_text())'''),
    (MD, """\
## Try this
1. Run the batch with another profile (`osteo reproduce --profile laptop`) and compare the two reports: which
   conclusions survive more data and epochs?
2. Pool the seeds for McNemar: for each seed, `r = exp.run(exp.config(seed=seed, **OURS))` gives
   `np.asarray(r.predictions["f"]) == np.asarray(r.y_true)`, the slices Ours gets right; do the same for
   `OURS_NO_DIS`, concatenate over seeds and call `osteo.mcnemar(right_ours, right_no_dis)`. Is the pooled
   test more decisive than each seed's?"""),
    (MD, CLEANUP_MD),
    (CODE, cleanup("tables, mcnemar")),
]


def build_notebook(stem: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        cid = f"{stem[:2]}-{i:02d}"
        text = text.strip("\n")
        if kind == MD:
            cell = new_markdown_cell(text, id=cid)
        else:
            cell = new_code_cell(text, id=cid)
            if kind == PARAMS:
                cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv=None) -> int:
    for stem, cells in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        nbformat.write(build_notebook(stem, cells), path)
        print(f"wrote notebooks/{path.name} ({len(cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
