"""plasticity_probe: layer-wise plasticity diagnostics and successive regularization for any
``torch.nn.Module``. See ``docs/`` and DESIGN.md for the definitions."""

from plasticity_probe.gradients import distance_from_init, grad_dormant_fraction, grad_norm, grad_to_weight_ratio
from plasticity_probe.hessian import (
    ConvergenceWarning,
    HessianSpectrum,
    SpectralDensity,
    frozen_closure_state,
    hessian_spectrum,
)
from plasticity_probe.interventions import (
    InterventionSchedule,
    LayerReset,
    ReDo,
    ResetRecord,
    reset_layers,
    shrink_perturb,
)
from plasticity_probe.layers import Args, LayerInfo, ParamGroup, SkippedModule, discover_layers
from plasticity_probe.metrics import (
    NonFiniteWarning,
    dead_unit_fraction,
    dormant_fraction,
    effective_rank,
    feature_norm,
    feature_rank,
    mean_abs_weight,
    srank,
    stable_rank,
    weight_magnitude,
    zero_fraction,
)
from plasticity_probe.probe import Probe
from plasticity_probe.regularizers import (
    Penalty,
    SuccessiveRegularizer,
    l1_penalty,
    l2_penalty,
    l2init_penalty,
    singular_penalty,
)
from plasticity_probe.report import GroupRecord, LayerRecord, Report
from plasticity_probe.sinks import CsvSink, JsonlSink, TensorBoardSink
from plasticity_probe.trainability import TrainabilityResult, trainability

__version__ = "0.1.0"

__all__ = [
    "Args",
    "ConvergenceWarning",
    "CsvSink",
    "GroupRecord",
    "HessianSpectrum",
    "InterventionSchedule",
    "JsonlSink",
    "LayerInfo",
    "LayerRecord",
    "LayerReset",
    "NonFiniteWarning",
    "ParamGroup",
    "Penalty",
    "Probe",
    "ReDo",
    "Report",
    "ResetRecord",
    "SkippedModule",
    "SpectralDensity",
    "SuccessiveRegularizer",
    "TensorBoardSink",
    "TrainabilityResult",
    "__version__",
    "dead_unit_fraction",
    "discover_layers",
    "distance_from_init",
    "dormant_fraction",
    "effective_rank",
    "feature_norm",
    "feature_rank",
    "frozen_closure_state",
    "grad_dormant_fraction",
    "grad_norm",
    "grad_to_weight_ratio",
    "hessian_spectrum",
    "l1_penalty",
    "l2_penalty",
    "l2init_penalty",
    "mean_abs_weight",
    "reset_layers",
    "shrink_perturb",
    "singular_penalty",
    "srank",
    "stable_rank",
    "trainability",
    "weight_magnitude",
    "zero_fraction",
]
