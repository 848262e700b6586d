# %% [markdown]
# # Solutions: notebook 09, the report

# %%
import numpy as np
import pandas as pd

import osteo
from osteo.experiments import OURS, OURS_NO_DIS, project_root

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop

# %% [markdown]
# ## Exercise 1: two profiles side by side
# Run `osteo reproduce --profile laptop` (about 20 minutes on a laptop) and compare its tables with this
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
# ## Exercise 2: McNemar pooled over the seeds
# Pooling adds the discordant slices of every seed, so the test has more evidence than each seed's alone
# (the seeds share their test slices, so this is a rough pooling: the same slice counts once per seed).

# %%
right_ours, right_no_dis = [], []
for seed in exp.profile.seeds:
    ours, no_dis = exp.run(exp.config(seed=seed, **OURS)), exp.run(exp.config(seed=seed, **OURS_NO_DIS))
    y = np.asarray(ours.y_true)
    right_ours.append(np.asarray(ours.predictions["f"]) == y)
    right_no_dis.append(np.asarray(no_dis.predictions["f"]) == y)
    print(f"seed {seed}: {osteo.mcnemar(right_ours[-1], right_no_dis[-1])}")
print("pooled:", osteo.mcnemar(np.concatenate(right_ours), np.concatenate(right_no_dis)))
