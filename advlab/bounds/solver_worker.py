"""Mixed-integer solves in worker processes, so that a solver's crash or hang costs one example.

Why processes: OR-Tools and python-mip crash when loaded into one process (clashing solver
libraries), and a native solver can segfault or ignore its time limit. Each worker is a fresh
interpreter (no fork: the parent may hold torch threads and locks) that imports only the solver
it is asked for; problems travel as numpy arrays (advlab.bounds.milp.MipProblem). The parent
waits for each answer for the problem's time limit plus `grace` seconds; a worker that dies or
overruns is killed, its example is recorded as failed with the reason, and a fresh worker
takes the rest.

Backends: `cbc` (OR-Tools' CBC: MILP), `highs` (scipy.optimize.milp: MILP), `scip`
(PySCIPOpt: MILP and the convex quadratic objective of L2). Every backend runs on one thread
with a relative gap of 0, so "optimal" means proven to the solver's tolerances.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import IO, Any

import numpy as np

from advlab.bounds.milp import MipProblem

SOLVE = "advlab.bounds.solver_worker:solve"
STARTUP_S = 120.0  # a worker's start (Python, numpy, the solver library) on a loaded machine
Answer = dict[str, Any]  # status, values, objective, bound, seconds, solver_status, reason
# CBC prunes nodes within an absolute cutoff increment of 1e-5 (which OR-Tools cannot set) and
# HiGHS stops at an absolute gap of 1e-6 (which scipy cannot set): in units of a distance of
# ~0.01 that claimed "optimal" 5e-7 above the true minimum on a digits net. Their objectives
# are scaled by SCALE, which makes those absolute gaps 1e-9 and 1e-10 of a distance. SCIP's
# absolute gap is 0 already.
SCALE = 1e4
# SCIP on L2 (the epigraph row s >= QUADRATIC_SCALE * ||d||^2): its outer approximation of the
# quadratic closes the gap only slowly, so it stops at a relative gap of QUADRATIC_GAP on
# ||d||^2 (5e-6 on the distance), reported as optimal; the row's feasibility tolerance lets s
# undershoot, which only loosens the (still valid) lower bound. Measured on a 64-16-16-10 net:
# feastol 1e-6 unscaled left lower 1e-4 below upper; 1e-8 and 1e-9 stalled in the root for
# 15 s; 1e-7 with the row scaled by 100 closed to 3e-6 in 0.3-1.6 s.
SCIP_FEASTOL = 1e-7
QUADRATIC_SCALE = 100.0
QUADRATIC_GAP = 1e-5
_LOADED: set[str] = set()  # the solvers this process has loaded
_MODULES = {"cbc": "ortools.linear_solver.pywraplp", "highs": "scipy.optimize", "scip": "pyscipopt"}


def solve(problem: MipProblem) -> Answer:
    """Solve one problem with its backend. status: optimal | time_limit | infeasible | error;
    bound: the solver's proven lower bound on the objective (inf when infeasible)."""
    backends = {"cbc": _cbc, "highs": _highs, "scip": _scip}
    if problem.solver not in backends:
        raise ValueError(f"solver: {problem.solver!r} is not one of {', '.join(backends)}")
    if problem.quad.size and problem.solver != "scip":
        raise ValueError(f"solver: {problem.solver} cannot take a quadratic objective; use scip")
    _LOADED.add(problem.solver)
    if len(_LOADED) > 1:  # SolverPool gives each process one solver; this guards other callers
        raise RuntimeError(f"one solver per process: this one has loaded {sorted(_LOADED)}")
    importlib.import_module(_MODULES[problem.solver])  # once per worker, not in the timing
    start, cpu = time.perf_counter(), time.process_time()
    answer = backends[problem.solver](problem)
    answer["seconds"] = time.perf_counter() - start
    answer["cpu_seconds"] = time.process_time() - cpu
    return answer


