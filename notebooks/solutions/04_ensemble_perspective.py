# %% [markdown]
# # Solutions: notebook 04, Table 3 (the ensemble perspective)

# %%
import warnings

import numpy as np

import osteo
from osteo import notebook
from osteo.experiments import OURS, OURS_NO_DIS, summarise

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())

# %% [markdown]
# ## Exercise 1: the dissimilarity loss on two copies of one view
# With (x_t, x_t) both branches see the same image; only L_dis and their different random starts make them
# differ. Compare the new row with (x_t, x_t) without L_dis, with a paired test on the same test slices.

# %%
runs = {"(x_t, x_t), no L_dis": exp.run_seeds(**dict(OURS_NO_DIS, inputs=("t", "t"))),
        "(x_t, x_t), with L_dis": exp.run_seeds(**dict(OURS, inputs=("t", "t"))),
        "(x_s, x_t), with L_dis (Ours)": exp.run_seeds(**OURS)}
for label, results in runs.items():
    row = summarise(label, results, None)
    print(f"{label:30} {row['acc']:.2f} % [{row['ci95_low']:.1f}, {row['ci95_high']:.1f}]; "
          f"last-epoch cos(g_s, g_t) {np.mean([r.history[-1]['loss_dis'] for r in results]):+.3f}")
a, b = runs["(x_t, x_t), with L_dis"], runs["(x_t, x_t), no L_dis"]
c = osteo.compare_seeds(a[0].y_true, [r.predictions["f"] for r in a], [r.predictions["f"] for r in b], a[0].test_patient_id)
print(f"with minus without L_dis on (x_t, x_t): {100 * c.diff:+.1f} points "
      f"(95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")
