"""The probing protocol's selection and leakage rules (helm.downstream.protocol), on runs whose
validation and test curves are scripted to disagree: every choice (epoch, grid point, ridge
penalty) follows validation, the test numbers are read where validation chose, and no statistic of
the validation or test records reaches training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helm.downstream import Grid, protocol
from helm.downstream.splits import TaskSplit
from helm.downstream.tasks import TaskData, TaskType

SPLIT = TaskSplit("s", np.arange(0, 4), np.arange(4, 8), np.arange(8, 12))


def _classes() -> TaskData:
    return TaskData(["ATG"] * 12, np.array([0, 1] * 6), TaskType.CLASSIFICATION, ["a", "b"])


def _scores(y: np.ndarray, accuracy: float) -> torch.Tensor:
    """(n, 2) class scores whose argmax is right on the first ``accuracy * n`` records."""
    right = np.arange(len(y)) < round(accuracy * len(y))
    pred = np.where(right, y, 1 - y)
    return torch.nn.functional.one_hot(torch.as_tensor(pred), 2).float() * 3.0


def _scripted_run(data: TaskData, val: list[float], test: list[float], patience: int = 10):
    """train_with_early_stopping on a head whose epoch e scores val[e] and test[e] accuracy."""
    epoch = {"n": -1}

    def train_epoch() -> None:
        epoch["n"] += 1

    def predict(idx: np.ndarray) -> torch.Tensor:
        curve = val if idx[0] == SPLIT.val[0] else test
        return _scores(data.targets[idx], curve[epoch["n"]])

    out = protocol.train_with_early_stopping(
        train_epoch, predict, data, SPLIT, 0.0, 1.0, len(val), patience
    )
    return out, epoch["n"] + 1


def test_the_epoch_is_chosen_on_validation_and_test_is_read_there():
    val, test = [0.25, 0.75, 0.5, 0.5, 0.25], [0.5, 0.25, 0.5, 1.0, 0.75]
    (best_val, test_metrics, epoch), trained = _scripted_run(_classes(), val, test)
    assert (epoch, best_val, test_metrics["accuracy"]) == (1, 0.75, 0.25)
    assert trained == 5


def test_training_stops_after_patience_epochs_without_a_better_validation_metric():
    val, test = [0.25, 0.75, 0.5, 0.75, 1.0], [0.0, 0.5, 0.5, 0.5, 1.0]
    (best_val, test_metrics, epoch), trained = _scripted_run(_classes(), val, test, patience=2)
    assert trained == 4  # epochs 2 and 3 do not beat epoch 1 (a tie is no improvement)
    assert (epoch, best_val, test_metrics["accuracy"]) == (1, 0.75, 0.5)


def test_the_grid_point_is_chosen_on_the_mean_validation_metric_over_seeds():
    """lr 1e-2 has the best single seed, 1e-3 the best mean, 1e-4 the best test: 1e-3 is chosen
    and its own test values are reported."""
    script = {1e-2: ([0.9, 0.1], [0.1, 0.2]), 1e-3: ([0.6, 0.6], [0.3, 0.4]),
              1e-4: ([0.5, 0.5], [0.9, 0.9])}  # fmt: skip

    def run(split, lr, batch_size, seed):
        val, test = script[lr]
        return val[seed], {"accuracy": test[seed]}, 0

    grid = Grid(lrs=tuple(script), batch_sizes=(8,), seeds=(0, 1), max_epochs=1, patience=1)
    result = protocol.search_grid(run, _classes(), [SPLIT], grid=grid, progress=False)
    assert result.chosen == [{"split": "s", "lr": 1e-3, "batch_size": 8}]
    assert result.values == [0.3, 0.4]


def test_the_ridge_penalty_is_chosen_on_validation(monkeypatch):
    """Column 0 ranks validation right and test wrong, column 1 the reverse; the first penalty's
    fit reads column 0, the others column 1."""
    y = np.arange(12, dtype=np.float64)
    c0 = np.concatenate([[3.0, 1.0, 2.0, 0.0], y[4:8], -y[8:]])
    x = np.stack([c0, -c0], axis=1)
    data = TaskData(["ATG"] * 12, y, TaskType.REGRESSION, ["y"])

    def fits(x_train, y_train, alphas):
        return [(np.array([1.0, 0.0] if i == 0 else [0.0, 1.0]), 0.0) for i in range(len(alphas))]

    monkeypatch.setattr(protocol, "ridge_path", fits)
    result = protocol.evaluate_pooled(x, data, [SPLIT])
    assert result.chosen == [{"split": "s", "alpha": protocol.RIDGE_ALPHAS[0]}]
    assert result.values == [pytest.approx(-1.0)]


def test_regression_targets_are_standardised_on_the_training_records_only():
    y = np.array([1.0, 2.0, 3.0, 4.0, 1001, 1002, 1003, 1004, 2001, 2002, 2003, 2004])
    data = TaskData(["ATG"] * 12, y, TaskType.REGRESSION, ["y"])
    z, mu, sd = protocol.training_targets(data, SPLIT.train)
    assert mu == pytest.approx(2.5) and sd == pytest.approx(np.sqrt(1.25))
    np.testing.assert_allclose(z * sd + mu, y)  # predictions map back with the same (mu, sd)
    shifted = TaskData(["ATG"] * 12, np.where(np.arange(12) < 4, y, y + 1000), "regression", ["y"])
    z2, mu2, sd2 = protocol.training_targets(shifted, SPLIT.train)
    assert (mu2, sd2) == (mu, sd) and np.array_equal(z2[:4], z[:4])


def test_token_features_are_standardised_with_training_statistics():
    feats = [torch.full((2, 3), float(i)) for i in range(12)]
    feats[5] = torch.full((2, 3), 1e6)  # a validation record far off: must not move anything
    mean, sd = protocol.token_statistics(feats, SPLIT.train)
    torch.testing.assert_close(mean, torch.full((3,), 1.5))
    torch.testing.assert_close(sd, torch.full((3,), float(np.std([0, 1, 2, 3]))))
