# %% [markdown]
# # Solutions: notebook 01, preprocessing (Eq. 1)

# %%
import warnings

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import osteo
from osteo import notebook, plots

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())
FIG = exp.out / "figures" / "solutions"
df = osteo.load_manifest(exp.manifest())
slice_hu, _ = osteo.read_hu(df[df["label"] == "normal"]["path"].iloc[0])
if "trabecular_hu" in df.columns:
    class_hu = df.groupby("label")["trabecular_hu"].mean().reindex(list(osteo.LABELS))
else:  # real data: the literature means notebook 01 uses
    class_hu = pd.Series([178.0, 143.0, 118.0], index=list(osteo.LABELS))

# %% [markdown]
# ## Exercise 1: a third, "bone marrow" window (HU 50 to 400)
# A narrower window spends the 256 grey levels on fewer HU, so the classes lie more grey levels apart; the
# price is that everything below 50 HU (fat, muscle) is black and everything above 400 HU white.

# %%
windows = {"x_s": (osteo.HU_MIN_S, osteo.HU_MAX), "x_t": (osteo.HU_MIN_T, osteo.HU_MAX), "marrow": (50, 400)}
fig = Figure(figsize=(9, 3.2), layout="constrained")
for ax, (name, (lo, hi)) in zip(fig.subplots(1, 3), windows.items()):
    ax.imshow(osteo.window(slice_hu, lo, hi), cmap="gray", vmin=0, vmax=255)
    ax.set_title(f"{name}: HU {lo:.0f} to {hi:.0f}"), ax.set_axis_off()
print("saved", notebook.shown_path(plots.save_figure(fig, FIG / "01_three_windows.png")))
gaps = pd.DataFrame({name: -np.diff(osteo.window(class_hu.to_numpy(), lo, hi).astype(float))
                     for name, (lo, hi) in windows.items()},
                    index=[f"{a} to {b}" for a, b in zip(osteo.LABELS[:-1], osteo.LABELS[1:])])
print("grey levels between neighbouring class means:")
print(gaps.round(2))

# %% [markdown]
# ## Exercise 2: 8-bit grey levels in the trabecular bone
# Here "inside the vertebral body" is approximated by the pixels between 50 and 400 HU (trabecular bone and
# marrow; it also catches some muscle edge). The kit's float window keeps one grey value per distinct HU value;
# 8 bits merge about 4.5 HU into one level of `x_s`.

# %%
inside = (slice_hu > 50) & (slice_hu < 400)
x_s = osteo.window(slice_hu, osteo.HU_MIN_S)
print(f"{inside.sum()} pixels between 50 and 400 HU: {len(np.unique(x_s[inside]))} distinct float grey values, "
      f"{len(np.unique(np.floor(x_s[inside])))} distinct 8-bit grey levels")
