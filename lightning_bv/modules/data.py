"""LightningDataModules on data that never downloads: a noisy 1-D function, and scikit-learn's bundled datasets.

* :class:`SplineData`: points ``(x, f(x) + noise)`` of a known 1-D function, the setting of the 1-D representer
  theorem (the fit is a linear spline).
* :class:`DigitsData`: ``sklearn.datasets.load_digits`` (1,797 8x8 images of digits, 64 features, 10 classes).
* :class:`DiabetesData`: ``sklearn.datasets.load_diabetes`` (442 patients, 10 features, a real target).

The scikit-learn data ship inside the scikit-learn package. Every split is fixed by ``seed`` (the same on every run
and every DDP process); features are standardized with the mean and standard deviation of the training split only.
Each datamodule has ``num_features``, ``example_input_array`` (two training inputs) and the split tensors
(``x_train``, ``y_train``, ``x_val``, ...), available right after construction.

Example:
    >>> data = DigitsData(batch_size=32)
    >>> data.num_features, data.num_classes, len(data.x_train), len(data.x_val), len(data.x_test)
    (64, 10, 1257, 270, 270)
    >>> x, y = next(iter(data.train_dataloader()))
    >>> tuple(x.shape), y.dtype
    ((32, 64), torch.int64)

"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_bv._checks import check_choice, check_int, check_nonnegative

FUNCTIONS = ("sine", "abs", "step")


def _check_fractions(val_fraction: Any, test_fraction: Any) -> None:
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"`{arg}` must be a float in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be < 1 (the rest is the training split), got "
            f"{val_fraction} + {test_fraction}"
        )


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Standardize every tensor with the per-column mean and standard deviation of ``train``.

    A column that is constant in ``train`` is only centered (its standard deviation is taken as 1).

    Example:
        >>> a, b = standardize(torch.tensor([[0.0, 5.0], [2.0, 5.0]]), torch.tensor([[4.0, 6.0]]))
        >>> a.mul(2**0.5).round().tolist(), b.mul(2**0.5).round().tolist()  # std of [0, 2] is sqrt(2)
        ([[-1.0, 0.0], [1.0, 0.0]], [[3.0, 1.0]])
    """
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others))


class _TensorData(pl.LightningDataModule):
    """Fixed train/val/test tensors and their loaders (training shuffled; ``num_workers=0``)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, 1)

    @property
    def num_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])

    @property
    def example_input_array(self) -> Tensor:
        """The first two training inputs."""
        return self.x_train[:2].clone()

    def _loader(self, x: Tensor, y: Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=shuffle, num_workers=0)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.x_train, self.y_train, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.x_val, self.y_val, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.x_test, self.y_test, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.x_test, self.y_test, shuffle=False)


def _split(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices of a seeded random split of ``range(n)`` into train, val and test (val and test rounded up)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = math.ceil(val_fraction * n), math.ceil(test_fraction * n)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class _SklearnData(_TensorData):
    def __init__(self, batch_size: int, val_fraction: float, test_fraction: float, seed: int) -> None:
        super().__init__(batch_size)
        _check_fractions(val_fraction, test_fraction)
        self.seed = check_int("seed", seed, 0)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        x, y = self._load()
        train, val, test = _split(len(x), self.val_fraction, self.test_fraction, self.seed)
        self.x_train, self.x_val, self.x_test = standardize(x[train], x[val], x[test])
        self.y_train, self.y_val, self.y_test = y[train], y[val], y[test]
        self.split_indices = {"train": train, "val": val, "test": test}

    def _load(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class DigitsData(_SklearnData):
    """scikit-learn's bundled handwritten digits: 1,797 images of 8x8 pixels (64 features), 10 classes.

    Inputs are float32 ``[N, 64]``, standardized with the training split's statistics; labels int64 ``[N]``. The
    split is a seeded random permutation: ``ceil(val_fraction * N)`` validation, ``ceil(test_fraction * N)`` test,
    the rest training (1,257 / 270 / 270 with the defaults).

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of the data for validation, in ``(0, 1)``.
        test_fraction: fraction of the data for test, in ``(0, 1)``; the two sum to less than 1.
        seed: the split's seed.
    """

    num_classes = 10

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)

    def _load(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


class DiabetesData(_SklearnData):
    """scikit-learn's bundled diabetes data: 442 patients, 10 features, a disease progression score one year later.

    Inputs are float32 ``[N, 10]``, standardized with the training split's statistics (scikit-learn ships them
    already scaled; standardizing again makes that scaling irrelevant). Targets are float32 ``[N, 1]``, standardized
    too when ``standardize_target`` (then ``target_mean`` and ``target_std`` give the original scale back).

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of the data for validation, in ``(0, 1)``.
        test_fraction: fraction of the data for test, in ``(0, 1)``; the two sum to less than 1.
        seed: the split's seed.
        standardize_target: standardize the target with the training split's mean and standard deviation.
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        standardize_target: bool = True,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.target_mean, self.target_std = 0.0, 1.0
        if standardize_target:
            self.target_mean, self.target_std = float(self.y_train.mean()), float(self.y_train.std())
            self.y_train, self.y_val, self.y_test = (
                (y - self.target_mean) / self.target_std for y in (self.y_train, self.y_val, self.y_test)
            )

    def _load(self) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)


