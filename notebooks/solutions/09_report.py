# %% [markdown]
# # Solutions: notebook 09, the report

# %%
import warnings

import numpy as np
import pandas as pd

import osteo
from osteo import notebook
from osteo.experiments import OURS, OURS_NO_DIS, project_root

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())

# %% [markdown]
# ## Exercise 1: two profiles side by side
# Run `osteo reproduce --profile laptop` (about 16 minutes on a 2-core laptop) and compare its tables with this
# profile's. A conclusion "survives" if the order of two rows holds in both and a paired test supports it in
# the larger run; with a few dozen test slices most differences are inside the noise.

# %%
tables = {}
for profile in ("smoke", "laptop", "paper"):
    f = project_root() / "results" / profile / "tables" / "table2.csv"
    if f.exists():
        tables[profile] = pd.read_csv(f).set_index("model")["acc"]
print(pd.DataFrame(tables).round(2) if tables else "no table2.csv yet: run notebook 03 or `osteo reproduce`")

# %% [markdown]
# ## Exercise 2: one claim, per seed and over seeds
# Each seed's row tests Ours against Ours - L_dis on the same test patients. The `all` row combines the
# seeds with a two-level bootstrap (seeds, then patients): it is not narrower by sqrt(seeds), because the
# seeds share their test patients, and it widens when the seeds disagree. Never concatenate the seeds'
# predictions as if they were more test slices.

# %%
runs_a = [exp.run(exp.config(seed=seed, **OURS)) for seed in exp.profile.seeds]
runs_b = [exp.run(exp.config(seed=seed, **OURS_NO_DIS)) for seed in exp.profile.seeds]
y, groups = runs_a[0].y_true, runs_a[0].test_patient_id
for seed, a, b in zip(exp.profile.seeds, runs_a, runs_b):
    c = osteo.compare(y, a.predictions["f"], b.predictions["f"], groups)
    print(f"seed {seed}: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")
c = osteo.compare_seeds(y, [a.predictions["f"] for a in runs_a], [b.predictions["f"] for b in runs_b], groups)
print(f"all seeds: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")
spread = np.std([100 * (np.mean(np.asarray(a.predictions["f"]) == y) - np.mean(np.asarray(b.predictions["f"]) == y))
                 for a, b in zip(runs_a, runs_b)], ddof=1) if len(runs_a) > 1 else float("nan")
print(f"SD of the difference between seeds: {spread:.1f} points")
