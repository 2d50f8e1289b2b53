"""Distillation methods, keyed by the names users type: ce, kd, md, cd1, cd2, cd3, kdplus,
disk, bdistil. Each has a `Params` dataclass (the knobs, with the papers' defaults) and
`train(ctx, params) -> StudentResult`. One module per family; importing this package
registers them all."""

from . import bdistil, class_specific, disk, kd, kdplus
from .base import METHODS, Context, LossMethod, StudentResult, describe_methods, params_for
from .bdistil import Ensemble, StagedOutputs, build_ensemble, line_search
from .class_specific import in_domain_classes
from .disk import Guide, disk_delta, disk_lambda
from .kd import augmented_logits, crossfit_logits

__all__ = [
    "METHODS",
    "Context",
    "Ensemble",
    "Guide",
    "LossMethod",
    "StagedOutputs",
    "StudentResult",
    "augmented_logits",
    "bdistil",
    "build_ensemble",
    "class_specific",
    "crossfit_logits",
    "describe_methods",
    "disk",
    "disk_delta",
    "disk_lambda",
    "in_domain_classes",
    "kd",
    "kdplus",
    "line_search",
    "params_for",
]
