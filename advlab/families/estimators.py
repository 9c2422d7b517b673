"""Scikit-learn-style classifiers as trial models: anything with scikit-learn's fit/predict.

They train on the flattened training images and predict labels. Most have no input gradients,
so only attacks and measures that need predictions alone apply to them (validation refuses the
others); a family given a `decision` (logistic, linear_svm, rbf_svm: advlab.families.decision)
shows gradient attacks a torch version of its fitted decision function instead. Their clean
errors are always the estimator's own predict. The paper's critics' controls (logistic
regression, SVMs, a random forest, gradient boosting, k nearest neighbours) are built in; a
family of your own is one `estimator_family(...)` named by import path in a sweep file.
Fitted estimators are saved with skops, which rebuilds only the types it is told to trust
(scikit-learn's, NumPy's, SciPy's and the estimator's own module), so a results folder never
runs code of its own when loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from advlab.families.base import FitJob, ModelFamily, ModelNameError, ModelRequest, TrialModel
from advlab.families.decision import torch_decision, torch_labels
from advlab.models import validate_model_args
from advlab.strict import Strict

TRUSTED_MODULES = ("sklearn", "numpy", "scipy")


class EstimatorSettings(Strict):
    # Train on at most this many examples (a seeded subsample); None: all of them.
    max_train: int | None = Field(None, ge=1)


class EstimatorModule(nn.Module):
    """A prediction-only classifier seen as torch: one-hot scores of its predicted labels, so
    `argmax` is its prediction; there is nothing to differentiate."""

    def __init__(self, owner: EstimatorModel, num_classes: int) -> None:
        super().__init__()
        self.owner, self.num_classes = owner, num_classes

    def forward(self, x: Tensor) -> Tensor:
        labels = self.owner.predict_numpy(x.detach().flatten(1).cpu().numpy())
        scores = torch.zeros(len(x), self.num_classes, dtype=x.dtype, device=x.device)
        index = torch.as_tensor(labels, dtype=torch.int64, device=x.device)
        return scores.scatter_(1, index[:, None], 1.0)


Decision = Callable[[Any, int], nn.Module | None]  # (fitted estimator, K) -> torch view


class EstimatorModel(TrialModel):
    """A scikit-learn-style estimator; `module` is its torch decision function once fitted
    when the family has one (`gradients` then True), else an exact torch label oracle where one
    exists (k-NN: advlab.families.decision.torch_labels), else one-hot scores of its predictions."""

    def __init__(
        self,
        estimator: Any,
        request: ModelRequest,
        settings: Strict,
        decision: Decision | None = None,
    ) -> None:
        for method in ("fit", "predict"):
            if not callable(getattr(estimator, method, None)):
                raise ModelNameError(
                    f"model: {request.name} made a {type(estimator).__name__}, which has no "
                    f"{method}(); return a torch.nn.Module or a scikit-learn-style estimator"
                )
        self.estimator, self.request, self.settings = estimator, request, settings
        self.decision, self.device = decision, torch.device("cpu")
        self.gradients = decision is not None
        self.module = EstimatorModule(self, request.num_classes)

    def _fitted(self) -> None:
        """The module for the fitted estimator: its torch decision function when it has a
        faithful one, else the one-hot view (and then no gradients)."""
        view = None if self.decision is None else self.decision(self.estimator, self.num_classes)
        self.gradients = view is not None
        # without a decision function, a torch label oracle where one is exact (k-NN): the
        # same labels, queried far faster by decision-based attacks
        labels = view if view is not None else torch_labels(self.estimator, self.num_classes)
        module = labels if labels is not None else EstimatorModule(self, self.num_classes)
        module.estimator = self.estimator  # what exact minima read (advlab.attacks.exact)
        self.module = module.to(self.device).eval()

    @property
    def num_classes(self) -> int:
        return self.request.num_classes

    def predict(self, x: Tensor) -> Tensor:
        """The estimator's own predictions (clean errors and transfer never ask the view)."""
        labels = self.predict_numpy(x.detach().flatten(1).cpu().numpy())
        return torch.as_tensor(labels, dtype=torch.int64, device=x.device)

    def to(self, device: torch.device | str) -> TrialModel:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def fit(self, job: FitJob) -> list[Any]:
        # float64: the fitted model computes in float64, as its torch view does
        x = job.x_train.flatten(1).cpu().double().numpy()
        y = job.y_train.cpu().numpy()
        limit = getattr(self.settings, "max_train", None)
        if limit is not None and len(x) > limit:
            keep = np.random.default_rng(self.request.seed).permutation(len(x))[:limit]
            x, y = x[keep], y[keep]
        self.estimator.fit(x, y)
        self._fitted()
        return []  # no epochs: the trial records its clean errors once fitted

    def predict_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict(x.astype(np.float64))).astype(np.int64)

    def state(self) -> dict[str, Any]:
        import skops.io

        payload = skops.io.dumps(self.estimator)
        return {"estimator": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}

    def load_state(self, state: dict[str, Any]) -> None:
        import skops.io

        payload = state["estimator"].numpy().tobytes()
        own = type(self.estimator).__module__.split(".")[0]
        untrusted = skops.io.get_untrusted_types(data=payload)
        refused = [t for t in untrusted if t.split(".")[0] not in (*TRUSTED_MODULES, own)]
        if refused:
            raise ModelNameError(
                f"model: the saved {self.request.name} holds types advlab does not trust "
                f"({', '.join(refused[:3])}); retrain it"
            )
        self.estimator = skops.io.loads(payload, trusted=untrusted)
        self._fitted()


