"""BVModule: a LightningModule around any ``nn.Module``, for classification or regression.

It is what ``lightning-bv fit`` trains (the network comes from the config as ``class_path``/``init_args``), and a
plain LightningModule otherwise: nothing in it knows about the callbacks, which find the neurons by themselves.

Example:
    >>> import torch
    >>> from torch import nn
    >>> module = BVModule(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), task="classification")
    >>> module.num_classes, tuple(module.example_input_array.shape)
    (3, (2, 4))
    >>> tuple(module(torch.randn(5, 4)).shape)
    (5, 3)

"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from typing_extensions import override

from lightning_bv._checks import check_choice, check_int, check_nonnegative
from lightning_bv._layers import WEIGHTED

TASKS = ("classification", "regression")
OPTIMIZERS = ("adam", "adamw", "sgd")
_STAGES = ("train", "val", "test")


def _in_cli_context() -> bool:
    """True while LightningCLI instantiates the module: ``save_hyperparameters`` then receives the parsed config."""
    try:
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - private name of pytorch_lightning 2.x
        return False
    return _given_hyperparameters.get() is not None


def _features(model: nn.Module, attr: str) -> int | None:
    """``model.<attr>`` if it is an int >= 1, else that of its first (in_features) / last (out_features) layer.

    Only when that layer is a Linear: a model that starts with a convolution has no input size to read.
    """
    value = getattr(model, attr, None)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    layers = [m for m in model.modules() if isinstance(m, WEIGHTED)]
    if not layers:
        return None
    layer = layers[0] if attr == "in_features" else layers[-1]
    return int(getattr(layer, attr)) if isinstance(layer, nn.Linear) else None


class BVModule(pl.LightningModule):
    """Train ``model`` on ``(x, y)`` batches with cross-entropy (classification) or mean squared error (regression).

    Logged per stage (``train``, ``val``, ``test``): ``<stage>_loss`` and, for classification, ``<stage>_acc``
    (torchmetrics ``Accuracy``), for regression ``<stage>_r2`` (torchmetrics ``R2Score``), every step in training and
    per epoch everywhere. Under DDP the losses and metrics are averaged over the processes.

    ``example_input_array`` (used by Lightning's model summary and by the lightning_bv callbacks for discovery and
    path-norms) is a ``[2, in_features]`` tensor when the model has ``in_features`` (or its first layer is a Linear);
    otherwise, once attached to a Trainer, the datamodule's ``example_input_array`` when it has one.

    Args:
        model: the network, any ``nn.Module`` mapping a batch of inputs to logits (classification) or predictions
            (regression). From a config: ``class_path`` and ``init_args``.
        task: ``"classification"`` or ``"regression"``.
        num_classes: number of classes (classification only); ``None`` reads the model's ``out_features`` (or its
            last Linear layer's).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD with ``momentum``).
        lr: learning rate ``> 0``.
        weight_decay: the optimizer's weight decay ``>= 0`` (on every parameter, as usual; for the path-norm use
            :class:`~lightning_bv.callbacks.RBVRegularization`).
        momentum: SGD momentum in ``[0, 1)``.

    Raises:
        ValueError: a bad ``task``, ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` or ``num_classes``, or a
            classification model whose number of classes cannot be read.
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "classification",
        num_classes: int | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        check_choice("task", task, TASKS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        for arg, value in (("lr", lr), ("weight_decay", weight_decay)):
            check_nonnegative(arg, value)
        if lr == 0:
            raise ValueError("`lr` must be > 0, got 0")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must be a float in [0, 1), got {momentum!r}")
        if task == "classification":
            if num_classes is None:
                num_classes = _features(model, "out_features")
                if num_classes is None:
                    raise ValueError(
                        "`num_classes` is needed: the model has no `out_features` and no Linear layer to read it from"
                    )
            num_classes = check_int("num_classes", num_classes, 2, " for classification")
        self.save_hyperparameters(ignore=[] if _in_cli_context() else ["model"])
        self.model = model
        self.task = task
        self.num_classes = num_classes
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self._metric_key = "acc" if task == "classification" else "r2"
        self.train_metric, self.val_metric, self.test_metric = (self._new_metric() for _ in _STAGES)
        d_in = _features(model, "in_features")
        if d_in is not None:
            self.example_input_array = torch.randn(2, d_in, generator=torch.Generator().manual_seed(0))

    def _new_metric(self) -> torchmetrics.Metric:
        if self.task == "classification":
            assert self.num_classes is not None
            return torchmetrics.Accuracy(task="multiclass", num_classes=self.num_classes)
        return torchmetrics.R2Score()

    # -- example input: the model's, else the datamodule's ---------------------------------------------------------
    @property  # type: ignore[override]
    def example_input_array(self) -> Any:
        """The model's example input (see the class docstring); None when neither the model nor the data give one."""
        if self._example_input_array is None and self._trainer is not None:
            return getattr(getattr(self._trainer, "datamodule", None), "example_input_array", None)
        return self._example_input_array

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        self._example_input_array = example

    # -- the steps ------------------------------------------------------------------------------------------------
    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy on logits, or mean squared error with ``y`` shaped like ``out``."""
        if self.task == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y.reshape(out.shape).to(out.dtype))

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        metric = getattr(self, f"{stage}_metric")
        if self.task == "classification":
            metric(out, y)
        else:
            metric(out.reshape(-1), y.reshape(-1).to(out.dtype))
        on_step = stage == "train"
        self.log(
            f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True
        )
        self.log(f"{stage}_{self._metric_key}", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    # -- outside a Trainer ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]:
        """Loss and accuracy (classification) or R^2 (regression) over ``(x, y)`` batches, in eval mode, no logging.

        The training/eval flags of every submodule are restored afterwards. Returns ``{"loss": ..., "acc": ...}`` or
        ``{"loss": ..., "r2": ...}`` (loss averaged over samples).

        Example:
            >>> module = BVModule(nn.Linear(3, 1), task="regression")
            >>> x = torch.randn(8, 3)
            >>> sorted(module.evaluate([(x, module(x).detach())]).items())
            [('loss', 0.0), ('r2', 1.0)]
        """
        modes = {m: m.training for m in self.modules()}
        self.eval()
        metric = self._new_metric().to(self.device)
        total, count = 0.0, 0
        try:
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                out = self(x)
                total += float(self.loss(out, y)) * len(x)
                count += len(x)
                if self.task == "classification":
                    metric.update(out, y)
                else:
                    metric.update(out.reshape(-1), y.reshape(-1).to(out.dtype))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if count == 0:
            raise ValueError("`evaluate` got no batches")
        return {"loss": total / count, self._metric_key: float(metric.compute())}
