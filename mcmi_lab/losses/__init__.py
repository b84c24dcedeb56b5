"""Pure loss functions: the teacher losses (MCMI, CMIM, NCMI, MSE), KD's logit losses and the feature-based KD losses. No training state here."""
# `mcmi_lab.losses` was one module; its public names stay importable from here
from .teacher import (  # noqa: F401
    kl_to_centroids_loss, mcmi_loss, mse_teacher_loss, cmim_loss, ncmi_loss, kd_loss,
)