def _answer(status: str, raw: str, values: Any = None, objective: float = math.nan,
            bound: float = 0.0) -> Answer:  # fmt: skip
    if values is not None:
        values = np.asarray(values, dtype=float)
    return {"status": status, "solver_status": raw, "values": values, "objective": objective,
            "bound": bound}  # fmt: skip


def _cbc(p: MipProblem) -> Answer:
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("CBC")
    inf = solver.infinity()
    v = [
        (solver.IntVar if is_int else solver.NumVar)(lo, hi, "")
        for lo, hi, is_int in zip(p.lb, p.ub, p.integers, strict=True)
    ]
    rows = [
        solver.Constraint(max(lo, -inf), min(hi, inf))
        for lo, hi in zip(p.row_lb, p.row_ub, strict=False)
    ]
    for r, k, a in zip(p.rows.tolist(), p.cols.tolist(), p.vals.tolist(), strict=True):
        rows[r].SetCoefficient(v[k], a)
    objective = solver.Objective()
    for k in np.flatnonzero(p.c):
        objective.SetCoefficient(v[k], float(p.c[k]) * SCALE)
    objective.SetMinimization()
    solver.SetNumThreads(1)
    solver.SetTimeLimit(max(1, int(p.time_limit * 1000)))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)  # OR-Tools' default stops at 1e-4
    code = solver.Solve(params)
    names = {getattr(solver, n): n for n in ("OPTIMAL", "FEASIBLE", "INFEASIBLE", "NOT_SOLVED")}
    raw = names.get(code, f"ABNORMAL({code})")
    if code == solver.INFEASIBLE:
        return _answer("infeasible", raw, bound=math.inf)
    has_point = code in (solver.OPTIMAL, solver.FEASIBLE)
    values = [x.solution_value() for x in v] if has_point else None
    bound = objective.BestBound() / SCALE if code != solver.NOT_SOLVED or has_point else 0.0
    status = "optimal" if code == solver.OPTIMAL else "time_limit"
    if code not in (solver.OPTIMAL, solver.FEASIBLE, solver.NOT_SOLVED):
        status = "error"
    obj = objective.Value() / SCALE if has_point else math.nan
    return _answer(status, raw, values, obj, _finite_or_zero(bound))


def _finite_or_zero(bound: float) -> float:
    """A solver's bound when it has one; 0, the trivial bound of a distortion, when it has not."""
    return float(bound) if math.isfinite(bound) and bound > 0 else 0.0


def _highs(p: MipProblem) -> Answer:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    a = coo_matrix((p.vals, (p.rows, p.cols)), shape=(len(p.row_lb), len(p.c))).tocsr()
    res = milp(
        p.c * SCALE, integrality=p.integers.astype(int), bounds=Bounds(p.lb, p.ub),
        constraints=LinearConstraint(a, p.row_lb, p.row_ub),
        options={"time_limit": p.time_limit, "mip_rel_gap": 0.0, "disp": False},
    )  # fmt: skip
    raw = f"{res.status}: {res.message}"
    if res.status == 2:
        return _answer("infeasible", raw, bound=math.inf)
    if res.status not in (0, 1):
        return _answer("error", raw)
    bound = getattr(res, "mip_dual_bound", None)
    bound = _finite_or_zero(bound / SCALE if bound is not None else 0.0)
    obj = float(res.fun) / SCALE if res.x is not None else math.nan
    return _answer("optimal" if res.status == 0 else "time_limit", raw, res.x, obj, bound)


