"""Every check that needs more than the sweep file, run before anything is run or written.

`advlab validate` and `advlab sweep` share it, and `advlab trial` runs its grid point's part,
so what a trial would find out an hour in (unwritable storage, no GPU, unreadable data, a model
factory that fails or returns the wrong shape, weights that do not fit) is one line and exit 2
up front instead.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from advlab import manifest
from advlab.data import Dataset, select_subset
from advlab.datafiles import memory_limit
from advlab.families import EstimatorModel, model_for, resolve
from advlab.filesystems import BadStorage
from advlab.models import ModelNameError, build_model, check_decays
from advlab.plan import check_needs, measures_of
from advlab.plugins import call_user, is_import_path
from advlab.robust_validation import carve_validation
from advlab.sources import load_data_spec
from advlab.spec import SpecError, TrialSpec
from advlab.store import SweepStore
from advlab.sweepfile import SweepSpec, short
from advlab.transfer_pairs import check_size


def preflight(spec: SweepSpec, store: SweepStore | None, address: str | None) -> dict[str, Dataset]:
    check_address(address)
    if store is not None:
        check_writable(store)
        check_same_sweep(spec, store)
    check_gpu(spec, address)
    check_precision(spec.trials, address)
    check_cpus(spec, address)
    datasets = check_data(spec)
    check_models(spec, datasets)
    check_probes(spec, datasets)
    check_transfer(spec)
    return datasets


def preflight_trial(spec: SweepSpec, index: int, store: SweepStore) -> None:
    """`advlab trial --index N`: the checks of that one grid point (storage, same sweep, data,
    subset, model, weights), so bad input is one line and exit 2 there too, nothing written."""
    check_writable(store)
    check_same_sweep(spec, store)
    trial = spec.trials[index]
    check_precision([trial], None)
    check_model(trial, check_trial_data(trial, {}))


def check_transfer(spec: SweepSpec) -> None:
    """A transfer stage too large for its pairs setting is refused now, with its size and the
    setting that fits, not after the trials (a search's samples counted as their grid points)."""
    search = spec.settings.search
    samples = search.num_samples if search.algorithm != "grid" else 1
    check_size(spec.trials * samples, spec.settings.transfer)


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """A cluster address must answer now: ray.init would otherwise retry it for minutes.
    ("auto" is Ray's own lookup of a local cluster, which fails fast by itself.)"""
    if address is None or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"--address: {address!r} is not host:port (or auto); e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise SpecError(
            f"--address: nothing answers at {hostport} ({err.strerror or err}); start a cluster "
            "with `ray start --head` or drop --address to run locally"
        ) from None


def check_writable(store: SweepStore) -> None:
    if store.is_remote:  # answers, and has the bucket; the first write tells the rest
        try:
            store.check_reachable()
        except BadStorage as err:
            raise SpecError(str(err)) from None
        return
    local = store.path()
    existing = local
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(
            f"storage: cannot write under {existing} (for {local}); "
            "pass --storage with a folder you can write to"
        )


def check_same_sweep(spec: SweepSpec, store: SweepStore) -> None:
    """A sweep file unrelated to the sweep already under this storage and name is refused
    (advlab.manifest.check_same_sweep); read without moving anything."""
    manifest.check_same_sweep(store.reader().read_manifest(), spec, f"storage {store.storage}")


def check_gpu(spec: SweepSpec, address: str | None) -> None:
    """A GPU trial on a machine without one would wait for resources forever."""
    wants_cuda = spec.settings.resources.gpu > 0 or any(t.device == "cuda" for t in spec.trials)
    if not wants_cuda or address is not None:
        return  # a cluster's GPUs are checked once Ray is up
    if not torch.cuda.is_available():
        raise SpecError(
            "resources.gpu: GPUs requested but this machine has none; set resources.gpu: 0 "
            "and device: auto, or pass --address of a cluster with GPU nodes"
        )