def target_function(name: str, x: Tensor) -> Tensor:
    """The known 1-D functions of :class:`SplineData`: ``"sine"`` ``sin(3x) + x/2``, ``"abs"`` ``|x|``, ``"step"``.

    ``"step"`` is a smoothed step ``tanh(10 x)``: a linear spline needs few knots for ``"abs"`` (one) and more for
    the others.

    Example:
        >>> target_function("abs", torch.tensor([-1.0, 0.5])).tolist()
        [1.0, 0.5]
    """
    check_choice("function", name, FUNCTIONS)
    if name == "sine":
        return torch.sin(3 * x) + 0.5 * x
    if name == "abs":
        return x.abs()
    return torch.tanh(10 * x)


class SplineData(_TensorData):
    """Noisy samples ``y = f(x) + noise * N(0, 1)`` of a known function on ``[-1, 1]`` (see :func:`target_function`).

    The training inputs are ``n_train`` equispaced points (as in the 1-D representer theorem's examples); validation
    and test inputs are uniform random in ``[-1, 1]``. Inputs and targets are float32 ``[N, 1]``, not standardized.
    Everything is fixed by ``seed``; the training noise, validation and test sets use separate seeds.

    Args:
        n_train: training points (``>= 2``).
        n_val: validation points.
        n_test: test points.
        noise: standard deviation of the Gaussian noise added to every target, ``>= 0``.
        function: ``"sine"``, ``"abs"`` or ``"step"``.
        batch_size: samples per batch (default: the whole training set, one step per epoch).
        seed: seed of the noise and of the validation/test inputs.

    Example:
        >>> data = SplineData(n_train=20, noise=0.0, function="abs")
        >>> data.x_train[:2].squeeze(1).tolist(), data.y_train[:2].squeeze(1).tolist()
        ([-1.0, -0.8947368264198303], [1.0, 0.8947368264198303])
    """

    def __init__(
        self,
        n_train: int = 20,
        n_val: int = 200,
        n_test: int = 200,
        noise: float = 0.1,
        function: str = "sine",
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        n_train = check_int("n_train", n_train, 2)
        super().__init__(n_train if batch_size is None else batch_size)
        self.n_val, self.n_test = check_int("n_val", n_val, 1), check_int("n_test", n_test, 1)
        noise = check_nonnegative("noise", noise)
        check_choice("function", function, FUNCTIONS)
        self.noise, self.function = noise, function
        self.seed = check_int("seed", seed, 0)
        g = torch.Generator().manual_seed(self.seed)
        self.x_train = torch.linspace(-1, 1, n_train).unsqueeze(1)
        self.x_val = 2 * torch.rand(self.n_val, 1, generator=g) - 1
        self.x_test = 2 * torch.rand(self.n_test, 1, generator=g) - 1
        self.y_train, self.y_val, self.y_test = (
            target_function(function, x) + self.noise * torch.randn(x.shape, generator=g)
            for x in (self.x_train, self.x_val, self.x_test)
        )
