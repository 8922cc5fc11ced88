"""The probing protocol of the HELM paper on frozen features: splits, grid, seeds, selection.

For every split, learning rate and batch size, and every seed, a head is trained with Adam on the
training records; after each epoch the validation and test metrics are recorded, training stops
once the validation metric has not improved for `patience` epochs, and the run's result is the
TEST metric at the epoch of best VALIDATION metric (`select_at_best_val`). The grid point with
the best validation metric (mean over seeds) is chosen, and its test metrics are reported as mean
and standard deviation over seeds (and folds). ``head="linear"`` replaces the TextCNN by ridge or
L2 logistic regression on mean-pooled features, its penalty chosen on validation.

`train_with_early_stopping` (one run's epochs) and `search_grid` (grid, seeds, selection) also run
the finetuning of `helm.downstream.finetune`, so probes and finetuning share one protocol.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from helm.data.io import DataError
from helm.downstream.heads import (
    Standardizer,
    TextCNN,
    fit_logistic,
    logistic_scores,
    mean_pool,
    pad_features,
    ridge_path,
)
from helm.downstream.metrics import LOWER_IS_BETTER, PRIMARY, better, compute_metrics
from helm.downstream.runs import PAPER_GRID, Grid, Progress, RunStore
from helm.downstream.splits import TaskSplit, check_splits
from helm.downstream.tasks import TaskData, TaskType

logger = logging.getLogger("helm")


RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
LOGISTIC_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
_EVAL_BATCH = 64


# --------------------------------------------------------------------------------------------------
# Selection and results


def select_at_best_val(
    val_curve: Sequence[float], test_curve: Sequence[float], mode: str = "max"
) -> tuple[int, float]:
    """(epoch, test value) at the epoch of best validation value; the earliest epoch wins ties.

    `mode` is ``"max"`` or ``"min"``; nan validation values never win. Epochs count from 0.
    """
    if len(val_curve) != len(test_curve) or not len(val_curve):
        raise ValueError("val_curve and test_curve must be non-empty and of equal length")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    keyed = [sign * v if not math.isnan(v) else -math.inf for v in val_curve]
    epoch = int(np.argmax(keyed))  # argmax returns the first maximum
    return epoch, float(test_curve[epoch])


@dataclass
class ProbeResult:
    """Test metrics of one method on one task, over seeds and splits, at the chosen grid point.

    `values` holds the primary test metric of each run (`num_splits` splits x `num_seeds` seeds;
    one run per split for the deterministic linear heads); `test_metrics` maps every metric to its
    (mean, sd); `chosen` the hyperparameters picked on validation for each split; `grid` one row
    per split and grid point with its mean validation and test values over seeds; `input` what
    the method read of each record (e.g. the first 510 codons).
    """

    method: str
    task: str
    metric: str
    values: list[float]
    test_metrics: dict[str, tuple[float, float]]
    chosen: list[dict]
    grid: list[dict] = field(default_factory=list)
    num_splits: int = 1
    num_seeds: int = 1
    input: str = ""

    @property
    def mean(self) -> float:
        """Mean of the primary test metric over runs."""
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof = 1) of the primary test metric over runs; nan for
        a single run, which has no spread to report."""
        return _sd(self.values)

    def to_dict(self) -> dict:
        """JSON-able form, with the mean and sd (ddof = 1) spelled out."""
        return {**asdict(self), "mean": self.mean, "std": self.std, "ddof": 1}


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _summarise(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = sorted({k for r in runs for k in r})
    return {k: (float(np.mean(v)), _sd(v)) for k in keys if (v := [r[k] for r in runs if k in r])}


# --------------------------------------------------------------------------------------------------
# Training


def training_targets(
    data: TaskData, train: np.ndarray
) -> tuple[np.ndarray, float | np.ndarray, float | np.ndarray]:
    """Training-space targets and the (mean, std) that map predictions back to the data's units."""
    y = data.targets
    if data.task != TaskType.REGRESSION:
        return y, 0.0, 1.0
    # Standardise on train only, so no statistic of val or test leaks into training.
    mu, sd = y[train].mean(axis=0), y[train].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (y - mu) / sd, mu, sd


def task_loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE (regression, standardised targets), cross-entropy (classes) or BCE (labels)."""
    if task == TaskType.REGRESSION:
        return F.mse_loss(out.reshape(y.shape), y)
    if task == TaskType.CLASSIFICATION:
        return F.cross_entropy(out, y)
    return F.binary_cross_entropy_with_logits(out, y)


def train_with_early_stopping(
    train_epoch: Callable[[], None],
    predict: Callable[[np.ndarray], torch.Tensor],
    data: TaskData,
    split: TaskSplit,
    mu: float | np.ndarray,
    sd: float | np.ndarray,
    max_epochs: int,
    patience: int,
) -> tuple[float, dict[str, float], int]:
    """The epoch loop of one run: (best validation value, test metrics at that epoch, that epoch).

    `train_epoch` trains one pass over ``split.train``; `predict` maps record indices to the raw
    head outputs (N, num_outputs) in training space. After each epoch the validation and test
    metrics are recorded (class scores through softmax, label scores through sigmoid, regression
    mapped back by ``* sd + mu``); training stops once the validation metric has not improved for
    `patience` epochs, and the test metrics are those at the best validation epoch.
    """
    task, metric = data.task, PRIMARY[data.task]
    val_curve, test_curve, test_runs = [], [], []
    best, since_best = math.nan, 0
    for _ in range(max_epochs):
        train_epoch()
        scored = []
        for part in (split.val, split.test):
            out = predict(part).float()
            if task == TaskType.CLASSIFICATION:
                out = out.softmax(dim=-1)
            elif task == TaskType.MULTILABEL:
                out = out.sigmoid()
            pred = out.cpu().numpy().astype(np.float64)
            if task == TaskType.REGRESSION:
                pred = pred.reshape(len(part), -1) * sd + mu
                pred = pred[:, 0] if data.targets.ndim == 1 else pred
            scored.append(compute_metrics(task, data.targets[part], pred, data.label_names))
        val_curve.append(scored[0][metric])
        test_curve.append(scored[1][metric])
        test_runs.append(scored[1])
        if better(metric, val_curve[-1], best):
            best, since_best = val_curve[-1], 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    mode = "min" if metric in LOWER_IS_BETTER else "max"
    epoch, _ = select_at_best_val(val_curve, test_curve, mode)
    return val_curve[epoch], test_runs[epoch], epoch


def token_statistics(
    feats: Sequence[torch.Tensor], records: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, sd) of the tokens of `records`, accumulated in float64; a constant
    dimension gets sd 1 so it stays 0 after standardising."""
    total = torch.zeros(feats[0].shape[-1], dtype=torch.float64)
    squares, count = torch.zeros_like(total), 0
    for i in records:
        f = feats[i].to(torch.float64)
        total += f.sum(0)
        squares += (f * f).sum(0)
        count += len(f)
    mean = total / count
    sd = (squares / count - mean * mean).clamp_min(0).sqrt()
    sd = torch.where(sd > 1e-6 * (mean.abs() + 1), sd, torch.ones_like(sd))
    return mean.float(), sd.float()


def _train_textcnn(
    feats: list[torch.Tensor],
    data: TaskData,
    split: TaskSplit,
    lr: float,
    batch_size: int,
    seed: int,
    max_epochs: int,
    patience: int,
    device: str,
) -> tuple[float, dict[str, float], int]:
    """One run: (best validation value, test metrics at that epoch, that epoch).

    The features are standardised per dimension with the mean and sd of the training records'
    tokens, as the linear probe's are: raw hidden states have offsets and scales that differ by
    orders of magnitude between dimensions, which left the TextCNN far below a linear probe on
    the same features (on the tests' anisotropic synthetic features, Spearman 0.72 unscaled and
    0.97 standardised, the linear probe 0.97), while one-hot inputs, on one scale, trained well.
    """
    task = data.task
    f_mean, f_std = token_statistics(feats, split.train)
    f_mean, f_std = f_mean.to(device), f_std.to(device)
    y, mu, sd = training_targets(data, split.train)
    y_train = torch.as_tensor(
        y, dtype=torch.int64 if task == TaskType.CLASSIFICATION else torch.float32
    )
    torch.manual_seed(seed)  # the head's initialisation and dropout
    order = torch.Generator().manual_seed(seed)  # the epochs' shuffling
    model = TextCNN(feats[0].shape[-1], data.num_outputs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def train_epoch() -> None:
        model.train()
        perm = split.train[torch.randperm(len(split.train), generator=order).numpy()]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            x, mask = pad_features([feats[i] for i in idx], device)
            x = (x - f_mean) / f_std  # padding stays out: the head zeroes it after projecting
            loss = task_loss(task, model(x, mask), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(idx: np.ndarray) -> torch.Tensor:
        model.eval()
        outs = []
        for start in range(0, len(idx), _EVAL_BATCH):
            x, mask = pad_features([feats[i] for i in idx[start : start + _EVAL_BATCH]], device)
            outs.append(model((x - f_mean) / f_std, mask).float())
        return torch.cat(outs)

    return train_with_early_stopping(
        train_epoch, predict, data, split, mu, sd, max_epochs, patience
    )


def _linear_probe(
    x: np.ndarray, data: TaskData, split: TaskSplit
) -> tuple[dict, dict[str, float], list[dict]]:
    """Ridge / logistic regression on pooled features, penalty chosen on val.

    Returns (chosen hyperparameters, test metrics, grid rows).
    """
    task, metric = data.task, PRIMARY[data.task]
    scale = Standardizer(x[split.train])
    x = scale(x)
    rows = []
    if task == TaskType.REGRESSION:
        y, mu, sd = training_targets(data, split.train)
        fits = ridge_path(x[split.train], y[split.train], RIDGE_ALPHAS)
        preds = [(x @ w + b) * sd + mu for w, b in fits]
        grid = [({"alpha": a}, p) for a, p in zip(RIDGE_ALPHAS, preds)]
    else:
        multilabel = task == TaskType.MULTILABEL
        grid = []
        for l2 in LOGISTIC_L2:
            model = fit_logistic(
                x[split.train], data.targets[split.train], data.num_outputs, l2, multilabel
            )
            grid.append(({"l2": l2}, logistic_scores(model, x, multilabel)))
    best = None
    for params, pred in grid:
        val = compute_metrics(task, data.targets[split.val], pred[split.val], data.label_names)
        test = compute_metrics(task, data.targets[split.test], pred[split.test], data.label_names)
        rows.append({"split": split.name, **params, "val": val[metric], "test": test[metric]})
        if best is None or better(metric, val[metric], best[0]):
            best = (val[metric], params, test)
    return best[1], best[2], rows


def evaluate_pooled(
    x: np.ndarray,
    data: TaskData,
    splits: Sequence[TaskSplit],
    method: str = "linear",
    input: str = "",
) -> ProbeResult:
    """Ridge (regression) or L2 logistic regression on one (N, D) feature vector per record.

    Features are standardised on train; the penalty is chosen on val per split. The fit is
    deterministic, so each split contributes one run.
    """
    check_splits(splits, len(data))
    chosen, runs, grid = [], [], []
    for split in splits:
        params, test, rows = _linear_probe(np.asarray(x, dtype=np.float64), data, split)
        chosen.append({"split": split.name, **params})
        runs.append(test)
        grid += rows
    metric = PRIMARY[data.task]
    values = [r[metric] for r in runs]
    summary = _summarise(runs)
    return ProbeResult(
        method, data.task, metric, values, summary, chosen, grid, len(splits), 1, input
    )


# --------------------------------------------------------------------------------------------------
# The protocol


def evaluate_probe(
    features: Sequence[np.ndarray],
    data: TaskData,
    splits: Sequence[TaskSplit],
    *,
    grid: Grid = PAPER_GRID,
    task: str | None = None,
    head: str = "textcnn",
    device: str = "cpu",
    progress: bool = True,
    method: str | None = None,
    store: RunStore | None = None,
    input: str = "",
) -> ProbeResult:
    """Evaluate frozen per-token features on a task with the paper's protocol (module docstring).

    Args:
        features: one (T_i, D) array per record of `data`, in the same order.
        data: the task; `task` overrides its type (normally left None).
        splits: from `make_splits`; several (k-fold) pool their runs into one mean and std.
        grid: the learning rates, batch sizes, seeds, epoch budget and patience of the TextCNN
            head's search (`Grid`); the linear head is deterministic and runs once per split.
        head: ``"textcnn"`` or ``"linear"``.
        method: the name in the result (defaults to the head).
        store: finished TextCNN runs are kept there and read back on a rerun (`RunStore`).
        input: what the features cover of each record, for the report.
    """
    if len(features) != len(data):
        raise DataError(f"{len(features)} feature arrays for {len(data)} records of {data.source}")
    if task is not None and task != data.task:
        data = TaskData(**{**data.__dict__, "task": task})
    check_splits(splits, len(data))
    empty = [i for i, f in enumerate(features) if len(f) == 0]
    if empty:
        raise DataError(f"records {empty[:5]} have no feature rows (empty after tokenization?)")
    if head == "linear":
        return evaluate_pooled(
            mean_pool(features), data, splits, method=method or "linear", input=input
        )
    if head != "textcnn":
        raise ValueError(f"head must be 'textcnn' or 'linear', got {head!r}")

    feats = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in features]

    def run(split: TaskSplit, lr: float, batch_size: int, seed: int):
        return _train_textcnn(
            feats, data, split, lr, batch_size, seed, grid.max_epochs, grid.patience, device
        )

    result = search_grid(
        run,
        data,
        splits,
        grid=grid,
        progress=progress,
        method=method or head,
        store=store,
    )
    result.input = input
    return result


def search_grid(
    run: Callable[[TaskSplit, float, int, int], tuple[float, dict[str, float], int]],
    data: TaskData,
    splits: Sequence[TaskSplit],
    *,
    grid: Grid,
    progress: bool = True,
    method: str = "textcnn",
    store: RunStore | None = None,
) -> ProbeResult:
    """Grid x seeds per split; the grid point of best mean validation metric is chosen.

    ``run(split, lr, batch_size, seed)`` trains one model and returns (best validation value,
    test metrics at that epoch, that epoch), as `train_with_early_stopping` does. The chosen grid
    point's test runs of every split are pooled into one `ProbeResult`. With a `store`, each run
    is written there as it finishes and a run already there is read instead of trained; each run
    logs its place in the search and an estimate of the time left.
    """
    metric = PRIMARY[data.task]
    chosen, runs, rows = [], [], []
    counter = Progress(len(splits) * grid.runs_per_split)
    for split in splits:
        digest = hashlib.sha256(b"".join(p.tobytes() for p in (split.train, split.val, split.test)))
        best = None  # (mean val, params, test metrics of each seed)
        for lr in grid.lrs:
            for batch_size in grid.batch_sizes:
                vals, tests = [], []
                for seed in grid.seeds:
                    settings = {"method": method, "split": split.name, "split_sha256":
                                digest.hexdigest(), "lr": lr, "batch_size": batch_size,
                                "seed": seed}  # fmt: skip
                    result = store.get(settings) if store is not None else None
                    cached = result is not None
                    if result is None:
                        result = run(split, lr, batch_size, seed)
                        if store is not None:
                            store.put(settings, result)
                    val, test, epoch = result
                    vals.append(val)
                    tests.append(test)
                    where = counter.step(cached)
                    if progress:
                        logger.info(
                            "%s %s lr %g batch %d seed %d: best val %s %.4f at epoch %d, test "
                            "%.4f%s [%s]",
                            method, split.name, lr, batch_size, seed, metric, val, epoch + 1,
                            test[metric], " (stored)" if cached else "", where,
                        )  # fmt: skip
                val_mean = float(np.nanmean(vals)) if not np.isnan(vals).all() else math.nan
                params = {"lr": lr, "batch_size": batch_size}
                test_mean = float(np.mean([t[metric] for t in tests]))
                rows.append({"split": split.name, **params, "val": val_mean, "test": test_mean})
                if best is None or better(metric, val_mean, best[0]):
                    best = (val_mean, params, tests)
        chosen.append({"split": split.name, **best[1]})
        runs += best[2]
        if progress:
            logger.info("%s %s: chose %s (val %s %.4f)", method, split.name, best[1], metric,
                        best[0])  # fmt: skip
    values = [r[metric] for r in runs]
    summary = _summarise(runs)
    return ProbeResult(
        method, data.task, metric, values, summary, chosen, rows, len(splits), len(grid.seeds)
    )