def check_precision(trials: list[TrialSpec], address: str | None) -> None:
    """float16 training needs a GPU: trials run here (no `--address`) on a machine without
    one would each fail at their first batch, so it is refused now. (`device: cpu` with
    float16 is refused by the spec itself; a cluster's trials find out on their node.)"""
    if address is not None or torch.cuda.is_available():
        return
    if any(t.train.precision == "float16" for t in trials):
        raise SpecError(
            "train.precision: float16 needs a GPU and this machine has none; use bfloat16 or "
            "float32, or pass --address of a cluster with GPU nodes"
        )


def check_cpus(spec: SweepSpec, address: str | None) -> None:
    """A trial asking for more CPUs than this machine has would wait for them forever."""
    have = os.cpu_count() or 1
    wanted = spec.settings.resources.cpu
    if address is None and wanted > have:
        raise SpecError(
            f"resources.cpu: {wanted:g} CPUs per trial but this machine has {have}; ask for at "
            f"most {have}, or pass --address of a cluster with larger nodes"
        )


def _data_key(trial: TrialSpec) -> str:
    return trial.dataset.model_dump_json()


def check_data(spec: SweepSpec) -> dict[str, Dataset]:
    """Load each data set once and draw each subset: missing files, bad arrays or a subset
    larger than the data fail here. Returns the loaded data sets by their spec."""
    loaded: dict[str, Dataset] = {}
    for trial in spec.trials:
        check_trial_data(trial, loaded)
    return loaded


def check_trial_data(trial: TrialSpec, loaded: dict[str, Dataset]) -> Dataset:
    """One trial's data (loaded once into `loaded`), subset, validation slice and measures."""
    key = _data_key(trial)
    try:
        if key not in loaded:
            loaded[key] = load_data_spec(trial.dataset)
        split = select_subset(loaded[key], trial.subset, trial.dataset.split_seed)
        fraction = trial.train.validation.fraction
        carve_validation(len(split.train_idx), fraction, trial.dataset.split_seed)
    except ValueError as err:  # a DataError, or a validation slice that leaves nothing
        raise SpecError(str(err)) from None
    check_measures(trial, len(split.train_idx))
    if trial.dataset.streaming:
        check_streaming(trial)
    return loaded[key]


def check_streaming(trial: TrialSpec) -> None:
    """What reads a whole training set at once cannot take a streaming one (read per batch)."""
    problem = None
    if trial.model.startswith("ae"):
        problem = f"model {trial.model} pretrains its autoencoder on the whole training set"
    elif trial.train.adversarial.method == "pool":
        problem = "train.adversarial.method pool keeps a pool drawn from the whole training set"
    elif resolve(trial.model).estimator:
        problem = f"model {trial.model} is fitted on the whole training set at once"
    if problem:
        raise SpecError(f"dataset.streaming: {problem}; drop streaming for it")


def check_probes(spec: SweepSpec, loaded: dict[str, Dataset]) -> None:
    """Every trial a search may draw (each choice's value, both ends of each range) checked
    as a grid point is, before Ray starts: its data, subset, model, arguments and weights."""
    for probe in spec.probes:
        try:
            check_model(probe.trial, check_trial_data(probe.trial, loaded))
        except SpecError as err:
            raise SpecError(
                f"{probe.key}: {short(probe.value)} makes a trial that cannot run: {err}"
            ) from None


def check_measures(trial: TrialSpec, n_train: int) -> None:
    """Each measure's own check of its settings against the trial's training subset."""
    for measure in measures_of(trial):
        check = measure.defn.check
        problem = check(measure.settings, n_train) if check is not None else None
        if problem:
            raise SpecError(f"measures: {measure.key}: {problem}")


def check_models(spec: SweepSpec, datasets: dict[str, Dataset]) -> None:
    """Build each distinct model once on its data's shape and run two blank inputs through it:
    a factory that fails, an output of the wrong shape, weights that do not fit, normalisation
    for the wrong number of channels or weight decays for the wrong number of layers."""
    seen: set[str] = set()
    for trial in spec.trials:
        key = trial.model_dump_json(
            include={"dataset", "model", "model_args", "init", "activation", "weight_decay"}
        )
        if key not in seen:
            seen.add(key)
            check_model(trial, datasets[_data_key(trial)])


