# %% [markdown]
# # Solutions: notebook 10, protocol pitfalls and the twin's starting weights

# %%
import warnings

import numpy as np

import osteo
from osteo import notebook, plots
from osteo.experiments import OURS, OURS_NO_DIS

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())
FIG = exp.out / "figures" / "solutions"
NET = dict(model="resnet18_acm", inputs=("t",))

# %% [markdown]
# ## Exercise 1: reporting the best seed
# Three seeds of the same network on the same test patients. Reporting the best of them is model
# selection on the test set, like the best epoch: its gain over the mean is what the choice adds,
# not what the network can do. The paired test of the best seed against the worst says whether the
# seeds' spread is larger than the test set's noise.

# %%
runs = [exp.run(exp.config(seed=s, **NET)) for s in (0, 1, 2)]
accs = np.array([100 * r.accuracy for r in runs])
print("accuracy per seed (%):", np.round(accs, 1))
print(f"best seed {accs.max():.1f} %, mean {accs.mean():.1f} %: reporting the best adds {accs.max() - accs.mean():.1f} points")
best, worst = runs[int(accs.argmax())], runs[int(accs.argmin())]
c = osteo.compare(best.y_true, best.predictions["main"], worst.predictions["main"], best.test_patient_id)
print(f"best minus worst seed: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")

# %% [markdown]
# ## Exercise 2: L_dis on one view, from a shared start
# From a shared start the (x_s, x_s) twin begins as one network twice (cosine 1). Without L_dis only
# the heads make the copies drift apart; with it, the loss pushes them apart. The cosine curves show
# how far each gets; the paired test says whether the accuracy changed beyond the test set's noise.

# %%
same_view = dict(OURS_NO_DIS, inputs=("s", "s"), init="shared")
without = exp.run_seeds(**same_view)
with_dis = exp.run_seeds(**dict(OURS, inputs=("s", "s"), init="shared"))
for label, rs in (("without L_dis", without), ("with L_dis", with_dis)):
    print(f"(x_s, x_s), shared start, {label:13s}: cos {rs[0].history[0]['cos_start']:.3f} before training, "
          f"{rs[0].history[-1]['loss_dis']:.3f} in the last epoch; accuracy {100 * np.mean([r.accuracy for r in rs]):.1f} %")
c = osteo.compare_seeds(with_dis[0].y_true, [r.predictions["f"] for r in with_dis], [r.predictions["f"] for r in without],
                        with_dis[0].test_patient_id)
print(f"with minus without L_dis: {100 * c.diff:+.1f} points (95 % CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}), p = {c.p:.2f}")
fig = plots.cosine_curves({"(x_s, x_s) shared, without L_dis": without, "(x_s, x_s) shared, with L_dis": with_dis})
print("saved", notebook.shown_path(plots.save_figure(fig, FIG / "10_cosine_one_view.png")))
