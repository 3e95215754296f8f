# ruff: noqa: E501  (the tables below hold one case a line)
"""Bad inputs, one case a row: the error type and the words its message must contain; a failed call changes nothing.

Every row gets a fresh model, calls one public function or callback hook on it, and checks that the call raised the
error named, with a message matching the pattern, and that the model is exactly as it was: the same state_dict
(values, NaN included, shapes and keys), the same module types under the same names, the same Parameter objects,
the same gradients and the same number of hooks. Callback arguments are checked at construction; targets,
layers and strategies that cannot work are refused at ``setup``, before the model changes.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import ManualMLP, MLPModule, assert_unchanged, snapshot, trainer
from models import low_rank_mlp, mlp, skip_mlp
from torch import nn

import lightning_bv as lbv
from lightning_bv.callbacks import LowRank, NeuronPruning, RBVRegularization, SkipConnections
from lightning_bv.functional import effective_rank, singular_values, stable_rank
from lightning_bv.functional.rbv import NonFiniteWeightsError, add_rbv_grad_, add_weight_decay_grad_
from lightning_bv.modules import BVModule, DiabetesData, DigitsData, SplineData
from lightning_bv.transforms.compact import resize_to_state_dict_

try:
    from lightning_bv.callbacks.bv_monitor import BVMonitor
except ImportError:  # pragma: no cover - the monitor is optional here
    BVMonitor = None

X = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
NAN = float("nan")
MATCH_NOTHING = r"'nope' matched no module\. A str is a regex.*Available: \["


def bn_mlp() -> nn.Module:
    """Its forward updates BatchNorm's running statistics, then fails (the last layer expects 5 features)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(5, 2))


def low_rank_middle_mlp() -> nn.Module:
    return low_rank_mlp(2, ["2"])


def low_rank_head_mlp() -> nn.Module:
    """The last layer is low-rank: the group before it reads the product U V (no group owns U)."""
    return low_rank_mlp(1, ["4"])


def skip_middle_mlp() -> nn.Module:
    return skip_mlp(["2"])


def ten_neuron_mlp() -> nn.Module:
    """One group '0' of 10 neurons (for per-neuron thresholds)."""
    return mlp([3, 10, 2])


def nadam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.NAdam(model.parameters(), lr=0.02)


def nan_mlp() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[0].weight[1, 0] = NAN  # neuron 1 of group '0'
    return model


def weight_norm_mlp() -> nn.Module:
    model = mlp()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    return model


def grouped_conv_skip() -> nn.Module:
    torch.manual_seed(0)
    return lbv.add_skip(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, groups=2)), ["0"])


def groups(model: nn.Module) -> lbv.NeuronGroups:
    return lbv.find_neurons(model, X)


def other_groups(model: nn.Module) -> lbv.NeuronGroups:
    return lbv.find_neurons(mlp(), X)


def compacted_mlp() -> nn.Module:
    """An MLP compacted after ``model.stale_groups`` were found: their sizes no longer match."""
    model = mlp()
    model.stale_groups = lbv.find_neurons(model, X)
    with torch.no_grad():
        model[2].weight[:, :2] = 0.0  # 2 dead neurons in group '0'
    lbv.compact(model, example_input=X)
    return model


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def ddp_wrapped(model: nn.Module) -> Any:
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model
    return ddp


def callback_arg(cls: Any, **kwargs: Any) -> Callable[[nn.Module], Any]:
    return lambda model: cls(**kwargs)


