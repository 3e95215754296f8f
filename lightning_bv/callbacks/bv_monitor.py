"""BVMonitor: log the R-BV^2 norm, live neurons, weight ranks and path-norms of any model while it trains."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_bv import _plots
from lightning_bv._checks import check_q
from lightning_bv._layers import WEIGHTED
from lightning_bv._sharding import full
from lightning_bv.callbacks._base import _check_interval, is_fsdp2, refuse_sharded, wandb_loggers
from lightning_bv.callbacks._discovery import GroupDiscovery, is_own_forward
from lightning_bv.callbacks._groups import GroupsCallback
from lightning_bv.functional.path_norm import path_norm
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.functional.spectral import spectrum
from lightning_bv.neurons import low_rank_factors
from lightning_bv.transforms.low_rank import low_rank_live_components


class BVMonitor(GroupsCallback):
    r"""Log what the function-space view says about a model while it trains, every ``every_n_steps`` steps.

    Scalars go to every logger of the Trainer, once per event, at the step Lightning logs that batch's values at
    (``logger.log_metrics``; ``pl_module.log`` would send the last value again at every later logging step of the
    epoch), and through ``pl_module.log(..., logger=False)`` into ``trainer.callback_metrics``:

    * ``bv/<group>/rbv_norm``: the group's share ``sum_k ||v_k||_q ||w_k||_2`` of the R-BV^2 seminorm, and
      ``bv/<group>/active``: its neurons with a nonzero score, for every neuron group (see
      :func:`lightning_bv.find_neurons`; ``<module>:rank`` for the components of a low-rank weight);
    * ``bv/path_norm_l1`` and ``bv/path_norm_l2``: the whole-network path-norms (:func:`lightning_bv.path_norm`),
      when the model is one ``path_norm`` supports (otherwise a single warning names the module and op);
    * ``rank/<module>/stable`` and ``rank/<module>/effective`` for the weight of every Linear/Conv layer
      (:func:`~lightning_bv.functional.spectral.stable_rank`, :func:`~lightning_bv.functional.spectral.effective_rank`),
      and ``rank/<module>/live`` (:func:`lightning_bv.low_rank_live_components`) for low-rank layers, every
      ``spectra_every_n_steps`` steps. A spectrum costs ``O(n^3)`` for an ``n x n`` weight: for an MLP with three
      1024 x 1024 layers about ten training steps at batch 256 on a CPU, so the default of 1000 keeps it near 1%
      (``benchmarks/monitor_overhead.py``); lower it for small models.

    With a ``WandbLogger`` it also logs, at the same steps: a histogram of the neuron scores of each group
    (``bv/<group>/scores``) and of the singular values of each layer (``rank/<module>/singular_values``), a table of
    the groups (``bv/groups``) and, for a model with one input and one output feature, an image of the learned
    function over the range of the training inputs seen so far, with the knots ``-b_k / w_k`` of the live neurons of
    a first layer ``Linear(1, K)`` marked (``bv/function``).

    The groups are those the other callbacks of the fit use (see :class:`NeuronPruning`), else found on the first
    training step, when every other callback has changed the model; the monitor watches that step in any case. The
    example input for ``path_norm`` (and the function image) is ``example_input``, else the module's
    ``example_input_array``, else the first sample of the inputs of the module's first ``forward`` call in that
    step, else, for a ``training_step`` that calls one child holding all the parameters (``self.net(x)``), of that
    call (then the path-norms and the image are those of the child). Under DDP only rank 0 computes and logs; the
    weights are the same on every rank, so the values equal a single-process run's. Nothing is stored in checkpoints.

    Args:
        every_n_steps: log the scalars (and the W&B extras) every this many optimizer steps.
        histograms: log W&B histograms of neuron scores and singular values.
        plots: log the W&B image of a 1-D function (needs matplotlib).
        example_input: the model's input for ``path_norm`` (a tensor, or a tuple of positional arguments).
        spectra_every_n_steps: compute the ranks and singular values every this many steps.
        q: the norm on each neuron's output weights in the scores, 1 or 2.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(callbacks=[BVMonitor(every_n_steps=100)], max_epochs=1, logger=False)
    """

    _example_input_error = ValueError  # its own wording of a bad `example_input`
    _example_input_of = ""

    def __init__(
        self,
        every_n_steps: int = 50,
        histograms: bool = True,
        plots: bool = True,
        example_input: Tensor | tuple[Any, ...] | None = None,
        spectra_every_n_steps: int = 1000,
        q: int = 2,
    ) -> None:
        self.every_n_steps = _check_interval("every_n_steps", every_n_steps)
        self.spectra_every_n_steps = _check_interval("spectra_every_n_steps", spectra_every_n_steps)
        for name, flag in (("histograms", histograms), ("plots", plots)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}")
        super().__init__(example_input)
        check_q(q)
        self.histograms = histograms
        self.plots = plots
        self.q = q
        self._reset()

    def _reset(self) -> None:
        self._discovery = GroupDiscovery()  # a fresh example input each fit
        self._traced = False  # whether the first training step was watched (and the example input resolved)
        self._example: tuple[Any, ...] | None = None
        self._root = ""  # the submodule that ``_example`` is an input of ("": the LightningModule)
        self._last_step = -1
        self._path_norm_ok = True
        self._function_ok = True
        self._range_hook: Any = None
        self._range: tuple[Tensor, Tensor] | None = None
        self._pending_x: Tensor | None = None
        self._busy = False  # set while the monitor runs the model itself
        self._every_rank = False  # FSDP2: every rank measures

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_range_hook=None, _range=None, _pending_x=None)  # hooks and tensors: not pickled (ddp_spawn)
        return state

    # -- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(trainer, type(self).__name__, "reads whole weight matrices, which are flattened into shards")
        self._reset()
        # under FSDP2 every rank measures (norms are all-reduced, forwards all-gather); the loggers write on rank 0
        self._every_rank = is_fsdp2(trainer)

    @override
    def wants_discovery(self, trainer: pl.Trainer) -> bool:
        """On the first training step, on the ranks that measure: for the groups and an example input."""
        return not self._traced and (trainer.is_global_zero or self._every_rank)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        if self._discovery.running and self.plots and self._range_hook is None and wandb_loggers(trainer):
            self._range_hook = pl_module.register_forward_pre_hook(self._track_range)

    def _track_range(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if len(args) == 1 and is_own_forward(module) else None
        if self._busy or not module.training or not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 1:
            return
        if self._discovery.running:  # ops run here would be recorded by the trace: measure when it stops
            self._pending_x = x
        elif x.numel():
            x = x.detach()
            lo, hi = x.min(), x.max()
            if self._range is not None:
                lo, hi = torch.minimum(lo, self._range[0]), torch.maximum(hi, self._range[1])
            self._range = (lo, hi)

    @override
    def finish_discovery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor | None = None) -> None:
        traced = self._discovery.running
        super().finish_discovery(trainer, pl_module, loss)
        if traced:
            self._after_first_step(pl_module)

    def _after_first_step(self, pl_module: pl.LightningModule) -> None:
        """Once the first step was watched: its input range, the example input, the range hook where it belongs."""
        self._traced = True
        if self._pending_x is not None:
            x, self._pending_x = self._pending_x, None
            self._track_range(pl_module, (x,))
        example = self.setup_example_input(pl_module)
        if example is None and self._discovery.example_input is not None:
            example, self._root = self._discovery.example_input, self._discovery.example_root
        self._example = (example if isinstance(example, tuple) else (example,)) if example is not None else None
        if self._range_hook is not None and not self._is_1d():
            self._remove_range_hook()
        elif self._range_hook is not None and self._root:  # the training step calls this child, not the module
            self._remove_range_hook()
            self._range_hook = pl_module.get_submodule(self._root).register_forward_pre_hook(self._track_range)
            self._track_range(pl_module.get_submodule(self._root), self._example)  # type: ignore[arg-type]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.finish_discovery(trainer, pl_module)
        step = trainer.global_step
        mine = trainer.is_global_zero or self._every_rank
        if not mine or not self._traced or self.groups is None or step == 0 or step == self._last_step:
            return
        scalars, spectra = step % self.every_n_steps == 0, step % self.spectra_every_n_steps == 0
        if scalars or spectra:
            self._last_step = step
            self._busy = True
            try:
                self.log_all(trainer, pl_module, scalars, spectra)
            finally:
                self._busy = False

    def _remove_range_hook(self) -> None:
        if self._range_hook is not None:
            self._range_hook.remove()
            self._range_hook = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._remove_range_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._discovery.abort()
        self._remove_range_hook()

    # -- measuring -------------------------------------------------------------------------------------------
    def _example_on(self, device: torch.device) -> tuple[Any, ...] | None:
        if self._example is None:
            return None
        return tuple(t.to(device) if isinstance(t, Tensor) else t for t in self._example)

    def _path_norms(self, pl_module: pl.LightningModule) -> dict[str, float]:
        if not self._path_norm_ok:
            return {}
        example = self._example_on(pl_module.device)
        if example is None:
            self._path_norm_ok = False
            rank_zero_warn(
                "BVMonitor does not log bv/path_norm_*: it has no example input (pass `example_input`, set "
                "`example_input_array` on the module, or call the module itself in `training_step`)."
            )
            return {}
        try:
            with torch.no_grad():
                root = pl_module.get_submodule(self._root)
                return {f"bv/path_norm_l{p}": path_norm(root, example, p=p).item() for p in (1, 2)}
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:  # a monitor must not stop training
            self._path_norm_ok = False
            rank_zero_warn(f"BVMonitor does not log bv/path_norm_*, the rest is logged. {type(err).__name__}: {err}")
            return {}

    @torch.no_grad()
    def log_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: bool, spectra: bool) -> None:
        """Compute and log everything due at this step. Override to log more or less.

        On rank 0 only; under FSDP2 on every rank (the norms are collective), and rank 0's loggers write.
        """
        assert self.groups is not None
        values: dict[str, float] = {}
        scores = {name: s.detach() for name, s in neuron_scores(self.groups, self.q).items()} if scalars else {}
        for name, s in scores.items():
            values[f"bv/{name}/rbv_norm"] = float(s.sum())
            values[f"bv/{name}/active"] = float((s > 0).sum())
        if scalars:
            values.update(self._path_norms(pl_module))
        singular: dict[str, Tensor] = {}
        if spectra:
            for name, module in pl_module.named_modules():
                if not isinstance(module, WEIGHTED):
                    continue
                factors = low_rank_factors(module)
                sp = spectrum((full(factors[0]), full(factors[1])) if factors is not None else full(module.weight))
                singular[name] = sp.singular_values
                values[f"rank/{name}/stable"] = float(sp.stable_rank)
                values[f"rank/{name}/effective"] = float(sp.effective_rank)
                if factors is not None:
                    values[f"rank/{name}/live"] = float(low_rank_live_components(module))
        for key, value in values.items():  # for callback_metrics (EarlyStopping, ModelCheckpoint); not the loggers
            pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True, logger=False)
        if values:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch's values at
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        loggers = wandb_loggers(trainer)
        if loggers:
            self._log_wandb(loggers, trainer, pl_module, scores, singular, values)

    # -- W&B extras ------------------------------------------------------------------------------------------
    def _log_wandb(
        self,
        loggers: list[Any],
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        scores: dict[str, Tensor],
        singular: dict[str, Tensor],
        values: dict[str, float],
    ) -> None:
        import wandb

        extras: dict[str, Any] = {}
        if self.histograms:
            for name, s in scores.items():
                extras[f"bv/{name}/scores"] = wandb.Histogram(s.double().cpu().tolist())
            for name, s in singular.items():
                extras[f"rank/{name}/singular_values"] = wandb.Histogram(s.cpu().tolist())
        if scores:
            assert self.groups is not None
            rows = [
                [
                    g.name,
                    g.num_neurons,
                    int(values[f"bv/{g.name}/active"]),
                    values[f"bv/{g.name}/rbv_norm"],
                    ", ".join(g.producers),
                    ", ".join(g.consumers),
                ]
                for g in self.groups
            ]
            columns: list[Any] = ["group", "neurons", "active", "rbv_norm", "producers", "consumers"]
            extras["bv/groups"] = wandb.Table(columns=columns, data=rows)
            if self.plots and self._function_ok:
                try:
                    image = self._function_image(pl_module, scores)
                except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
                    self._function_ok, image = False, None
                    rank_zero_warn(f"BVMonitor does not plot the learned function. {type(err).__name__}: {err}")
                if image is not None:
                    extras["bv/function"] = wandb.Image(image, caption=f"global step {trainer.global_step}")
        if extras:
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs the scalars at
            for logger in loggers:
                logger.log_metrics(extras, step=step)

    def _is_1d(self) -> bool:
        ex = self._example
        return (
            ex is not None
            and len(ex) == 1
            and isinstance(ex[0], Tensor)
            and ex[0].is_floating_point()
            and ex[0].dim() == 2
            and ex[0].shape[1] == 1
        )

    def _knots(self, pl_module: pl.LightningModule, scores: dict[str, Tensor]) -> Tensor | None:
        """``-b_k / w_k`` of the live neurons of a first layer ``Linear(1, K)`` (where ``w_k x + b_k = 0``)."""
        assert self.groups is not None
        first = next((name for name, m in pl_module.named_modules() if isinstance(m, WEIGHTED)), None)
        for g in self.groups:
            if g.producers != (first,) or g.norm is not None or g.activation == "identity":
                continue
            layer = pl_module.get_submodule(g.producer)
            if not isinstance(layer, nn.Linear) or layer.in_features != 1:
                return None
            w = full(layer.weight.detach())[:, 0].double()
            b = full(layer.bias.detach()).double() if layer.bias is not None else torch.zeros_like(w)
            live = (scores[g.name] > 0) & (w != 0)
            return (-b[live] / w[live]).cpu()
        return None

    def _function_image(self, pl_module: pl.LightningModule, scores: dict[str, Tensor]) -> Any:
        """An RGB array of the plot of a 1-in, 1-out model with its knots, or None for other models."""
        if not self._is_1d():
            self._function_ok = False
            return None
        if not _plots.has_matplotlib():
            self._function_ok = False
            rank_zero_warn("BVMonitor does not plot the learned function: matplotlib is not installed.")
            return None
        assert self._example is not None
        x0 = self._example[0]
        knots = self._knots(pl_module, scores)
        if self._range is not None:
            lo, hi = float(self._range[0]), float(self._range[1])
        elif knots is not None and knots.numel():
            lo, hi = float(knots.min()), float(knots.max())
        else:
            lo, hi = -1.0, 1.0
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        grid = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
        root = pl_module.get_submodule(self._root)
        y = self._evaluate(root, grid, x0)
        if y is None:
            self._function_ok = False
            return None
        marked = None
        if knots is not None:
            knots = knots[(knots >= grid[0]) & (knots <= grid[-1])]
            yk = self._evaluate(root, knots, x0) if knots.numel() else None
            marked = (knots, yk) if yk is not None else None
        title = f"global step {self._last_step}"
        return _plots.rgb(_plots.function_figure(grid, y, knots=marked, title=title, size=(6, 4), dpi=80))

    @staticmethod
    def _evaluate(pl_module: nn.Module, x: Tensor, like: Tensor) -> Tensor | None:
        """``pl_module(x)`` in eval mode (training flags restored), or None unless the output is ``[len(x), 1]``."""
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                out = pl_module(x.reshape(-1, 1).to(like.device, like.dtype))
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not isinstance(out, Tensor) or out.shape != (x.numel(), 1):
            return None
        return out.detach().double().reshape(-1).cpu()
