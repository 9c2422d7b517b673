"""advlab's HopSkipJump against ART's on the same scikit-learn models and examples (issue 31).

8x8 digits (advlab's embedded set: 1,347 training images, the first correctly classified test
images attacked). ART 1.20 (`pip install adversarial-robustness-toolbox`, a bench extra) runs
with its defaults (50 iterations, up to 10,000 probes per gradient estimate, one example at a
time) behind a BlackBoxClassifier that counts the images it classifies and answers with
scikit-learn's predict; advlab's then runs on the whole batch with `max_queries` set to ART's
mean queries per example, querying the model's exact label oracle in torch where it has one
(the argmax of the torch decision functions of logistic regression and the RBF SVM, the float64
nearest-neighbour votes of 1-NN: advlab.families.decision, each tested equal to predict) and
scikit-learn's predict otherwise (the forest). Labels only either way: HopSkipJump reads
nothing but the argmax. Success is judged by scikit-learn's predict for both. Prints per
model: the median L2 of each, the median per-example ratio of advlab's L2 to ART's and the
share of examples where advlab's is smaller, the ratio to the exact minimum (logistic
regression and 1-NN), the queries and the wall time per example.

    python benchmarks/hopskipjump_art.py --examples 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from advlab.attacks import hopskipjump
from advlab.data import load_dataset, select_subset
from advlab.families import FitJob, ModelRequest, resolve
from advlab.spec import TrainSpec

MODELS: dict[str, dict[str, Any]] = {
    "logistic": {},
    "rbf_svm": {},
    "random_forest": {"n_estimators": 100},
    "knn": {"n_neighbors": 1},
}


def fitted(name: str, x: torch.Tensor, y: torch.Tensor) -> Any:
    model = resolve(name).build(ModelRequest(name, (1, 8, 8), 10, args=MODELS[name]))
    model.fit(FitJob(x, y, x, y, TrainSpec(), 0.0, 0))
    return model


def art_run(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> tuple[np.ndarray, int]:
    """ART's HopSkipJump with its defaults; (adversarials, images classified)."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    count = [0]

    def one_hot(batch: np.ndarray) -> np.ndarray:
        count[0] += len(batch)
        labels = predict(batch.reshape(len(batch), -1))
        return np.eye(10, dtype=np.float32)[labels]

    classifier = BlackBoxClassifier(one_hot, (1, 8, 8), 10, clip_values=(0.0, 1.0))
    attack = HopSkipJump(classifier, targeted=False, norm=2, verbose=False)
    return attack.generate(x), count[0]


def exact_l2(model: Any, x: torch.Tensor, y: torch.Tensor) -> np.ndarray | None:
    from advlab.attacks import exact_minimum_attack

    if model.request.name not in ("logistic", "knn"):
        return None
    result = exact_minimum_attack(model.module, x, y)
    return (result.x_adv - x).flatten(1).norm(dim=1).double().numpy()


def compare(name: str, x_train, y_train, x_test, y_test, n: int) -> dict[str, Any]:
    model = fitted(name, x_train, y_train)
    keep = model.predict(x_test) == y_test
    x, y = x_test[keep][:n], y_test[keep][:n]
    # ART first: its query count sets advlab's budget
    start = time.perf_counter()
    art_adv, art_queries = art_run(model.predict_numpy, x.numpy())
    art_seconds = time.perf_counter() - start
    art_l2 = np.linalg.norm((art_adv - x.numpy()).reshape(n, -1), axis=1)
    art_fooled = model.predict_numpy(art_adv.reshape(n, -1)) != y.numpy()
    budget = art_queries // n
    start = time.perf_counter()
    ours = hopskipjump(
        model.module, x, y, max_queries=budget, generator=torch.Generator().manual_seed(0)
    )
    our_seconds = time.perf_counter() - start
    our_l2 = (ours.x_adv - x).flatten(1).norm(dim=1).double().numpy()
    our_fooled = model.predict_numpy(ours.x_adv.flatten(1).numpy()) != y.numpy()
    exact = exact_l2(model, x, y)
    both = art_fooled & our_fooled
    row = {
        "model": name, "oracle": type(model.module).__name__, "n": n, "queries": budget,
        "art_median_l2": float(np.median(np.where(art_fooled, art_l2, np.inf))),
        "ours_median_l2": float(np.median(np.where(our_fooled, our_l2, np.inf))),
        "art_fooled": float(art_fooled.mean()), "ours_fooled": float(our_fooled.mean()),
        "art_s_per_example": art_seconds / n, "ours_s_per_example": our_seconds / n,
        "speedup": art_seconds / our_seconds,
        "ours_max_queries_used": int(ours.grad_evals.max()),
        # per example: advlab's L2 over ART's (both fooled), and how often advlab's is smaller
        "median_ours_over_art": float(np.median((our_l2 / art_l2)[both])),
        "ours_closer_share": float((our_l2 < art_l2)[both].mean()),
    }  # fmt: skip
    if exact is not None:
        row["art_median_ratio"] = float(np.median(art_l2 / exact))
        row["ours_median_ratio"] = float(np.median(our_l2 / exact))
    return row


def digits() -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The embedded 8x8 digits and their 1,347 training images (subset 'all')."""
    data = load_dataset("digits")
    split = select_subset(data, "all")
    return data, data.x_train[split.train_idx], data.y_train[split.train_idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, x_train, y_train = digits()
    for name in args.models.split(","):
        row = compare(name, x_train, y_train, data.x_test, data.y_test, args.examples)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