# (id, make model, call on the model, error type, words the message must contain)
# fmt: off
FUNCTION_ROWS: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], type, str]] = [
    # find_neurons
    ("find_neurons-model", mlp, lambda m: lbv.find_neurons(None, X), TypeError, r"`model` must be an nn\.Module, got NoneType"),
    ("find_neurons-input-list", mlp, lambda m: lbv.find_neurons(m, [X]), TypeError, r"`example_input` must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got list"),
    ("find_neurons-targets-nothing", mlp, lambda m: lbv.find_neurons(m, X, targets=["nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("find_neurons-targets-type", mlp, lambda m: lbv.find_neurons(m, X, targets=3), TypeError, r"`targets` must be None, a regex string or a list of module names, got 3"),
    ("find_neurons-exclude-regex", mlp, lambda m: lbv.find_neurons(m, X, exclude="(["), ValueError, r"`exclude`='\(\[' is not a valid regular expression"),
    ("find_neurons-forward-fails-buffers-restored", bn_mlp, lambda m: lbv.find_neurons(m, X), RuntimeError, r"cannot be multiplied"),
    # the maths on groups
    ("rbv_norm-q", mlp, lambda m: lbv.rbv_norm(groups(m), q=3), ValueError, r"`q` must be 1 or 2.*got 3"),
    ("rbv_norm-model-not-groups", mlp, lambda m: lbv.rbv_norm(m), TypeError, r"`groups` must be a NeuronGroup or an iterable of them \(lightning_bv\.find_neurons.*got Sequential"),
    ("neuron_scores-q-bool", mlp, lambda m: lbv.neuron_scores(groups(m), q=True), ValueError, r"`q` must be 1 or 2.*got True"),
    ("neuron_scores-names-not-groups", mlp, lambda m: lbv.neuron_scores(["0"]), TypeError, r"`groups` must be .*holding a str"),
    ("balance_-q", mlp, lambda m: lbv.balance_(groups(m), q=1.5), ValueError, r"`q` must be 1 or 2.*got 1\.5"),
    ("balance_-model-not-groups", mlp, lambda m: lbv.balance_(m), TypeError, r"`groups` must be a NeuronGroup"),
    ("prox_-tau-negative", mlp, lambda m: lbv.prox_(groups(m), -1.0), ValueError, r"`tau` must be a finite value >= 0, got -1\.0"),
    ("prox_-tau-nan", mlp, lambda m: lbv.prox_(groups(m), NAN), ValueError, r"`tau` must be a finite value >= 0, got nan"),
    ("prox_-tau-str", mlp, lambda m: lbv.prox_(groups(m), "0.1"), TypeError, r"`tau` must be a number, a 0-dim tensor or a mapping from group name to a number, got str"),
    ("prox_-tau-vector", mlp, lambda m: lbv.prox_(groups(m), torch.tensor([0.1, 0.2])), TypeError, r"got Tensor of shape \(2,\)"),
    ("prox_-tau-mapping-missing-group", mlp, lambda m: lbv.prox_(groups(m), {"0": 0.1}), ValueError, r"`tau` has no value for group\(s\) \['2'\]; it has \['0'\]"),
    ("prox_-tau-mapping-negative", mlp, lambda m: lbv.prox_(groups(m), {"0": 0.1, "2": -2}), ValueError, r"`tau` must be a finite value >= 0, got -2 \(group '2'\)"),
    ("prox_-q", mlp, lambda m: lbv.prox_(groups(m), 0.1, q=0), ValueError, r"`q` must be 1 or 2"),
    ("prox_-on_nonfinite", mlp, lambda m: lbv.prox_(groups(m), 0.1, on_nonfinite="warn"), ValueError, r"`on_nonfinite` must be one of \('ignore', 'raise', 'skip'\).*got 'warn'"),
    ("prox_-q1-low-rank-consumer", low_rank_head_mlp, lambda m: lbv.prox_(groups(m), 0.1, q=1), NotImplementedError, r"q=1 prox of group '2' on the low-rank weight of '4' is not supported \(use q=2\)"),
    ("prox_-nan-weights", nan_mlp, lambda m: lbv.prox_(groups(m), 0.1, on_nonfinite="raise"), NonFiniteWeightsError, r"neuron group '0' has non-finite weights: nan norm of the input weights of neuron\(s\) \[1\] of 6 \(nan\)"),
    ("add_rbv_grad_-nan-weights", nan_mlp, lambda m: add_rbv_grad_(groups(m), 0.1, on_nonfinite="raise"), FloatingPointError, r"neuron group '0' has non-finite weights.*on_nonfinite=\"skip\""),
    ("add_rbv_grad_-lam", mlp, lambda m: add_rbv_grad_(groups(m), -0.1), ValueError, r"`lam` must be a finite value >= 0, got -0\.1"),
    ("add_weight_decay_grad_-lam", mlp, lambda m: add_weight_decay_grad_(groups(m), "big"), TypeError, r"`lam` must be a number \(the regularization strength\), got str"),
    ("add_weight_decay_grad_-inf-weights", nan_mlp, lambda m: add_weight_decay_grad_(groups(m), 0.1, on_nonfinite="raise"), NonFiniteWeightsError, r"group '0' has non-finite weights"),
    ("proximal_step_-first-int", mlp, lambda m: lbv.proximal_step_(groups(m), 0.1, first=1), TypeError, r"`first` must be a bool \(True at the first update of a run\), got 1"),
    # the optimizer's thresholds
    ("prox_thresholds-optimizer", mlp, lambda m: lbv.prox_thresholds(groups(m), nn.Linear(1, 1), lam=0.5), TypeError, r"`optimizer` must be a torch.optim.Optimizer, got Linear"),
    ("prox_thresholds-lam", mlp, lambda m: lbv.prox_thresholds(groups(m), nadam(m), lam=-1), ValueError, r"`lam` must be a finite value >= 0, got -1"),
    ("prox_thresholds-lrs-length", mlp, lambda m: lbv.prox_thresholds(groups(m), nadam(m), lam=0.5, lrs=[0.1, 0.2]), ValueError, r"`lrs` must be None or one learning rate per parameter group \(1\), got \[0.1, 0.2\]"),
    ("prox_thresholds-lrs-nan", mlp, lambda m: lbv.prox_thresholds(groups(m), nadam(m), lam=0.5, lrs=[math.nan]), ValueError, r"`lrs` must hold finite learning rates >= 0, got nan"),
    # spectra
    ("stable_rank-vector", mlp, lambda m: stable_rank(torch.ones(3)), ValueError, r"at least 2 dimensions"),
    ("effective_rank-list", mlp, lambda m: effective_rank([[1.0]]), TypeError, r"`weight` must be a tensor"),
    ("singular_values-factors", mlp, lambda m: singular_values((torch.ones(3, 2), torch.ones(3, 4))), ValueError, r"do not multiply"),
    # path_norm
    ("path_norm-model", mlp, lambda m: lbv.path_norm(None, X), TypeError, r"`model` must be an nn\.Module, got NoneType"),
    ("path_norm-p", mlp, lambda m: lbv.path_norm(m, X, p=0.5), ValueError, r"`p` must be a finite number >= 1, got 0\.5"),
    ("path_norm-integer-input", mlp, lambda m: lbv.path_norm(m, X.long()), ValueError, r"`example_input` must be a floating-point tensor, or integer token ids that the model reads with an embedding \(nn.Embedding\); `linear` in module .0. reads the integer input"),
    ("path_norm-unsupported-layer", lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), lambda m: lbv.path_norm(m, X), NotImplementedError, r"path_norm does not support `tanh` in module '1' \(Tanh\)"),
    # low rank
    ("apply_low_rank-model", mlp, lambda m: lbv.apply_low_rank(None, rank=1), TypeError, r"`model` must be an nn\.Module, got NoneType"),
    ("apply_low_rank-neither", mlp, lambda m: lbv.apply_low_rank(m), ValueError, r"Give exactly one of `rank` and `energy`, got rank=None and energy=None"),
    ("apply_low_rank-both", mlp, lambda m: lbv.apply_low_rank(m, rank=1, energy=0.5), ValueError, r"Give exactly one of `rank` and `energy`, got rank=1 and energy=0\.5"),
    ("apply_low_rank-rank-float", mlp, lambda m: lbv.apply_low_rank(m, rank=2.0), ValueError, r"`rank` must be an int >= 1, got 2\.0"),
    ("apply_low_rank-energy", mlp, lambda m: lbv.apply_low_rank(m, energy=0.0), ValueError, r"`energy` must be a float in \(0, 1\].*got 0\.0"),
    ("apply_low_rank-rank-too-large", mlp, lambda m: lbv.apply_low_rank(m, rank=3), ValueError, r"`rank`=3 is too large for layer '4'.*2 x 6 matrix, so the rank must be <= 2"),
    ("apply_low_rank-targets-nothing", mlp, lambda m: lbv.apply_low_rank(m, rank=1, targets=["nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("apply_low_rank-unsupported-layer", mlp, lambda m: lbv.apply_low_rank(m, rank=1, targets=["0", "1"]), TypeError, r"`targets` selected '1' \(ReLU\), which is not an nn\.Linear"),
    ("apply_low_rank-embedding", lambda: nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)), lambda m: lbv.apply_low_rank(m, rank=1, targets=["0"]), TypeError, r"'0' \(Embedding\), which is not an nn\.Linear"),
    ("apply_low_rank-grouped-conv", lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), lambda m: lbv.apply_low_rank(m, rank=1), ValueError, r"is a grouped conv \(groups=2\)"),
    ("apply_low_rank-no-layer", lambda: nn.Sequential(nn.ReLU()), lambda m: lbv.apply_low_rank(m, rank=1), ValueError, r"contains no nn\.Linear, nn\.Conv1d, nn\.Conv2d or nn\.Conv3d layer"),
    ("apply_low_rank-twice", low_rank_middle_mlp, lambda m: lbv.apply_low_rank(m, rank=1, targets=["2"]), ValueError, r"Layer '2' .* is already low-rank; call `remove_low_rank` first"),
    ("apply_low_rank-foreign-parametrization", weight_norm_mlp, lambda m: lbv.apply_low_rank(m, rank=1, targets=["0", "2"]), ValueError, r"Layer '2' .*already has a parametrization on `weight`"),
    ("remove_low_rank-model", mlp, lambda m: lbv.remove_low_rank(None), TypeError, r"`model` must be an nn\.Module"),
    ("remove_low_rank-merge", low_rank_middle_mlp, lambda m: lbv.remove_low_rank(m, merge="no"), TypeError, r"`merge` must be a bool, got 'no'"),
    ("factorize-model", mlp, lambda m: lbv.factorize("model"), TypeError, r"`model` must be an nn\.Module, got str"),
    # skip connections
    ("add_skip-model", mlp, lambda m: lbv.add_skip(None, ["0"]), TypeError, r"`model` must be an nn\.Module"),
    ("add_skip-targets-missing", mlp, lambda m: lbv.add_skip(m, None), ValueError, r"`targets` is required"),
    ("add_skip-targets-nothing", mlp, lambda m: lbv.add_skip(m, ["0", "nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("add_skip-kind", mlp, lambda m: lbv.add_skip(m, ["0"], kind="residual"), ValueError, r"`kind` must be one of \('affine', 'identity'\), got 'residual'"),
    ("add_skip-identity-shape", mlp, lambda m: lbv.add_skip(m, ["2", "0"], kind="identity"), ValueError, r"kind=\"identity\" needs '0' to keep its input shape, but it maps 3 to 6 features"),
    ("add_skip-unsupported-layer", mlp, lambda m: lbv.add_skip(m, ["0", "1"]), TypeError, r"Cannot read the input and output sizes of '1' \(ReLU\).*Pass `example_input=`"),
    ("add_skip-conv-padding", lambda: nn.Sequential(nn.Conv2d(2, 2, 2)), lambda m: lbv.add_skip(m, ["0"]), ValueError, r"needs padding = dilation \* \(kernel_size - 1\) / 2"),
    ("add_skip-not-called", Unused, lambda m: lbv.add_skip(m, ["a", "b"], example_input=X), ValueError, r"'b' was not called with one tensor"),
    ("add_skip-twice", skip_middle_mlp, lambda m: lbv.add_skip(m, ["0", "2"]), ValueError, r"`targets` selected '2', which is already a skip connection"),
    ("remove_skip-model", mlp, lambda m: lbv.remove_skip(None), TypeError, r"`model` must be an nn\.Module"),
    ("remove_skip-merge", skip_middle_mlp, lambda m: lbv.remove_skip(m, merge=1), TypeError, r"`merge` must be a bool, got 1"),
    ("remove_skip-targets-nothing", skip_middle_mlp, lambda m: lbv.remove_skip(m, targets=["nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("remove_skip-cannot-merge", grouped_conv_skip, lambda m: lbv.remove_skip(m, merge=True), ValueError, r"Cannot merge the skip of '0' \(Conv1d\) into it"),
    # compaction
    ("compact-model", mlp, lambda m: lbv.compact(None, example_input=X), TypeError, r"`model` must be an nn\.Module, got NoneType"),
    ("compact-ddp", mlp, lambda m: lbv.compact(ddp_wrapped(m), example_input=X), TypeError, r"is wrapped in DistributedDataParallel"),
    ("compact-tol", mlp, lambda m: lbv.compact(m, tol=-1.0, example_input=X), ValueError, r"`tol` must be a finite float >= 0.*got -1\.0"),
    ("compact-tol-str", mlp, lambda m: lbv.compact(m, tol="0", example_input=X), ValueError, r"`tol` must be a finite float >= 0.*got '0'"),
    ("compact-tol-nan", mlp, lambda m: lbv.compact(m, tol=float("nan"), example_input=X), ValueError, r"`tol` must be a finite float >= 0.*got nan"),
    ("compact-tol-inf", mlp, lambda m: lbv.compact(m, tol=float("inf"), example_input=X), ValueError, r"`tol` must be a finite float >= 0.*got inf"),
    ("compact-tol-bool", mlp, lambda m: lbv.compact(m, tol=True, example_input=X), ValueError, r"`tol` must be a finite float >= 0.*got True"),
    # lift_shared_weights
    ("lift_shared_weights-model", mlp, lambda m: lbv.lift_shared_weights("net"), TypeError, r"`model` must be an nn.Module, got str"),
    ("lift_shared_weights-no-groups", mlp, lambda m: lbv.lift_shared_weights(m), ValueError, r"needs the model's neuron groups: pass `groups="),
    ("lift_shared_weights-normalize", mlp, lambda m: lbv.lift_shared_weights(m, example_input=X, normalize=1), TypeError, r"`normalize` must be a bool, got 1"),
    ("compact-nothing-to-find-groups", mlp, lambda m: lbv.compact(m), ValueError, r"`compact` needs the model's neuron groups"),
    ("compact-groups-str", mlp, lambda m: lbv.compact(m, "0"), TypeError, r"`groups` must be a NeuronGroup or an iterable of them.*got str"),
    ("compact-groups-of-another-model", mlp, lambda m: lbv.compact(m, other_groups(m)), ValueError, r"Group '0' refers to a module '0' that is not the one in `model`"),
    ("compact-stale-groups", compacted_mlp, lambda m: lbv.compact(m, m.stale_groups), ValueError, r"Group '0' has 6 neurons, which does not match .* the groups are stale .*CompactionReport\.remap\(groups\)"),
    # architecture
    ("RBVNet-width", mlp, lambda m: lbv.RBVNet(3, 1, 0, 2, 2), ValueError, r"`width` must be an int >= 1, got 0"),
    ("RBVNet-depth", mlp, lambda m: lbv.RBVNet(3, 1, 4, 2, 1.5), ValueError, r"`depth` must be an int >= 1, got 1\.5"),
    ("RBVNet-in_features", mlp, lambda m: lbv.RBVNet("3", 1, 4, 2, 2), ValueError, r"`in_features` must be an int >= 1, got '3'"),
    ("RBVBlock-width", mlp, lambda m: lbv.RBVBlock(3, 0, 2), ValueError, r"`width` must be an int >= 1, got 0"),
    # the LightningModule and the datamodules
    ("BVModule-model", mlp, lambda m: BVModule("RBVNet"), TypeError, r"`model` must be an nn.Module, got str"),
    ("BVModule-num_classes-unknown", nn.ReLU, lambda m: BVModule(m), ValueError, r"`num_classes` is needed"),
    ("BVModule-task", mlp, lambda m: BVModule(m, task="ranking"), ValueError, r"`task` must be one of \('classification', 'regression'\), got 'ranking'"),
    ("BVModule-optimizer", mlp, lambda m: BVModule(m, optimizer="lbfgs"), ValueError, r"`optimizer` must be one of \('adam', 'adamw', 'sgd'\), got 'lbfgs'"),
    ("BVModule-lr-zero", mlp, lambda m: BVModule(m, lr=0.0), ValueError, r"`lr` must be > 0, got 0"),
    ("BVModule-lr-nan", mlp, lambda m: BVModule(m, lr=NAN), ValueError, r"`lr` must be a finite float >= 0, got nan"),
    ("BVModule-weight_decay", mlp, lambda m: BVModule(m, weight_decay=-1.0), ValueError, r"`weight_decay` must be a finite float >= 0, got -1.0"),
    ("BVModule-momentum", mlp, lambda m: BVModule(m, momentum=1.0), ValueError, r"`momentum` must be a float in \[0, 1\), got 1.0"),
    ("BVModule-num_classes", mlp, lambda m: BVModule(m, num_classes=1), ValueError, r"`num_classes` must be an int >= 2 for classification, got 1"),
    ("DigitsData-batch_size", mlp, lambda m: DigitsData(batch_size=0), ValueError, r"`batch_size` must be an int >= 1, got 0"),
    ("DigitsData-fractions", mlp, lambda m: DigitsData(val_fraction=0.6, test_fraction=0.5), ValueError, r"`val_fraction` \+ `test_fraction` must be < 1"),
    ("DiabetesData-test_fraction", mlp, lambda m: DiabetesData(test_fraction=1.5), ValueError, r"`test_fraction` must be a float in \(0, 1\), got 1.5"),
    ("DigitsData-seed", mlp, lambda m: DigitsData(seed=-1), ValueError, r"`seed` must be an int >= 0, got -1"),
    ("SplineData-function", mlp, lambda m: SplineData(function="cos"), ValueError, r"`function` must be one of \('sine', 'abs', 'step'\), got 'cos'"),
    ("SplineData-noise", mlp, lambda m: SplineData(noise=-0.1), ValueError, r"`noise` must be a finite float >= 0, got -0.1"),
    ("SplineData-n_train", mlp, lambda m: SplineData(n_train=1), ValueError, r"`n_train` must be an int >= 2, got 1"),
    # callback arguments, checked at construction
    ("RBVRegularization-lam", mlp, callback_arg(RBVRegularization, lam=-1.0), ValueError, r"`lam` must be a finite float >= 0 or a callable of the global step, got -1\.0"),
    ("RBVRegularization-q", mlp, callback_arg(RBVRegularization, lam=0.1, q=2.5), ValueError, r"`q` must be 1 or 2"),
    ("RBVRegularization-mode", mlp, callback_arg(RBVRegularization, lam=0.1, mode="l1"), ValueError, r"`mode` must be one of \('prox', 'penalty', 'weight_decay'\), got 'l1'"),
    ("RBVRegularization-every_n_steps", mlp, callback_arg(RBVRegularization, lam=0.1, every_n_steps=1.0), ValueError, r"`every_n_steps` must be None or an int >= 1, got 1\.0"),
    ("RBVRegularization-log_every_n_steps", mlp, callback_arg(RBVRegularization, lam=0.1, log_every_n_steps=True), ValueError, r"`log_every_n_steps` must be None or an int >= 1, got True"),
    ("RBVRegularization-on_nonfinite", mlp, callback_arg(RBVRegularization, lam=0.1, on_nonfinite="ignore"), ValueError, r"`on_nonfinite` must be one of \('raise', 'skip'\).*got 'ignore'"),
    ("RBVRegularization-example_input", mlp, callback_arg(RBVRegularization, lam=0.1, example_input=[X]), TypeError, r"`example_input` must be None, a tensor or a tuple.*got list"),
    ("RBVRegularization-exclude", mlp, callback_arg(RBVRegularization, lam=0.1, exclude=5), TypeError, r"`exclude` must be None, a regex string or a list"),
    ("LowRank-neither", mlp, callback_arg(LowRank), ValueError, r"Give exactly one of `rank` and `energy`"),
    ("LowRank-energy", mlp, callback_arg(LowRank, energy=True), ValueError, r"`energy` must be a float in \(0, 1\].*got True"),
    ("LowRank-targets", mlp, callback_arg(LowRank, rank=1, targets="(?"), ValueError, r"`targets`='\(\?' is not a valid regular expression"),
    ("SkipConnections-targets-missing", mlp, callback_arg(SkipConnections, targets=None), ValueError, r"`targets` is required"),
    ("SkipConnections-kind", mlp, callback_arg(SkipConnections, targets=["net.0"], kind="dense"), ValueError, r"`kind` must be one of \('affine', 'identity'\), got 'dense'"),
    ("SkipConnections-targets-type", mlp, callback_arg(SkipConnections, targets=[1]), TypeError, r"`targets` must be None, a regex string or a list of module names, got \[1\]"),
    ("NeuronPruning-tol", mlp, callback_arg(NeuronPruning, tol=float("inf")), ValueError, r"`tol` must be a finite float >= 0.*got inf"),
    ("NeuronPruning-every_n_epochs", mlp, callback_arg(NeuronPruning, every_n_epochs=0), ValueError, r"`every_n_epochs` must be None or an int >= 1, got 0"),
    ("NeuronPruning-on_fit_end", mlp, callback_arg(NeuronPruning, on_fit_end="yes"), ValueError, r"`on_fit_end` must be a bool, got 'yes'"),
    ("NeuronPruning-never", mlp, callback_arg(NeuronPruning, on_fit_end=False), ValueError, r"would never compact: set `every_n_epochs` or leave `on_fit_end=True`"),
    ("NeuronPruning-example_input", mlp, callback_arg(NeuronPruning, example_input={"x": X}), TypeError, r"`example_input` must be None, a tensor or a tuple.*got dict"),
]
# per-neuron thresholds, for both steps
PER_NEURON_TAU = [
    ("shape", torch.ones(3), TypeError, r"or a floating tensor of shape \[10\] \(one per neuron\), got Tensor of shape \(3,\) and dtype torch.float32 \(group '0'\)"),
    ("dtype", torch.ones(10, dtype=torch.long), TypeError, r"got Tensor of shape \(10,\) and dtype torch.int64 \(group '0'\)"),
    ("negative", -torch.ones(10), ValueError, r"`tau` must be finite and >= 0 for every neuron, got -1.0 at neuron 0 \(group '0'\)"),
    ("nan", torch.full((10,), NAN), ValueError, r"`tau` must be finite and >= 0 for every neuron, got nan at neuron 0"),
]
FUNCTION_ROWS += [
    (f"{fn}-tau-per-neuron-{name}", ten_neuron_mlp, lambda m, fn=fn, tau=tau: getattr(lbv, fn)(groups(m), {"0": tau}), error, match)
    for name, tau, error, match in PER_NEURON_TAU
    for fn in ("prox_", "proximal_step_")
]
# every size of the architecture, and every kind of bad size
RBV_ARGS = {"in_features": 3, "out_features": 2, "width": 16, "bottleneck": 4, "depth": 3}
FUNCTION_ROWS += [
    (f"RBVNet-{arg}-{bad!r}", mlp, lambda m, arg=arg, bad=bad: lbv.RBVNet(**{**RBV_ARGS, arg: bad}), ValueError, rf"`{arg}` must be an int >= 1, got {bad!r}")
    for arg in RBV_ARGS
    for bad in (0, -1, 2.5, True, "4")
]
if BVMonitor is not None:
    FUNCTION_ROWS += [
        ("BVMonitor-every_n_steps", mlp, callback_arg(BVMonitor, every_n_steps=0), ValueError, r"`every_n_steps` must be an int >= 1, got 0"),
        ("BVMonitor-q", mlp, callback_arg(BVMonitor, q=3), ValueError, r"`q` must be 1 or 2"),
        ("BVMonitor-plots", mlp, callback_arg(BVMonitor, plots="yes"), ValueError, r"`plots` must be a bool, got 'yes'"),
        ("BVMonitor-every_n_steps-float", mlp, callback_arg(BVMonitor, every_n_steps=2.5), ValueError, r"`every_n_steps` must be an int >= 1, got 2.5"),
        ("BVMonitor-spectra_every_n_steps", mlp, callback_arg(BVMonitor, spectra_every_n_steps=-1), ValueError, r"`spectra_every_n_steps` must be an int >= 1, got -1"),
        ("BVMonitor-histograms", mlp, callback_arg(BVMonitor, histograms="yes"), ValueError, r"`histograms` must be a bool, got 'yes'"),
        ("BVMonitor-example_input", mlp, callback_arg(BVMonitor, example_input=[1.0]), ValueError, r"`example_input` must be None, a tensor or a tuple"),
    ]
# fmt: on


@pytest.mark.parametrize(
    ("make", "call", "error", "match"), [pytest.param(*row[1:], id=row[0]) for row in FUNCTION_ROWS]
)
def test_bad_input_raises_and_changes_nothing(make, call, error, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_unchanged(model, before)


# ---- callbacks at setup: targets that match nothing, unsupported layers and strategies -------------------------
def fake_trainer(strategy: Any) -> Any:
    return types.SimpleNamespace(strategy=strategy, world_size=1, callbacks=[], optimizers=[])


def fsdp() -> Any:
    from pytorch_lightning.strategies import FSDPStrategy

    return fake_trainer(FSDPStrategy())


def ddp(unified: bool = False) -> Any:
    if unified:
        from lightning.pytorch.strategies import DDPStrategy
    else:
        from pytorch_lightning.strategies import DDPStrategy
    return fake_trainer(DDPStrategy())


def ddp_spawn() -> Any:
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False)


def single() -> Any:
    return trainer()


X4 = torch.randn(2, 4)
SHARDED = (
    r"does not support the sharded strategy FSDPStrategy: it .*Use ModelParallelStrategy\(data_parallel_size=<devices>, "
    r"tensor_parallel_size=1\) with torch's fully_shard in configure_model \(FSDP2\), or strategy='ddp'"
)
# fmt: off
SETUP_ROWS = [
    ("LowRank-targets-nothing", MLPModule, single, LowRank(rank=1, targets=["nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("LowRank-rank-too-large", MLPModule, single, LowRank(rank=4, targets=["net.4"]), ValueError, r"`rank`=4 is too large for layer 'net\.4'"),
    ("LowRank-unsupported-layer", MLPModule, single, LowRank(rank=1, targets=r"net\.[01]"), TypeError, r"'net\.1' \(ReLU\), which is not an nn\.Linear"),
    ("LowRank-fsdp", MLPModule, fsdp, LowRank(rank=1), ValueError, "LowRank " + SHARDED),
    ("SkipConnections-targets-nothing", MLPModule, single, SkipConnections(targets=["net.0", "nope"]), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("SkipConnections-identity-shape", MLPModule, single, SkipConnections(targets=["net.2", "net.0"], kind="identity"), ValueError, r"needs 'net\.0' to keep its input shape, but it maps 4 to 16 features"),
    ("RBVRegularization-targets-nothing", MLPModule, single, RBVRegularization(lam=0.1, targets=["nope"], example_input=X4), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("RBVRegularization-fsdp", MLPModule, fsdp, RBVRegularization(lam=0.1), ValueError, "RBVRegularization " + SHARDED),
    ("RBVRegularization-manual-optimization", ManualMLP, single, RBVRegularization(lam=0.1), ValueError, r"does not support manual optimization \(automatic_optimization=False\).*call lightning_bv\.proximal_step_\(groups, lightning_bv\.prox_thresholds\(groups, optimizer, lam\)"),
    ("NeuronPruning-targets-nothing", MLPModule, single, NeuronPruning(targets=["nope"], example_input=X4), lbv.TargetsMatchNothingError, MATCH_NOTHING),
    ("NeuronPruning-fsdp", MLPModule, fsdp, NeuronPruning(), ValueError, "NeuronPruning " + SHARDED),
    ("NeuronPruning-mid-fit-ddp", MLPModule, ddp, NeuronPruning(every_n_epochs=1), ValueError, r"NeuronPruning\(every_n_epochs=1\) compacts during training only on a single device: under DDPStrategy"),
    ("NeuronPruning-mid-fit-ddp-lightning", MLPModule, lambda: ddp(unified=True), NeuronPruning(every_n_epochs=2), ValueError, r"compacts during training only on a single device: under DDPStrategy"),
    ("NeuronPruning-fit-end-ddp-spawn", MLPModule, ddp_spawn, NeuronPruning(), ValueError, r"cannot compact at the end of a fit under DDPStrategy with start method 'spawn'"),
]
# fmt: on


@pytest.mark.parametrize(
    ("make", "make_trainer", "callback", "error", "match"), [pytest.param(*row[1:], id=row[0]) for row in SETUP_ROWS]
)
def test_bad_setup_raises_and_changes_nothing(make, make_trainer, callback, error, match):
    torch.manual_seed(0)
    module = make()
    before = snapshot(module)
    with pytest.raises(error, match=match):
        callback.setup(make_trainer(), module, "fit")
    assert_unchanged(module, before)


# ---- NaN or inf in the weights -----------------------------------------------------------------------------------
class Diverging(MLPModule):
    """Puts NaN (or inf) into one input weight of neuron 3 of the first layer right after the optimizer step of step 2.

    Prox then finds it at the end of that step; the penalty modes before the next step's optimizer step (after a
    forward and backward with the bad weight, whose gradients are not applied yet).
    """

    def __init__(self, value: float = NAN, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.value = value

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        step = self.trainer.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if step == 2:
            with torch.no_grad():
                self.net[0].weight[3, 1] = self.value


@pytest.mark.parametrize(("mode", "value", "kind"), [("prox", NAN, "nan"), ("penalty", float("inf"), "inf")])
def test_nonfinite_weights_stop_the_fit_naming_the_group(mode, value, kind):
    torch.manual_seed(0)
    module = Diverging(value)
    cb = RBVRegularization(lam=0.1, mode=mode, every_n_steps=1)
    with pytest.raises(
        FloatingPointError,
        match=rf"RBVRegularization \(mode='{mode}'\) at global step 3: neuron group 'net\.0' has non-finite "
        rf"weights: {kind} norm of the input weights of neuron\(s\) \[3\] of 16 \({kind}\)",
    ):
        trainer(callbacks=[cb], max_steps=6).fit(module)
    # nothing spread: every other weight is finite (the penalty's bad gradients were never applied)
    w = module.net[0].weight.detach().clone()
    assert not torch.isfinite(w[3, 1])
    w[3, 1] = 0.0
    assert torch.isfinite(w).all()
    assert all(torch.isfinite(p).all() for n, p in module.named_parameters() if n != "net.0.weight")


def test_nonfinite_weights_skip_warns_once_and_counts():
    torch.manual_seed(0)
    module = Diverging(NAN)
    cb = RBVRegularization(lam=0.1, mode="weight_decay", on_nonfinite="skip", every_n_steps=1)
    with pytest.warns(UserWarning, match="on_nonfinite='skip'") as record:
        trainer(callbacks=[cb], max_steps=6).fit(module)
    messages = [str(r.message) for r in record if "on_nonfinite='skip'" in str(r.message)]
    assert len(messages) == 2, messages  # the first skip, and the count at the end of fit
    assert "left neuron group(s) ['net.0'] alone at global step 3" in messages[0]
    # step 3 skips group 'net.0' only; its NaN gradients then reach every weight, so steps 4 and 5 skip both groups
    assert cb.nonfinite_skips == 1 + 2 + 2
    assert f"skipped {cb.nonfinite_skips} group updates" in messages[1]


def test_skip_leaves_the_bad_group_and_updates_the_others():
    model = nan_mlp()
    found = groups(model)
    before = copy.deepcopy(model.state_dict())
    skipped = lbv.prox_(found, 0.5, on_nonfinite="skip")
    assert skipped == ["0"]
    after = model.state_dict()
    torch.testing.assert_close(after["0.weight"], before["0.weight"], rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(after["4.weight"], before["4.weight"])  # group '2' was shrunk
    assert lbv.prox_(found, 0.5) == []  # "ignore" (the default of the functions) checks nothing


# ---- a checkpoint of another architecture -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def narrow_checkpoint(tmp_path_factory):
    """A checkpoint of an MLPModule 8 wide (the tests' models are 16 wide), saved by a run with NeuronPruning."""
    folder = tmp_path_factory.mktemp("narrow")
    save = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)
    trainer(callbacks=[NeuronPruning(), save], max_steps=2, enable_checkpointing=True).fit(MLPModule(width=8))
    return str(folder / "last.ckpt")


SIZE_MISMATCH = (
    r"size mismatch for net\.0\.weight: copying a param with shape torch\.Size\(\[8, 4\]\) from checkpoint, the "
    r"shape in current model is torch\.Size\(\[16, 4\]\)"
)


@pytest.mark.parametrize(
    "callbacks",
    [
        pytest.param(lambda: [], id="no-callback"),
        pytest.param(lambda: [NeuronPruning()], id="NeuronPruning"),
        pytest.param(lambda: [NeuronPruning(every_n_epochs=1), RBVRegularization(lam=0.1)], id="pruning-prox"),
        pytest.param(lambda: [SkipConnections(targets=["net.4"])], id="SkipConnections"),
    ],
)
def test_checkpoint_of_another_width_names_the_mismatching_keys(narrow_checkpoint, callbacks):
    module = MLPModule(width=16)
    with pytest.raises(RuntimeError, match=SIZE_MISMATCH):
        trainer(callbacks=callbacks(), max_steps=4).fit(module, ckpt_path=narrow_checkpoint)
    assert module.net[0].weight.shape == (16, 4)  # not resized to fit
    assert module.net[2].weight.shape == (16, 16)


def test_checkpoint_of_another_architecture_names_missing_and_unexpected_keys(narrow_checkpoint):
    class Deeper(MLPModule):
        def __init__(self):
            super().__init__(width=8)
            self.net.append(nn.ReLU())
            self.net.append(nn.Linear(1, 1))

    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "net\.6\.weight", "net\.6\.bias"'):
        trainer(callbacks=[NeuronPruning()], max_steps=4).fit(Deeper(), ckpt_path=narrow_checkpoint)


def test_low_rank_model_loading_a_dense_or_compacted_state_dict():
    torch.manual_seed(0)
    dense = mlp()
    low = lbv.apply_low_rank(copy.deepcopy(dense), rank=2, targets=["2"])
    with pytest.raises(
        RuntimeError, match=r'(?s)Missing key\(s\) .*"2\.parametrizations\.weight\.original0".*Unexpected key'
    ):
        low.load_state_dict(dense.state_dict())
    # another model's factors of another shape: the low-rank load hook lets torch name them
    other = lbv.apply_low_rank(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)), rank=2, targets=["2"])
    with pytest.raises(RuntimeError, match=r"size mismatch for 2\.parametrizations\.weight\.original0"):
        low.load_state_dict(other.state_dict(), strict=False)
    # a compacted model's state_dict into a model of the original sizes, without resize_to_state_dict_
    compacted = copy.deepcopy(low)
    with torch.no_grad():
        compacted[2].parametrizations.weight.original1[:, :3] = 0.0
    lbv.compact(compacted, example_input=X)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight: .*torch\.Size\(\[3, 3\]\) from checkpoint"):
        low.load_state_dict(compacted.state_dict())
    resize_to_state_dict_(low, compacted.state_dict())
    low.load_state_dict(compacted.state_dict())


def test_resize_to_state_dict_only_shrinks():
    narrow, wide = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), mlp()
    assert resize_to_state_dict_(narrow, wide.state_dict()) == []  # larger saved sizes: another architecture
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight"):
        narrow.load_state_dict(wide.state_dict())
