import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits

from lightning_bv.modules import DiabetesData, DigitsData, SplineData
from lightning_bv.modules.data import standardize, target_function


@pytest.mark.parametrize(("cls", "n", "d"), [(DigitsData, 1797, 64), (DiabetesData, 442, 10)])
def test_splits_are_fixed_disjoint_and_cover_everything(cls, n, d):
    a, b = cls(), cls()
    idx = a.split_indices
    together = torch.cat([idx["train"], idx["val"], idx["test"]])
    assert sorted(together.tolist()) == list(range(n))  # disjoint and complete
    assert len(idx["val"]) == len(idx["test"]) == -(-15 * n // 100)  # ceil(0.15 n)
    for split in ("train", "val", "test"):
        assert torch.equal(idx[split], b.split_indices[split])  # the same on every run (and every DDP process)
    assert not torch.equal(cls(seed=1).split_indices["train"], idx["train"])
    assert a.num_features == d
    assert a.x_train.shape == (len(idx["train"]), d)
    assert a.x_train.dtype == torch.float32


def test_digits_standardized_with_train_statistics_only():
    data = DigitsData()
    raw = torch.as_tensor(load_digits().data, dtype=torch.float32)
    train, val = raw[data.split_indices["train"]], raw[data.split_indices["val"]]
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    torch.testing.assert_close(data.x_val, (val - mean) / std)
    varying = train.std(0) > 0
    torch.testing.assert_close(data.x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.x_train.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-5, rtol=0)
    assert torch.equal(data.x_train[:, ~varying], torch.zeros(len(train), int((~varying).sum())))  # constant pixels
    assert data.y_train.dtype == torch.int64
    assert set(data.y_train.tolist()) == set(range(10))


def test_diabetes_target_standardized_and_recoverable():
    data = DiabetesData()
    raw = torch.as_tensor(load_diabetes().target, dtype=torch.float32)
    assert data.y_train.shape == (len(data.x_train), 1)
    assert abs(float(data.y_train.mean())) < 1e-5
    assert float(data.y_train.std()) == pytest.approx(1.0, abs=1e-5)
    test = data.y_test.squeeze(1) * data.target_std + data.target_mean
    torch.testing.assert_close(test, raw[data.split_indices["test"]])
    plain = DiabetesData(standardize_target=False)
    torch.testing.assert_close(plain.y_test.squeeze(1), raw[data.split_indices["test"]])


def test_loaders():
    data = DigitsData(batch_size=100)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (100, 64)
    assert y.shape == (100,)
    assert data.train_dataloader().num_workers == 0
    first_val = next(iter(data.val_dataloader()))[0]
    assert torch.equal(first_val, data.x_val[:100])  # not shuffled
    assert sum(len(b[0]) for b in data.test_dataloader()) == len(data.x_test)
    assert torch.equal(data.example_input_array, data.x_train[:2])


def test_spline_data():
    data = SplineData(n_train=11, n_val=7, n_test=5, noise=0.0, function="abs")
    torch.testing.assert_close(data.x_train.squeeze(1), torch.linspace(-1, 1, 11))
    torch.testing.assert_close(data.y_train, data.x_train.abs())
    assert data.x_val.shape == (7, 1)
    assert data.x_test.shape == (5, 1)
    assert float(data.x_val.abs().max()) <= 1
    assert data.batch_size == 11  # full batch by default
    noisy, again = SplineData(noise=0.1), SplineData(noise=0.1)
    assert torch.equal(noisy.y_train, again.y_train)
    residual = noisy.y_train - target_function("sine", noisy.x_train)
    assert 0.02 < float(residual.std()) < 0.3
    assert not torch.equal(SplineData(noise=0.1, seed=1).y_train, noisy.y_train)


def test_standardize_constant_column_is_only_centered():
    a, b = standardize(torch.tensor([[1.0, 3.0], [3.0, 3.0]]), torch.tensor([[2.0, 4.0]]))
    assert b.tolist() == [[0.0, 1.0]]
    assert a[:, 1].tolist() == [0.0, 0.0]
