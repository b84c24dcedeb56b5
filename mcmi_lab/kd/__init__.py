"""The KD methods of the CRD benchmark as objectives for :func:`mcmi_lab.training.loop.fit`, and ``distill`` to run one.

Every method trains the student on ``ce_weight · CE + kd_weight · KD_T + beta · L_method`` (RepDistiller's
``gamma · cls + alpha · div + beta · kd``) with RepDistiller's defaults (``scripts/run_cifar_distill.sh``: CE weight 1,
KD weight 0 and the method weight beta of each class; Hinton KD: 0.1 CE + 0.9 KD at T = 4). The method losses are
the pure functions of :mod:`mcmi_lab.losses.feature`; the objectives only pick the features, build the connectors
(regressors, embeddings, the CRD memory bank) and weigh the terms.

Where things live:

- :mod:`mcmi_lab.kd.base`: the feature capture (hooks on the zoo's ``feature_layers`` / ``classifier_layer`` or on
  ``student_layers`` / ``teacher_layers``), the connectors :class:`ConvRegressor` and :class:`Embed` (and FT's conv
  stacks), and :class:`DistillObjective`, the base of every feature method, with the shape checks they share;
- :mod:`mcmi_lab.kd.methods`: FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST and KDSVD;
- :mod:`mcmi_lab.kd.review`: ReviewKD (attention-based fusion of the student's levels, hierarchical context loss);
- :mod:`mcmi_lab.kd.logit`: the logit methods DKD, DIST, CTKD (learnable temperature) and MLKD, and the
  ``logit_standardization`` option (also of Hinton KD);
- :mod:`mcmi_lab.kd.contrastive`: CRD (embeddings, memory banks, negatives, NCE);
- :mod:`mcmi_lab.kd.registry`: :data:`KD_METHODS` (with Hinton KD, :func:`mcmi_lab.training.objectives.kd_objective`, and
  the no-KD baseline ``ce``), :func:`method_hparams`, :func:`build_objective` and :func:`distill`.

Tian et al., Contrastive Representation Distillation, https://arxiv.org/abs/1910.10699, and its code
(github.com/HobbitLong/RepDistiller); Zhao et al., Decoupled KD, https://arxiv.org/abs/2203.08679 (mdistiller).
"""
from .base import ConvRegressor, DistillObjective, Embed
from .contrastive import CRDObjective
from .logit import CTKDObjective, DISTObjective, DKDObjective, LogitObjective, MLKDObjective
from .methods import (ABObjective, ATObjective, CCObjective, FitNetObjective, FSPObjective, FTObjective, KDSVDObjective,
                      NSTObjective, PKTObjective, RKDObjective, SPObjective, VIDObjective)
from .review import ReviewKDObjective
from .registry import KD_METHODS, build_objective, ce_objective, distill, method_hparams

__all__ = [
    "KD_METHODS", "build_objective", "distill", "method_hparams", "ce_objective",
    "DistillObjective", "ConvRegressor", "Embed",
    "FitNetObjective", "ATObjective", "SPObjective", "CCObjective", "VIDObjective", "RKDObjective", "PKTObjective",
    "ABObjective", "FTObjective", "FSPObjective", "NSTObjective", "CRDObjective", "DKDObjective",
    "KDSVDObjective", "ReviewKDObjective", "LogitObjective", "DISTObjective", "CTKDObjective", "MLKDObjective",
]