def _scip(p: MipProblem) -> Answer:
    from pyscipopt import Model, quicksum

    model = Model()
    model.hideOutput()
    kinds = ["B" if i and lo == 0 and hi == 1 else "I" if i else "C"
             for lo, hi, i in zip(p.lb, p.ub, p.integers, strict=True)]  # fmt: skip
    v = [model.addVar(lb=lo, ub=hi, vtype=kind)
         for lo, hi, kind in zip(p.lb, p.ub, kinds, strict=True)]  # fmt: skip
    order = np.argsort(p.rows, kind="stable")
    starts = np.searchsorted(p.rows[order], np.arange(len(p.row_lb) + 1))
    for r, (lo, hi) in enumerate(zip(p.row_lb, p.row_ub, strict=True)):
        terms = order[starts[r] : starts[r + 1]]
        expr = quicksum(p.vals[j] * v[p.cols[j]] for j in terms)
        model.addCons(_ranged(expr, lo, hi))
    linear = quicksum(p.c[k] * v[k] for k in np.flatnonzero(p.c))
    if p.quad.size:  # SCIP takes only linear objectives: minimise an epigraph variable
        s = model.addVar(lb=0.0, ub=None)
        model.addCons(quicksum(v[k] * v[k] for k in p.quad) * QUADRATIC_SCALE <= s)
        linear = linear + s / QUADRATIC_SCALE
    model.setObjective(linear, "minimize")
    model.setParam("limits/time", p.time_limit)
    model.setParam("numerics/feastol", SCIP_FEASTOL)
    model.setParam("limits/gap", QUADRATIC_GAP if p.quad.size else 0.0)
    model.setParam("parallel/maxnthreads", 1)
    model.optimize()
    raw = model.getStatus()
    if raw == "infeasible":
        return _answer("infeasible", raw, bound=math.inf)
    has_point = model.getNSols() > 0
    values = [model.getVal(x) for x in v] if has_point else None
    status = {"optimal": "optimal", "gaplimit": "optimal", "timelimit": "time_limit"}.get(
        raw, "error"
    )
    obj = model.getObjVal() if has_point else math.nan
    return _answer(status, raw, values, obj, _finite_or_zero(model.getDualbound()))


def _ranged(expr: Any, lo: float, hi: float) -> Any:
    if lo == hi:
        return expr == lo
    if math.isinf(hi):
        return expr >= lo
    if math.isinf(lo):
        return expr <= hi
    return (lo <= expr) <= hi  # PySCIPOpt's ranged form


# --------------------------------------------------------------------------- the pool


def _serve(target: str, solver: str, read_fd: int, write_fd: int) -> None:
    """A worker's loop: imports first (then "ready"), then (index, problem) in and (index,
    answer) out until None arrives."""
    module, _, name = target.partition(":")
    fn: Callable[[MipProblem], Answer] = getattr(importlib.import_module(module), name)
    if solver in _MODULES:  # before "ready": start-up does not eat into a problem's deadline
        importlib.import_module(_MODULES[solver])
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    outbox.send("ready")
    while (message := inbox.recv()) is not None:
        index, problem = message
        try:
            answer = fn(problem)
        except Exception as err:  # the example's failure, reported; the worker lives on
            answer = {"status": "error", "reason": f"{type(err).__name__}: {err}"}
        outbox.send((index, answer))


@dataclass
class _Worker:
    solver: str  # the one solver library this process loads
    process: subprocess.Popen[bytes]
    outbox: Connection  # to the worker
    inbox: Connection  # from the worker
    log: IO[bytes]  # its stderr: solver chatter, and the last words of a crash
    task: int | None = None
    deadline: float = math.inf