Make = Callable[[Any, int], Any]  # (validated settings, seed) -> unfitted estimator


def estimator_family(
    name: str,
    make: Make,
    settings: type[Strict] = EstimatorSettings,
    summary: str = "",
    decision: Decision | None = None,
) -> ModelFamily:
    """A model family of scikit-learn-style estimators: `make(settings, seed)` returns an
    unfitted estimator; the trial's model_args are validated against `settings` (give it a
    `max_train` field to let sweeps subsample large training sets). Without `decision` it is
    prediction-only; with one (e.g. advlab.families.decision.torch_decision), gradient attacks
    run on `decision(fitted estimator, K)`, a torch module whose argmax is its predict."""

    def build(request: ModelRequest) -> TrialModel:
        checked = validate_model_args(name, settings, request.args)
        return EstimatorModel(make(checked, request.seed), request, checked, decision)

    return ModelFamily(name, decision is not None, build, summary, settings, estimator=True)


# --------------------------------------------------------------------------- built in


class LogisticSettings(EstimatorSettings):
    C: float = Field(1.0, gt=0)
    max_iter: int = Field(200, ge=1)


class LinearSVMSettings(EstimatorSettings):
    C: float = Field(0.1, gt=0)


class RBFSettings(EstimatorSettings):
    C: float = Field(1.0, gt=0)
    max_train: int | None = Field(10_000, ge=1)  # the fit grows as n^2: subsampled by default


class ForestSettings(EstimatorSettings):
    n_estimators: int = Field(100, ge=1, le=100_000)
    max_depth: int | None = Field(None, ge=1)


class KNNSettings(EstimatorSettings):
    n_neighbors: int = Field(5, ge=1)


class BoostingSettings(EstimatorSettings):
    max_iter: int = Field(100, ge=1, le=100_000)  # boosting rounds (trees per class)
    learning_rate: float = Field(0.1, gt=0)
    max_depth: int | None = Field(None, ge=1)
    max_leaf_nodes: int = Field(31, ge=2)


def _logistic(s: LogisticSettings, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=s.C, max_iter=s.max_iter)


def _linear_svm(s: LinearSVMSettings, seed: int) -> Any:
    from sklearn.svm import LinearSVC

    return LinearSVC(C=s.C, random_state=seed)


def _rbf_svm(s: RBFSettings, seed: int) -> Any:
    from sklearn.svm import SVC

    # break_ties: predict is the argmax of decision_function, so its torch version is exact
    return SVC(kernel="rbf", C=s.C, gamma="scale", break_ties=True, random_state=seed)


def _forest(s: ForestSettings, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(
        n_estimators=s.n_estimators, max_depth=s.max_depth, random_state=seed
    )


def _knn(s: KNNSettings, seed: int) -> Any:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(n_neighbors=s.n_neighbors)


def _boosting(s: BoostingSettings, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=s.max_iter, learning_rate=s.learning_rate, max_depth=s.max_depth,
        max_leaf_nodes=s.max_leaf_nodes, early_stopping=False, random_state=seed,
    )  # fmt: skip


def _constant(s: EstimatorSettings, seed: int) -> Any:
    from sklearn.dummy import DummyClassifier

    return DummyClassifier(strategy="most_frequent")


BUILTIN = (
    estimator_family("logistic", _logistic, LogisticSettings, "logistic regression",
                     torch_decision),
    estimator_family("linear_svm", _linear_svm, LinearSVMSettings, "linear SVM", torch_decision),
    estimator_family("rbf_svm", _rbf_svm, RBFSettings, "RBF-kernel SVM", torch_decision),
    estimator_family("random_forest", _forest, ForestSettings, "random forest"),
    estimator_family("gradient_boosting", _boosting, BoostingSettings,
                     "gradient-boosted trees (histogram)"),
    estimator_family("knn", _knn, KNNSettings, "k nearest neighbours"),
    estimator_family("constant", _constant, EstimatorSettings, "the most frequent class"),
)  # fmt: skip
