"""osteo-kit: an open reproduction of Choi et al. 2021, "Efficient Osteoporosis Prediction Using A
Pair of Ensemble Models" (two ResNet18+ACM networks on two HU windows of one CT slice, fused by a
learnable weight alpha; Eqs. 1-5 of the paper).
"""
from .windowing import HU_MAX, HU_MIN_S, HU_MIN_T, two_views, window
from .dicom import DicomError, iter_dicom_files, read_hu
from .manifest import LABELS, ManifestError, check_split, load_manifest, split_patients
from .privacy import IDENTIFYING_TAGS, is_synthetic_id, pseudonymize, scrub
from .synthetic import SyntheticError, debug_slice, synthesize, threshold_rule
from .acm import ACM, acm_orthogonality
from .models import MODEL_NAMES, TwinNet, TwinOutput, build_model, default_image_size, gradcam_layer, resnet18_acm
from .losses import acm_penalty, dissimilarity_loss, twin_loss, twin_loss_terms
from .gradcam import GradCAM, grad_cam
from .metrics import (Comparison, accuracy_ci, accuracy_ci_seeds, bootstrap_metrics, classification_report, compare,
                      compare_seeds, compare_unpaired, design_effect, mcnemar, min_detectable_difference)
from .data import SliceData, load_data
from .training import TrainConfig, TrainResult, evaluate, load_model, train
from .experiments import Experiments, resolve_profile

__version__ = "0.1.0"

__all__ = [
    "HU_MAX",
    "HU_MIN_S",
    "HU_MIN_T",
    "two_views",
    "window",
    "DicomError",
    "iter_dicom_files",
    "read_hu",
    "LABELS",
    "ManifestError",
    "check_split",
    "load_manifest",
    "split_patients",
    "IDENTIFYING_TAGS",
    "is_synthetic_id",
    "pseudonymize",
    "scrub",
    "SyntheticError",
    "debug_slice",
    "synthesize",
    "threshold_rule",
    "ACM",
    "acm_orthogonality",
    "MODEL_NAMES",
    "TwinNet",
    "TwinOutput",
    "build_model",
    "default_image_size",
    "gradcam_layer",
    "resnet18_acm",
    "acm_penalty",
    "dissimilarity_loss",
    "twin_loss",
    "twin_loss_terms",
    "GradCAM",
    "grad_cam",
    "Comparison",
    "accuracy_ci",
    "accuracy_ci_seeds",
    "bootstrap_metrics",
    "classification_report",
    "compare",
    "compare_seeds",
    "compare_unpaired",
    "design_effect",
    "mcnemar",
    "min_detectable_difference",
    "SliceData",
    "load_data",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_model",
    "train",
    "Experiments",
    "resolve_profile",
]