class SolverPool:
    """Up to `workers` processes per solver, started on first use and reused across problems;
    a process only ever runs one solver (OR-Tools beside another solver library can crash).

    A worker is `python -m advlab.bounds.solver_worker` with two pipes: a fresh interpreter
    that imports neither torch nor the caller's main module (multiprocessing's spawn would
    re-import both, seconds per worker). `target` is the solve function as `module:function`
    (tests inject crashing ones); `grace` is how long past a problem's time limit a worker may
    take (model building, a solver's late check of its limit) before it is killed as hung."""

    def __init__(self, workers: int = 1, target: str = SOLVE, grace: float = 60.0) -> None:
        if workers < 1:
            raise ValueError("workers: give at least 1")
        self.target, self.grace, self.size = target, grace, workers
        self._workers: list[_Worker] = []

    def __enter__(self) -> SolverPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def solve_all(self, problems: Sequence[MipProblem]) -> list[Answer]:
        """One answer per problem, in order; a crashed or hung worker's problem gets status
        `failed` and its reason, and the others go on."""
        answers: list[Answer | None] = [None] * len(problems)
        queues: dict[str, deque[int]] = {}
        for i, problem in enumerate(problems):
            queues.setdefault(problem.solver, deque()).append(i)
        while any(queues.values()) or any(w.task is not None for w in self._workers):
            for solver, queue in queues.items():
                mine = [w for w in self._workers if w.solver == solver]
                for _ in range(min(self.size - len(mine), len(queue))):
                    self._workers.append(self._start(solver))
                for w in (w for w in self._workers if w.solver == solver and w.task is None):
                    if queue:
                        self._send(w, queue.popleft(), problems, answers)
            self._collect(answers)
        return [a if a is not None else _failed("no answer") for a in answers]

    def _start(self, solver: str) -> _Worker:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", __name__, self.target, solver, str(to_child),
                   str(from_child)]  # fmt: skip
        log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker; _stop closes it)
        process = subprocess.Popen(
            command, pass_fds=(to_child, from_child), env=env, stdout=subprocess.DEVNULL,
            stderr=log,
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        outbox = Connection(from_parent, readable=False)
        w = _Worker(solver, process, outbox, Connection(to_parent, writable=False), log)
        try:
            if w.inbox.poll(STARTUP_S) and w.inbox.recv() == "ready":
                return w
            why = f"no word in {STARTUP_S:g} s"
        except (EOFError, OSError):
            why = _death(w)
        _stop(w)
        raise RuntimeError(f"a {solver} solver worker did not start: {why}")

    def _send(
        self, w: _Worker, i: int, problems: Sequence[MipProblem], answers: list[Answer | None]
    ) -> None:
        try:
            w.outbox.send((i, problems[i]))
        except (OSError, ValueError) as err:
            answers[i] = _failed(f"could not reach the worker: {err}")
            self._drop(w)
            return
        w.task, w.deadline = i, time.monotonic() + problems[i].time_limit + self.grace

    def _collect(self, answers: list[Answer | None]) -> None:
        """Wait for the first answer, death (its pipe closes) or deadline among busy workers."""
        busy = [w for w in self._workers if w.task is not None]
        if not busy:
            return
        wait([w.inbox for w in busy], max(0.0, min(w.deadline for w in busy) - time.monotonic()))
        for w in busy:
            task = w.task
            assert task is not None
            if w.inbox.poll():
                try:
                    index, answer = w.inbox.recv()
                except (EOFError, OSError):
                    answers[task] = _failed(_death(w))
                    self._drop(w)
                    continue
                answers[index], w.task = answer, None
            elif time.monotonic() > w.deadline:
                answers[task] = _failed(f"hung: no answer {self.grace:g} s past the time limit")
                self._drop(w)

    def _drop(self, w: _Worker) -> None:
        """Kill `w` (its own process, by its handle); a fresh one starts if work remains."""
        _stop(w)
        self._workers.remove(w)

    def close(self) -> None:
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.outbox.send(None)
        for w in self._workers:
            _stop(w, wait_s=5.0)
        self._workers = []


def _stop(w: _Worker, wait_s: float = 0.0) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        w.process.wait(timeout=wait_s)
    if w.process.poll() is None:
        w.process.kill()
        w.process.wait()
    w.outbox.close()
    w.inbox.close()
    w.log.close()
    w.task = None


def _death(w: _Worker) -> str:
    code = w.process.wait(timeout=30)
    cause = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    w.log.seek(0, os.SEEK_END)
    w.log.seek(max(0, w.log.tell() - 400))
    last = w.log.read().decode(errors="replace").strip().splitlines()[-3:]
    return f"crashed: the worker {cause}" + (f" ({' / '.join(last)})" if last else "")


def _failed(reason: str) -> Answer:
    return {"status": "failed", "reason": reason}


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
