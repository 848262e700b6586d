# %% [markdown]
# # Solutions: notebook 05, Table 4 (the fusion weight alpha)

# %%
import warnings

from matplotlib.figure import Figure

import osteo
from osteo import notebook, plots
from osteo.experiments import OURS

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())
FIG = exp.out / "figures" / "solutions"

# %% [markdown]
# ## Exercise 1: accuracy against the fixed alpha, and where the learned alpha ends
# With intervals this wide the curve is mostly noise; the question is whether the learned alpha lands
# where the fixed ones do best.

# %%
table4 = exp.table("table4", save=False)  # from the cache after notebook 05
fixed = table4[table4["model"].str.startswith("fixed alpha")]
alphas = fixed["model"].str.split("= ").str[1].astype(float)
learned = table4[table4["model"] == "learnable alpha (Ours)"].iloc[0]
fig = Figure(figsize=(5, 3.5), layout="constrained")
ax = fig.subplots()
ax.errorbar(alphas, fixed["acc"], yerr=[fixed["acc"] - fixed["ci95_low"], fixed["ci95_high"] - fixed["acc"]],
            fmt="o-", capsize=3, label="fixed alpha")
ax.axvline(learned["alpha"], color="C1", ls="--", label=f"learned alpha ends at {learned['alpha']:.3f}")
ax.set_xlabel("alpha"), ax.set_ylabel("test accuracy (%)"), ax.legend()
print("saved", notebook.shown_path(plots.save_figure(fig, FIG / "05_acc_vs_alpha.png")))
print(f"best fixed alpha here: {alphas.iloc[fixed['acc'].argmax()]}, learned alpha: {learned['alpha']:.3f}")

# %% [markdown]
# ## Exercise 2: the learned alpha started at 0.9
# Alpha gets a small gradient and a decaying learning rate, so it moves little from its start in a short run:
# compare where the two runs end, not just whether they end at the same value.

# %%
for start in (0.5, 0.9):
    r = exp.run(exp.config(**dict(OURS, alpha=start)))
    print(f"alpha from {start}: ends at {r.alpha:.4f} after {r.config['epochs']} epochs "
          f"(moved {r.alpha - start:+.4f}); test accuracy {100 * r.accuracy:.1f} %")
