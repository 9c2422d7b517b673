"""Non-neural control classifiers (scikit-learn), the transfer stage's targets beside the nets.

The paper's critics asked whether adversarial examples are a property of neural networks; these
controls answer it: each is trained on the same training subset as the source trials and fed
their adversarial examples. One registry, so a new control is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONTROLS = ("logistic", "linear_svm", "rbf_svm", "random_forest", "knn", "constant")
KERNEL_CONTROLS = {"rbf_svm"}  # fit cost grows as n^2: trained on a subsample


def make_control(name: str, seed: int) -> Any:
    """An unfitted scikit-learn classifier by name (sklearn is imported only here, lazily)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC, LinearSVC

    factories: dict[str, Callable[[], Any]] = {
        "logistic": lambda: LogisticRegression(max_iter=200),
        "linear_svm": lambda: LinearSVC(C=0.1, random_state=seed),
        "rbf_svm": lambda: SVC(kernel="rbf", gamma="scale", random_state=seed),
        "random_forest": lambda: RandomForestClassifier(n_estimators=100, random_state=seed),
        "knn": lambda: KNeighborsClassifier(n_neighbors=5),
        "constant": lambda: DummyClassifier(strategy="most_frequent"),
    }
    if name not in factories:
        raise ValueError(f"control {name!r} is unknown; use one of {', '.join(CONTROLS)}")
    return factories[name]()
