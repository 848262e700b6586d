# %% [markdown]
# # Solutions: notebook 08, Fig. 4 (Grad-CAM)

# %%
import warnings

import torch

import osteo
from osteo import notebook
from osteo.experiments import OURS

exp = osteo.Experiments(None)  # the profile: $OSTEO_PROFILE, else paper with a CUDA GPU, else laptop
warnings.filterwarnings("ignore", message="ImageNet weights .* not available")  # said once, in plain words:
print(notebook.weights_note())
n_per_class = 2
acm_net, _ = exp.model(exp.config(model="resnet18_acm", inputs=("t",)))  # trained in notebooks 02-06
twin, _ = exp.model(exp.config(**OURS))
test = exp.data().test
idx = [i for c in range(len(osteo.LABELS)) for i in torch.nonzero(test.y == c)[:n_per_class, 0].tolist()]
hu, target = test.hu[idx], test.y[idx]
x_s, x_t = osteo.windowing.to_network_input(hu, "s"), osteo.windowing.to_network_input(hu, "t")

# %% [markdown]
# ## Exercise 1: explain the predicted class
# Where the network is right, the map is the same as for the true class; where it is wrong, the map shows
# what made it choose the wrong class.

# %%
with torch.no_grad():
    predicted = twin(x_s, x_t).logits_f.argmax(1)
cam_true = osteo.grad_cam(lambda a, b: twin(a, b).logits_s, twin.G_s.layer4[-1], x_s, x_t, target=target)
cam_pred = osteo.grad_cam(lambda a, b: twin(a, b).logits_s, twin.G_s.layer4[-1], x_s, x_t, target=predicted)
for k, i in enumerate(idx):
    same = torch.allclose(cam_true[k], cam_pred[k])
    print(f"slice {i}: true {osteo.LABELS[int(target[k])]}, predicted {osteo.LABELS[int(predicted[k])]}; "
          f"G_s map {'unchanged' if same else 'changes'}")

# %% [markdown]
# ## Exercise 2: how much of each map lies on bone (HU > 150)
# A share near the share of bone pixels in the slice means the map is not focused on bone.

# %%
bone = (hu > 150).float()
cam_acm = osteo.grad_cam(acm_net, osteo.models.gradcam_layer(acm_net), x_t, target=target)
cams = {"ResNet18+ACM (x_t)": cam_acm, "G_s (x_s)": cam_true,
        "G_t (x_t)": osteo.grad_cam(lambda a, b: twin(a, b).logits_t, twin.G_t.layer4[-1], x_s, x_t, target=target)}
print(f"bone pixels: {100 * bone.mean():.0f} % of each slice")
for name, cam in cams.items():
    share = (cam * bone).sum((1, 2)) / cam.sum((1, 2)).clamp_min(1e-12)
    print(f"{name:19} share of the map on bone: mean {100 * share.mean():.0f} %, per slice {[round(100 * float(v)) for v in share]}")
