# %% [markdown]
# # Solutions: notebook 07, Fig. 3 (class-wise accuracy of G_s and G_t)

# %%
import warnings

import numpy as np
import pandas as pd

import osteo
from osteo import notebook
from osteo.experiments import OURS, OURS_NO_DIS

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())


def disagreement(results):
    """Per seed: slices where G_s and G_t disagree, and whom the fused head F sides with there."""
    rows = []
    for r in results:
        s, t, f = (np.asarray(r.predictions[h]) for h in ("s", "t", "f"))
        differ = s != t
        rows.append({"seed": r.config["seed"], "test slices": len(s), "G_s and G_t differ": int(differ.sum()),
                     "F sides with G_s": int((differ & (f == s)).sum()),
                     "F sides with G_t": int((differ & (f == t)).sum()),
                     "F with neither": int((differ & (f != s) & (f != t)).sum())})
    return pd.DataFrame(rows)


# %% [markdown]
# ## Exercise 1: where the two heads disagree, and whom F follows
# The paper's point is that the two branches make different mistakes; the fused head F can only gain where
# they differ.

# %%
print(disagreement(exp.run_seeds(**OURS)).to_string(index=False))

# %% [markdown]
# ## Exercise 2: the same for Ours - L_dis
# If the dissimilarity loss makes the branches differ, they disagree on more slices with it than without it.
# Compare the counts on the same test slices (and mind how few they are).

# %%
print(disagreement(exp.run_seeds(**OURS_NO_DIS)).to_string(index=False))
