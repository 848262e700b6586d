# %% [markdown]
# # Solutions: notebook 03, Table 2 (the ablation)

# %%
import warnings

import osteo
from osteo import notebook
from osteo.experiments import OURS, OURS_NO_DIS, summarise

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())

# %% [markdown]
# ## Exercise 1: λ = 0.3 beside Ours (λ = 0.1)
# Both models are tested on the same slices, so compare them with a paired test over patients, combined
# over the seeds (`osteo.compare_seeds`); the two intervals alone cannot say which is better.

# %%
runs = {"Ours (λ = 0.1)": exp.run_seeds(**OURS), "λ = 0.3": exp.run_seeds(**dict(OURS, lam=0.3))}
for label, results in runs.items():
    row = summarise(label, results, None)
    print(f"{label:15} {row['acc']:.2f} % [{row['ci95_low']:.1f}, {row['ci95_high']:.1f}] over seeds {row['seeds']}")
c = osteo.compare_seeds(runs["Ours (λ = 0.1)"][0].y_true, [r.predictions["f"] for r in runs["Ours (λ = 0.1)"]],
                        [r.predictions["f"] for r in runs["λ = 0.3"]], runs["Ours (λ = 0.1)"][0].test_patient_id)
print(f"λ = 0.1 minus λ = 0.3: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")

# %% [markdown]
# ## Exercise 2: does λ = 0.1 push the features apart?
# `loss_dis` is cos(g_s, g_t) in the last epoch, averaged over its batches: lower with the loss than
# without it means the term did its job on the features, whatever it did to the accuracy.

# %%
for label, overrides in (("with L_dis (Ours)", OURS), ("without (Ours - L_dis)", OURS_NO_DIS)):
    r = exp.run(exp.config(**overrides))
    print(f"{label:23} cos(g_s, g_t) in the last epoch: {r.history[-1]['loss_dis']:+.3f}")
