"""RBVRegularization: train on loss + lam * sum_k ||v_k||_q ||w_k||_2 over every ReLU neuron of the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_bv._checks import check_choice, check_lam_schedule, check_q, check_scheduled_lam
from lightning_bv._select import Targets
from lightning_bv.callbacks._base import (
    _check_interval,
    configure_model_first,
    is_fsdp2,
    refuse_unsupported,
    surgery_of_later_callbacks_first,
    warn_if_spawned,
)
from lightning_bv.callbacks._groups import GroupsCallback
from lightning_bv.callbacks._rbv_metrics import PROGRESS_BAR, rbv_metrics
from lightning_bv.functional.rbv import (
    NonFiniteWeightsError,
    add_rbv_grad_,
    add_weight_decay_grad_,
    proximal_step_,
)
from lightning_bv.functional.thresholds import optimizer_kind, prox_thresholds
from lightning_bv.neurons import NeuronGroups
from lightning_bv.transforms.lift import LiftReport, lift_shared_weights

MODES = ("prox", "penalty", "weight_decay")
ON_NONFINITE = ("raise", "skip")
# every_n_steps=None: the lazy interval that meets the 5% overhead goal where it leaves the fit unchanged (see the
# docstring for the measurements); the prox runs every step
DEFAULT_EVERY_N_STEPS = {"prox": 1, "penalty": 8, "weight_decay": 8}


class RBVRegularization(GroupsCallback):
    r"""Regularize every ReLU neuron the library finds with the R-BV^2 seminorm (docs/theory.md sections 2-4).

    It adds ``lam * R`` to the loss, with ``R`` :func:`lightning_bv.rbv_norm` (the sum over neurons of
    ``||v_k||_q ||w_k||_2``), not :func:`lightning_bv.path_norm` (a whole-network metric). Its former name,
    :class:`~lightning_bv.callbacks.PathNormRegularization`, still works (with a ``FutureWarning``), and the two read
    each other's checkpoints.

    The groups are discovered from the first real training step (no example input, no change to the model), or
    from ``example_input`` / the module's ``example_input_array`` when given.

    Modes:
        * ``"prox"`` (default): after each optimizer step, PathProx's proximal step
          (:func:`lightning_bv.proximal_step_`): every neuron's input weights and bias are divided by ``||w_k||``
          (at the first update, the function-preserving normalize of :func:`lightning_bv.prox_` instead), then its
          output weights are soft-thresholded by ``tau_k``, ``lam`` times the step the optimizer took on them
          (:meth:`thresholds`: ``lr``, with SGD's momentum factor, or Adam's second moments). Unneeded neurons
          become exactly zero (see :func:`lightning_bv.compact`); ``lam`` means the same with SGD and Adam.
        * ``"penalty"``: adds ``lam * grad R`` to the gradients in ``on_before_optimizer_step`` (after DDP
          averaging, accumulation and AMP unscaling; before gradient clipping, so it is clipped with the rest).
        * ``"weight_decay"``: adds the gradient of ``lam/2 * sum(||v||^2 + ||w||^2)`` over the grouped weights
          only (biases and everything else untouched); equal to ``R`` at balance (docs/theory.md section 3).

    Set-ups: works with ``pytorch_lightning`` and ``lightning`` Trainers, DDP (every rank applies the same update
    to its replica), FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``: every rank
    updates its rows of each weight; one all-reduce of the neuron norms per group and update, one more per group
    for adaptive optimizers' thresholds), gradient accumulation, mixed precision, several parameter groups,
    and modules compiled with ``torch.compile`` (the discovery step runs them eagerly; the groups are named under
    ``<module>._orig_mod``). Refused at ``setup``: manual optimization (call :func:`lightning_bv.proximal_step_`
    after your ``optimizer.step()`` instead), tensor parallelism, and FSDP1 / DeepSpeed, which flatten the weights
    into shards.

    Plain chains (``prox`` mode): a weight that is one group's output weights and the next group's input weights (the
    hidden matrix of Linear-ReLU-Linear-ReLU, VGG without BatchNorm, AlexNet) is written as a full-rank product
    ``A B`` in ``setup`` (:func:`lightning_bv.lift_shared_weights`: same function, before Lightning builds the
    optimizer), so each group owns its weights and gets the exact step. That needs the groups at ``setup``: from
    ``example_input``, the module's ``example_input_array``, or else one run of ``training_step`` on the first batch
    of the fit's train dataloader (logging muted, nothing changed). :attr:`lift_report` says what was lifted;
    :func:`lightning_bv.compact` and :class:`NeuronPruning` merge the products back at the end when that is smaller.
    Callbacks that change the model in ``setup`` (:class:`LowRank`, :class:`SkipConnections`) and come later in the
    list run their ``setup`` first, so the groups are those of the final model. A layer made low-rank explicitly
    between two groups is read the same way at its own rank (not lifted again).

    Args:
        lam: regularization strength ``>= 0``, or a callable of the global step returning it (use a picklable
            class instance, not a lambda, with ``strategy="ddp_spawn"``).
        q: norm on each neuron's output weights, 1 or 2.
        mode: ``"prox"``, ``"penalty"`` or ``"weight_decay"``.
        targets: only the groups whose producer matches (a str is a regex on the full module name, a list
            matches exactly or by ``.suffix``).
        exclude: groups to leave out (same rule; wins over ``targets``).
        every_n_steps: apply the update every ``n`` optimizer steps with ``n`` times the strength (lazy
            regularization, as StyleGAN2 does for R1); divides the cost by ``n``. The last optimizer step of every
            epoch and of the fit (``max_steps``) also applies it, with the strength of the steps since the last
            one, so validation, checkpoints at epoch end, :class:`NeuronPruning` and the final model see weights
            just regularized (a fit stopped otherwise, e.g. by ``max_time``, gets a pending prox in
            ``on_train_end``). ``None`` (default): 1 for ``"prox"``, 8 for ``"penalty"`` and ``"weight_decay"``.
            Measured (``python -m benchmarks.overhead``, ``benchmarks.sparsity``): every 8 steps keeps the
            amortized cost of every mode within 5% of a training step (every step: prox 1.19, penalty 1.24,
            weight_decay 1.10) and the gradient modes reach the same fits; a lazy prox does not: between two
            proxes the zeroed neurons train again, and 8 steps left 70 of 256 digits neurons alive against 45
            (same test accuracy) and 16 neurons against 5 on a 5-neuron teacher (test MSE 2.0e-3 against 1.3e-4).
        example_input: discover the groups by running the module on this at ``setup`` instead of on the first
            training step.
        log_every_n_steps: how often ``bv/rbv_norm``, ``bv/active_neurons`` and ``bv/active_fraction`` are
            computed and logged (None: the Trainer's ``log_every_n_steps``).
        lift_shared: write weights shared by two groups as a product ``A B`` at ``setup`` (see above). None
            (default): on in ``"prox"`` mode, off in the gradient modes.
        on_nonfinite: what to do when a group's weights are NaN or infinite (checked on the norms each update
            computes anyway, before the group is changed): ``"raise"`` stops the fit with a
            :class:`~lightning_bv.functional.rbv.NonFiniteWeightsError` (a ``FloatingPointError``) naming the group
            and the step; ``"skip"`` leaves that group alone at that step, warns on the first skip and counts them
            in :attr:`nonfinite_skips`. In ``"weight_decay"`` mode, which needs no norms, the check reads the
            weights once more.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(callbacks=[RBVRegularization(lam=1e-3)], max_epochs=1, logger=False)
    """

    _STATE_NAME = "PathNormRegularization"  # the state key's name before the rename: old checkpoints load

    def __init__(
        self,
        lam: float | Callable[[int], float],
        q: int = 2,
        mode: str = "prox",
        targets: Targets = None,
        exclude: Targets = None,
        every_n_steps: int | None = None,
        example_input: Tensor | tuple[Any, ...] | None = None,
        log_every_n_steps: int | None = None,
        on_nonfinite: str = "raise",
        lift_shared: bool | None = None,
    ) -> None:
        check_lam_schedule(lam)
        check_q(q)
        check_choice("mode", mode, MODES)
        _check_interval("every_n_steps", every_n_steps, allow_none=True)
        _check_interval("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_choice(
            "on_nonfinite",
            on_nonfinite,
            ON_NONFINITE,
            "stop, or skip the update of a group whose weights are NaN or infinite",
        )
        if lift_shared is not None and not isinstance(lift_shared, bool):
            raise TypeError(
                f"`lift_shared` must be None (on for mode='prox'), True or False, got {type(lift_shared).__name__} "
                f"{lift_shared!r}"
            )
        super().__init__(example_input, targets, exclude)
        self.lam = lam
        self.q = q
        self.mode = mode
        self.every_n_steps: int = every_n_steps if every_n_steps is not None else DEFAULT_EVERY_N_STEPS[mode]
        self.log_every_n_steps = log_every_n_steps
        self.on_nonfinite = on_nonfinite
        self.nonfinite_skips = 0  # group updates skipped with on_nonfinite="skip", this fit
        self.lift_shared = lift_shared
        self.lift_report: LiftReport | None = None
        self._setup_tried = False  # whether setup looked for the groups (and lifted) once
        self._steps = 0  # optimizer steps seen; saved in checkpoints
        self._since = 0  # optimizer steps since the last update (the strength it owes); saved in checkpoints
        self._started = False  # whether the first proximal update (prox_, function-preserving) was applied
        self._pending: tuple[float, Any, list[float]] | None = None  # (lam owed, optimizer, lr of each param group)
        self._warned: set[str] = set()
        self._checked: set[int] = set()  # ids of the optimizers _check_optimizer has looked at

    @property
    @override
    def state_key(self) -> str:
        # RBVRegularization keeps the key of its former name (PathNormRegularization's, too), so that checkpoints
        # saved under either name resume under both; a subclass has its own name in its key, as other callbacks do
        name = vars(type(self)).get("_STATE_NAME", type(self).__qualname__)
        kwargs = {"mode": self.mode, "q": self.q, "targets": self.targets, "exclude": self.exclude}
        return f"{name}{kwargs!r}"  # as Callback._generate_state_key writes it

    # -- discovery -------------------------------------------------------------------------------------------
    def current_lam(self, step: int) -> float:
        """``lam`` at this global step."""
        return check_scheduled_lam(float(self.lam(step)) if callable(self.lam) else float(self.lam), step)

    @override
    def on_groups_found(self, trainer: pl.Trainer, pl_module: pl.LightningModule, groups: NeuronGroups) -> None:
        """Warn when there is no group to regularize."""
        if len(groups) == 0:
            why = "; ".join(f"{n}: {r}" for n, r in groups.skipped) or "the model has no ReLU neurons"
            instead = groups.found_instead()
            rank_zero_warn(
                "RBVRegularization found no neuron group to regularize; training goes on unchanged. "
                + (f"It {instead}. " if instead else "")
                + f"Skipped: {why}"
            )

    @property
    def lifts(self) -> bool:
        """Whether weights shared by two groups are lifted to ``A B`` at ``setup`` (``lift_shared``, by mode)."""
        return self.lift_shared if self.lift_shared is not None else self.mode == "prox"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        who = type(self).__name__
        refuse_unsupported(trainer, pl_module, who)
        self.nonfinite_skips = 0
        self.bind(trainer, pl_module)
        # groups another callback found at setup are taken as they are, unless weights shared by two groups are to
        # be lifted (after the later callbacks' surgery) and this callback has not looked yet
        if self.groups is not None and (self._setup_tried or not self.lifts):
            return
        self._setup_tried = True
        example = self.setup_example_input(pl_module)
        if example is None and not self.lifts:
            return  # found on the first training step
        if is_fsdp2(trainer) and next(pl_module.parameters(), None) is None:
            rank_zero_warn(
                f"{who}: the module has no parameters at setup (its layers are built in `configure_model`, where "
                "FSDP2 shards them), so the neuron groups are found on the first training step, too late to lift "
                "weights shared by two groups (a plain chain's hidden matrices stay shared, and its neurons die "
                "less readily). Build the layers in `__init__` and only shard them in `configure_model`."
            )
            return
        surgery_of_later_callbacks_first(trainer, self, pl_module, stage)  # the groups are those of the final model
        configure_model_first(trainer, pl_module, who)
        groups, why = self.find_groups_now(trainer, pl_module, example)
        if groups is None:
            rank_zero_warn(
                f"{who} could not find the neuron groups at setup: {why}. They are found on the first training "
                "step instead, too late to lift weights shared by two groups (a plain chain's hidden matrices "
                "stay shared, and its neurons die less readily). Pass `example_input=` or set the module's "
                "`example_input_array`."
            )
            return
        if self.lifts and len(groups):
            self.lift_report = lift_shared_weights(pl_module, groups, normalize=True)
            if self.lift_report.lifted:
                warn_if_spawned(trainer, who)
            if self.lift_report.skipped:
                rank_zero_warn(f"{who}: {self.lift_report}")
        self.publish_groups(trainer, pl_module, groups)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Groups found at ``setup`` are found again if restoring a checkpoint resized the model since."""
        if self.groups is not None and any(
            s.tensor().shape[0] != g.num_neurons for g in self.groups for s in g.w_slots
        ):
            self.groups = None

    # -- the update ------------------------------------------------------------------------------------------
    def _due(self, trainer: pl.Trainer) -> bool:
        """Every ``every_n_steps`` steps, and on the last step of an epoch or of the fit."""
        last = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step + 1
        return self._since >= self.every_n_steps or bool(trainer.is_last_batch) or last

    def _owed_lam(self, trainer: pl.Trainer) -> float:
        """The strength of the steps since the last update (``lam`` times their number); they are then paid."""
        lam = self.current_lam(trainer.global_step) * self._since
        self._since = 0
        return lam

    def thresholds(self, optimizer: Any, lam: float, lrs: list[float]) -> Mapping[str, float | Tensor]:
        """The proximal threshold of every neuron: ``lam`` times the step ``optimizer`` took on its output weights.

        Called right after the optimizer step, with ``lam`` owed since the last update and the learning rate of each
        of the optimizer's parameter groups at that step (a scheduler may have moved on since). The default is
        :func:`lightning_bv.prox_thresholds` (SGD with momentum, dampening and Nesterov; Adam, AdamW, RMSprop,
        Adagrad; ``lam * lr`` for other optimizers, with a warning). Override it to give the step of another
        optimizer: return ``{group name: float or tensor of shape [num_neurons]}``.
        """
        assert self.groups is not None
        return prox_thresholds(self.groups, optimizer, lam, lrs=lrs)

    def _check_optimizer(self, optimizer: Any) -> None:
        """Warn once about an optimizer the thresholds do not know, and about weight decay on grouped weights."""
        opt = getattr(optimizer, "optimizer", optimizer)
        if id(opt) in self._checked:  # once per optimizer, not on every step
            return
        self._checked.add(id(opt))
        name = type(opt).__name__
        default = type(self).thresholds is RBVRegularization.thresholds
        if optimizer_kind(opt) is None and default and name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(
                f"{type(self).__name__} does not know the step size of optimizer {name}; its proximal threshold is "
                "lam * lr, which is right for plain SGD only. Override `thresholds` to give it the optimizer's "
                "step (see lightning_bv.prox_thresholds)."
            )
        assert self.groups is not None
        grouped = {id(p) for g in self.groups for p in g.parameters()}
        decayed = [i for i, pg in enumerate(opt.param_groups) if pg.get("weight_decay", 0) and any(
            id(p) in grouped for p in pg["params"])]  # fmt: skip
        if decayed and "weight_decay" not in self._warned:
            self._warned.add("weight_decay")
            wd = opt.param_groups[decayed[0]]["weight_decay"]
            rank_zero_warn(
                f"{type(self).__name__}: the optimizer {name} has weight_decay={wd} on the neuron groups' weights "
                f"(parameter group(s) {decayed}), which regularizes them a second time. Set weight_decay=0 for those "
                "parameters (AdamW's default is 0.01)."
            )

    def _prox(self, trainer: pl.Trainer, lam: float, optimizer: Any, lrs: list[float]) -> None:
        assert self.groups is not None
        self._check_optimizer(optimizer)
        taus = self.thresholds(optimizer, lam, lrs)
        with self._nonfinite(trainer) as skipped:
            skipped += proximal_step_(
                self.groups, taus, self.q, first=not self._started, on_nonfinite=self.on_nonfinite
            )
        self._started = True

    @staticmethod
    def _lrs(optimizer: Any) -> list[float]:
        opt = getattr(optimizer, "optimizer", optimizer)
        return [float(pg["lr"]) for pg in opt.param_groups]

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # the discovery, if still recording
        self._steps += 1
        self._since += 1
        if not self.groups or not self._due(trainer):
            return
        lam = self._owed_lam(trainer)
        if self.mode == "penalty":
            with self._nonfinite(trainer) as skipped:
                skipped += add_rbv_grad_(self.groups, lam, self.q, on_nonfinite=self.on_nonfinite)
        elif self.mode == "weight_decay":
            with self._nonfinite(trainer) as skipped:
                skipped += add_weight_decay_grad_(self.groups, lam, on_nonfinite=self.on_nonfinite)
        else:  # after the step (adaptive optimizers' moments include it), with the lr it used
            self._pending = (lam, optimizer, self._lrs(optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and self.groups:
            (lam, optimizer, lrs), self._pending = self._pending, None
            self._prox(trainer, lam, optimizer, lrs)
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50)
        if self.groups is not None and every and trainer.global_step % every == 0:
            self._log(pl_module)

    @contextlib.contextmanager
    def _nonfinite(self, trainer: pl.Trainer) -> Iterator[list[str]]:
        """Around one update: add the step to a NonFiniteWeightsError; warn about and count the skipped groups."""
        skipped: list[str] = []
        try:
            yield skipped
        except NonFiniteWeightsError as err:
            raise NonFiniteWeightsError(
                f"{type(self).__name__} (mode={self.mode!r}) at global step {trainer.global_step}: {err}"
            ) from err
        if not skipped:
            return
        if self.nonfinite_skips == 0:
            rank_zero_warn(
                f"{type(self).__name__} (on_nonfinite='skip') left neuron group(s) {skipped} alone at global step "
                f"{trainer.global_step}: their weights are NaN or infinite. Later skips are not warned about; they "
                "are counted in `nonfinite_skips`."
            )
        self.nonfinite_skips += len(skipped)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that stopped between lazy updates (``max_time``, ``should_stop``) gets its pending prox."""
        if self.mode != "prox" or not self.groups or self._since == 0 or not trainer.optimizers:
            return
        optimizer = trainer.optimizers[0]
        self._prox(trainer, self._owed_lam(trainer), optimizer, self._lrs(optimizer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.nonfinite_skips > 1:
            rank_zero_warn(
                f"{type(self).__name__} (on_nonfinite='skip') skipped {self.nonfinite_skips} group updates in this fit "
                "because of NaN or infinite weights."
            )

    def _log(self, pl_module: pl.LightningModule) -> None:
        assert self.groups is not None
        for name, value in rbv_metrics(self.groups, self.q).items():
            pl_module.log(name, value, prog_bar=name in PROGRESS_BAR, on_step=True, on_epoch=False)

    # -- checkpointing ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps, "since": self._since, "mode": self.mode, "q": self.q, "started": self._started}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = int(state_dict.get("steps", 0))
        self._since = int(state_dict.get("since", self._steps % self.every_n_steps))
        self._started = bool(state_dict.get("started", self._steps > 0))