def check_model(trial: TrialSpec, data: Dataset) -> None:
    shape, classes = data.input_shape, data.num_classes
    norm = trial.dataset.normalize
    if norm is not None and len(norm.mean) != shape[0]:
        raise SpecError(
            f"dataset.normalize: {len(norm.mean)} means for {shape[0]}-channel images; "
            f"give {shape[0]}"
        )
    check_model_size(trial, shape, classes)
    try:
        model = model_for(trial, shape, classes, weights="local")  # downloads at the trial
    except (ModelNameError, ValueError) as err:
        raise SpecError(str(err)) from None
    if isinstance(model, EstimatorModel):  # a factory's estimator: known only once built
        check_needs(trial, trial.model, gradients=model.gradients)
        return  # it predicts nothing before it is fitted
    module = model.module.eval()
    if trial.train.epochs > 0 and not any(p.requires_grad for p in module.parameters()):
        raise SpecError(
            f"model: {trial.model} has no parameters to train; give it trainable layers, or "
            "set train.epochs: 0 to evaluate it as it is"
        )
    wide = {p.dtype for p in module.parameters()} - {torch.float32}
    if wide:
        kind = str(sorted(wide, key=str)[0]).removeprefix("torch.")
        raise SpecError(
            f"model: {trial.model} has {kind} parameters; advlab trains and attacks float32 "
            "images, return a float32 model (e.g. `return net.float()`)"
        )
    with torch.no_grad():
        out = _forward(trial.model, module, torch.zeros(2, *shape, dtype=torch.float32))
    if tuple(out.shape) != (2, classes):
        raise SpecError(
            f"model: {trial.model} maps a (2, {', '.join(map(str, shape))}) batch to "
            f"{tuple(out.shape)}; it must return (2, {classes}) logits, one per class"
        )
    if not out.is_floating_point():
        raise SpecError(
            f"model: {trial.model} returns {str(out.dtype).removeprefix('torch.')} logits; "
            "return floating-point logits (attacks take their gradients)"
        )
    try:
        check_decays(module, trial.weight_decay, trial.model)
    except ModelNameError as err:
        raise SpecError(str(err)) from None


def check_model_size(trial: TrialSpec, shape: tuple[int, ...], classes: int) -> None:
    """A built-in or torchvision model counted on the meta device (nothing allocated): one
    too large to train here is refused before it is built, not by the allocator mid-build
    (or by the kernel, once overcommitted memory is touched). Your own factories are your
    code, and are not run twice."""
    if is_import_path(trial.model):
        return
    try:
        with torch.device("meta"):
            module = build_model(
                trial.model, shape, classes, trial.activation, trial.model_args, weights="none"
            )
    except Exception:  # the real build says what is wrong, in its own line
        return
    count = sum(p.numel() for p in module.parameters())
    need = 4 * 4 * count  # float32 weights, gradients and two optimizer moments
    if need > memory_limit():
        raise SpecError(
            f"model: {trial.model} has {count:,} parameters; training it needs about "
            f"{need / 2**30:.1f} GiB, more than half this machine's memory; use smaller layers"
        )


def _forward(name: str, model: torch.nn.Module, x: torch.Tensor) -> Any:
    # Guarded as user code: a forward that calls sys.exit must not end `validate` with 0.
    what = f"{name}'s forward on a batch of data's shape"
    out = call_user(model, "model", what, x, error=SpecError)
    if not isinstance(out, torch.Tensor):
        raise SpecError(f"model: {name} returned a {type(out).__name__}; return a logits tensor")
    return out


def check_cluster_gpus(spec: SweepSpec) -> None:
    import ray

    if spec.settings.resources.gpu > 0 and not ray.cluster_resources().get("GPU", 0):
        raise SpecError(
            "resources.gpu: the Ray cluster has no GPUs; set resources.gpu: 0 or add GPU nodes"
        )
