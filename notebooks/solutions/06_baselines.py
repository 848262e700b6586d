# %% [markdown]
# # Solutions: notebook 06, Table 5 (baselines) and the clinical reference

# %%
import warnings

import numpy as np

import osteo
from osteo import notebook
from osteo.experiments import OURS, TABLES

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())

# %% [markdown]
# ## Exercise 1: the baseline closest to Ours
# "Closest" by mean accuracy; whether the gap is real is a question for a paired test on the same test
# patients, combined over the seeds (`osteo.compare_seeds`), not for the overlap of two intervals.

# %%
table5 = exp.table("table5", save=False)  # from the cache after notebook 06
ours_acc = table5.set_index("model").loc["Ours", "acc"]
baselines = table5[table5["model"] != "Ours"]
closest = baselines.iloc[(baselines["acc"] - ours_acc).abs().argmin()]
print(f"closest to Ours ({ours_acc:.2f} %): {closest['model']} ({closest['acc']:.2f} %)")
overrides = next(o for label, o, _ in TABLES["table5"]["rows"] if label == closest["model"])


a, b = exp.run_seeds(**OURS), exp.run_seeds(**overrides)
c = osteo.compare_seeds(a[0].y_true, [r.predictions[r.main_head] for r in a], [r.predictions[r.main_head] for r in b],
                        a[0].test_patient_id)
print(f"Ours minus {closest['model']}: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), "
      f"p = {c.p:.2f}")

# %% [markdown]
# ## Exercise 2: the threshold rule on the DXA T-score
# The synthetic labels are cut from the T-score (-1 and -2.5), so the rule is nearly perfect. It is not
# perfect because it learns its two thresholds from the training slices only: test T-scores that fall
# between the learned threshold and the true cut-off land in the wrong class. The misclassified slices show it.

# %%
df = osteo.load_manifest(exp.manifest())
if "dxa_tscore" in df.columns:
    split = df if "split" in df.columns else osteo.split_patients(df, test_fraction=0.2, seed=0)
    train_df, test_df = split[split["split"] == "train"], split[split["split"] == "test"]
    pred, (t_low, t_high) = osteo.threshold_rule(train_df, test_df, column="dxa_tscore", return_thresholds=True)
    truth = test_df["label"].map({lab: i for i, lab in enumerate(osteo.LABELS)}).to_numpy()
    wrong = test_df[pred != truth]
    print(f"learned thresholds {t_low:.3f} and {t_high:.3f} (the labels' cut-offs: -2.5 and -1.0); "
          f"test accuracy {100 * np.mean(pred == truth):.1f} %; wrong: {len(wrong)} slices")
    print(wrong[["label", "dxa_tscore"]].to_string())
else:
    print("this manifest has no dxa_tscore column (real data)")
