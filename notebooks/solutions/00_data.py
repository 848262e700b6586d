# %% [markdown]
# # Solutions: notebook 00, the data
# Figures go to `results/<profile>/figures/solutions/`.

# %%
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import osteo
from osteo import notebook, plots

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
FIG = exp.out / "figures" / "solutions"
df = osteo.load_manifest(exp.manifest())

# %% [markdown]
# ## Exercise 1: six slices per class
# Look at the slices, then at the number the generator kept for each: slices whose mean trabecular HU lies
# in another class's typical range are the ones a reader would put in another class.

# %%
picks = pd.concat([df[df["label"] == lab].head(6) for lab in osteo.LABELS])
fig = plots.show_slices([osteo.read_hu(p)[0] for p in picks["path"]],
                        [f"{lab} #{i % 6 + 1}" for i, lab in enumerate(picks["label"])], per_row=6)
print("saved", notebook.shown_path(plots.save_figure(fig, FIG / "00_six_per_class.png")))
if "trabecular_hu" in df.columns:
    typical = df.groupby("label")["trabecular_hu"].median()
    nearest = picks["trabecular_hu"].apply(lambda hu: (typical - hu).abs().idxmin())
    print(picks.assign(nearest_class_by_hu=nearest)[["label", "trabecular_hu", "nearest_class_by_hu"]].round(1))
    print(f"{(nearest != picks['label']).sum()} of {len(picks)} slices look more like another class by their mean HU")

# %% [markdown]
# ## Exercise 2: the best HU threshold pair
# Guess from the histograms first. The rule below (notebook 06 fits the same one) puts two thresholds
# where they classify the training slices best, then scores the test slices.

# %%
if "trabecular_hu" in df.columns:
    split = df if "split" in df.columns else osteo.split_patients(df, test_fraction=0.2, seed=0)
    train_df, test_df = split[split["split"] == "train"], split[split["split"] == "test"]
    pred, (t_low, t_high) = osteo.threshold_rule(train_df, test_df, return_thresholds=True)
    truth = test_df["label"].map({lab: i for i, lab in enumerate(osteo.LABELS)}).to_numpy()
    print(f"osteoporosis <= {t_low:.0f} HU < osteopenia <= {t_high:.0f} HU < normal: "
          f"test accuracy {100 * np.mean(pred == truth):.1f} % on {len(test_df)} slices (chance: 33 %)")

# %% [markdown]
# ## Exercise 3: a tiny synthetic set of your own
# Another seed draws other patients from the same model: the class means move by a few HU, the overlap stays.

# %%
mine = osteo.synthesize(Path(tempfile.mkdtemp()) / "mine", n_per_class=10, size=128, seed=1, progress=False)
print(mine.groupby("label")["trabecular_hu"].describe()[["count", "mean", "std"]].round(1))
fig = plots.hu_histograms(mine, column="trabecular_hu")
print("saved", notebook.shown_path(plots.save_figure(fig, FIG / "00_my_histograms.png")))
