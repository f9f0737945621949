"""Every method on every task of the zoo (``tda_explorer.experiments.zoo``), beside the peers on the same models.

For each task: build it (data, model, checkpoints; deterministic), load or build its cached fresh-seed LDS ground
truth (100 half subsets x 2 seeds), then run

* our methods in three settings: ``default`` (the catalogue's defaults), ``oracle`` (the best LDS over a sweep of the
  method's knobs: damping over >= 5 decades, true / empirical Fisher, projection dimension, ASTRA's step; the
  default is one of the points, so regret = oracle - default >= 0) and ``calibrated`` (``method.calibrate``, when the
  attributor has it: ``status = "not built"`` until then);
* the peers at their defaults (dattri, kronfluence, dattri-llm, captum, cleanlab; the ``bench`` extra, ``make
  bench-deps``), named by our catalogue's name for the same method (kronfluence's EK-FAC is ``if-ekfac``,
  cleanlab's ranking is ``cleanlab``).

A method that raises, or runs past ``--method-limit`` seconds of CPU time, gives a row with ``status = "error:
..."``; the run goes on. Rows ``{task, library, method, setting, lds, mislabel_auc, recall_at_10, seconds,
status}`` (plus ``options`` and, for oracles, the ``sweep``) are written to ``--json`` after every row, so a partial
run is useful; rows already in the file for other (task, library, method, setting) keys are kept, so runs can be
split by task and library. ``partial`` is false only once every task has rows from us and each installed peer.

    python benchmarks/bench_zoo.py --json benchmarks/results/zoo_cpu.json [--task T ...] [--library L ...]
        [--setting default oracle calibrated] [--task-limit 1200] [--method-limit 600]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

from tda_explorer.compute.methods import get_method  # noqa: E402
from tda_explorer.evaluate import evaluate_method  # noqa: E402
from tda_explorer.evaluate.harness import method_options, run_method  # noqa: E402
from tda_explorer.evaluate.metrics import lds, mislabel_auc, recall_at  # noqa: E402
from tda_explorer.experiments.zoo import build_zoo_task, zoo_ground_truth, zoo_seed_agreement, zoo_tasks  # noqa: E402

#: evaluate_method's training-loss baseline beside each mislabel figure (noisy tasks), kept in our rows for the report
LOSS_BASELINE = ("loss_baseline_mislabel_auc", "mislabel_auc_minus_loss", "loss_baseline_recall_at_10",
                 "recall_at_10_minus_loss")
LIBRARIES = ("tda_explorer", "dattri", "kronfluence", "dattri-llm", "captum", "cleanlab")
SETTINGS = ("default", "oracle", "calibrated")
INFLUENCE = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "if-kfac", "if-ekfac", "if-astra", "if-datainf")
PAIRWISE = (*INFLUENCE, "trak", "tracin", "grad-dot", "grad-cos")
DECADES = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # absolute damping (direct solvers), 6 decades
RELATIVE = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]  # relative per-layer damping (Kronecker family), 6 decades


def sweep(method: str) -> list[dict]:
    """The oracle's grid for ``method`` (each point a dict of options; ``{}`` is the default and always included);
    an empty list: nothing to tune."""
    if method in ("if-explicit", "if-cg"):
        return [{}] + [{"damping": d, "curvature": c} for c in ("ggn", "hessian") for d in DECADES]
    if method == "if-arnoldi":  # and Schioppa et al.'s form, without the complement term
        return [{}, {"complement": False}] + [{"damping": d, "curvature": c} for c in ("ggn", "hessian")
                                              for d in DECADES]
    if method == "if-lissa":  # LiSSA's cost grows with depth; the damping is what moves it
        return [{}] + [{"damping": d} for d in DECADES]
    if method in ("if-kfac", "if-ekfac"):  # relative per layer, and one absolute λ on every layer (dattri-llm's form)
        return [{}] + [{"damping": d, "fisher": f} for f in ("expected", "true", "empirical") for d in RELATIVE] + [
            {"damping": d, "damping_kind": "absolute", "fisher": f} for f in ("expected", "empirical") for d in DECADES]
    if method == "if-astra":
        return [{}] + [{"damping": d, "step": s} for s in (0.5, 1.0) for d in RELATIVE[:5]]
    if method == "if-datainf":
        return [{}] + [{"damping": d} for d in RELATIVE]
    if method == "trak":
        return [{}] + [{"projection_dim": k, "damping": d} for k in (256, 1024, 4096) for d in (None, 1e-2, 1.0)]
    if method == "tracin":
        return [{}] + [{"projection_dim": k} for k in (256, 1024, 4096)]
    return []


class MethodTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise ``MethodTimeout`` once this process has spent ``seconds`` of CPU time (``ITIMER_PROF``: a busy, shared
    machine does not make a method time out; checked between Python bytecodes, so a long native call finishes
    first)."""
    if not seconds or not hasattr(signal, "SIGPROF"):
        yield
        return

    def fire(signum, frame):
        raise MethodTimeout(f"ran past {seconds:.0f} s of CPU time")

    previous = signal.signal(signal.SIGPROF, fire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"error: {type(err).__name__}: {(text[0] if text else '')[:160]}"


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


class Writer:
    """Rows kept in memory and merged into ``path`` after each one (under a lock, atomic replace): the file's rows
    for other (task, library, method, setting) keys are kept, so runs split by task or library, even at the same
    time, fill one file."""

    KEY = ("task", "library", "method", "setting")

    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta = (Path(path) if path else None), meta
        self.rows: list[dict] = []
        self.tasks: dict[str, dict] = {}

    def _read(self) -> dict:
        try:
            old = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {"rows": [], "tasks": {}}
        return old if isinstance(old, dict) else {"rows": old, "tasks": {}}

    def add(self, row: dict) -> None:
        row = {k: _finite(v) for k, v in row.items()}
        key = tuple(row[k] for k in self.KEY)
        if str(row["status"]).startswith("skipped") and any(
                tuple(r.get(k) for k in self.KEY) == key and r.get("status") == "ok" for r in self.all_rows()):
            return  # a row not attempted this time leaves the measured one in place
        self.rows = [r for r in self.rows if tuple(r[k] for k in self.KEY) != key] + [row]
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "sweep"}
        print(json.dumps(shown), flush=True)
        self.write()

    def all_rows(self) -> list[dict]:
        mine = {tuple(r[k] for k in self.KEY) for r in self.rows}
        kept = [r for r in self._read().get("rows", []) if tuple(r.get(k) for k in self.KEY) not in mine]
        return kept + self.rows

    def write(self, partial: bool = True) -> None:
        if not self.path:
            return
        import fcntl
        import hashlib
        import tempfile

        name = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:12]
        with open(Path(tempfile.gettempdir()) / f"bench_zoo-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self._read()
            rows = self.all_rows()
            doc = {**{k: v for k, v in old.items() if k not in ("rows", "tasks")}, **self.meta, "partial": partial,
                   "tasks": {**old.get("tasks", {}), **self.tasks}, "rows": rows}
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, self.path)


def _row(task: str, library: str, method: str, setting: str, **values) -> dict:
    row = {"task": task, "library": library, "method": method, "setting": setting, "lds": None, "mislabel_auc": None,
           "recall_at_10": None, "seconds": None, "status": "ok"}
    row.update(values)
    return row


# --------------------------------------------------------------------------------------------------------- ours


def _ours(exp, truth, method: str, options: dict, device: str, limit: float | None) -> dict:
    with time_limit(limit):
        r = evaluate_method(exp, method, truth if method != "suspicion" else None, device=device, **options)
    return {k: r.get(k) for k in ("lds", "mislabel_auc", "recall_at_10", *LOSS_BASELINE)} | {"seconds": r["seconds"]}


def _ours_lds(exp, truth, method: str, options: dict, device: str, limit: float | None) -> dict:
    """One oracle point: fit and attribute at ``options``, LDS only (the regret is on LDS; no self-influence)."""
    with time_limit(limit):
        _, attribution, seconds, _ = run_method(exp, method, device=device, **options)
        return {"lds": lds(attribution.scores, truth.masks, truth.measurements)[0], "seconds": seconds}


def calibrate_hook(attributor, exp):
    """The calibrated setting: ``method.calibrate`` given the training set and the recipe (what retraining needs),
    at its default budget; returns the ``Calibration``."""
    return attributor.calibrate(exp.split.train, recipe=exp.recipe())


def _calibrated(exp, truth, method: str, device: str, limit: float | None) -> dict:
    config, _ = method_options(exp, method, device=device)
    attributor = get_method(method, exp.task(), device=device, **config)
    if not hasattr(attributor, "calibrate"):
        return {"status": "not built"}
    with time_limit(limit):
        t0 = time.perf_counter()
        chosen = calibrate_hook(attributor, exp)
        attributor.fit(exp.split.train)
        scores = attributor.attribute(exp.split.test).scores
        out = {"lds": lds(scores, truth.masks, truth.measurements)[0], "seconds": time.perf_counter() - t0,
               "options": json.dumps(chosen.options, default=str) if chosen.options else "defaults (kept)",
               "truth": chosen.truth, "calibration_seconds": chosen.seconds}
        if exp.split.flipped.any():
            s = attributor.self_influence()
            flipped = exp.split.flipped
            out.update(mislabel_auc=mislabel_auc(s, flipped), recall_at_10=recall_at(s, flipped, 0.1))
    return out


def run_ours(exp, truth, writer: Writer, settings, device: str, limit: float | None, deadline: float,
             only: list[str] | None = None) -> None:
    """Every method (of ``only``, when given) at its defaults first (what must reproduce), then the oracle sweeps,
    then the calibrated."""
    name, noisy = exp.spec.name, bool(exp.split.flipped.any())
    methods = [m for m in list(PAIRWISE) + (["suspicion"] if noisy else []) if not only or m in only]
    if "default" in settings:
        for method in methods:
            writer.add(_guarded(name, "tda_explorer", method, "default", deadline,
                                lambda m=method: _ours(exp, truth, m, {}, device, limit) | {"options": "defaults"}))
    # oracles and calibrations: cheapest default first, so a task time limit cuts the costliest
    cost = {r["method"]: r.get("seconds") or math.inf for r in (writer.all_rows() if writer.path else writer.rows)
            if r["task"] == name and r["library"] == "tda_explorer" and r["setting"] == "default"}
    if "oracle" in settings:
        for method in sorted([m for m in methods if sweep(m)], key=lambda m: cost.get(m, math.inf)):
            writer.add(_guarded(name, "tda_explorer", method, "oracle", deadline,
                                lambda m=method: _oracle(exp, truth, m, device, limit, deadline)))
    if "calibrated" in settings:
        for method in sorted([m for m in methods if m != "suspicion"], key=lambda m: cost.get(m, math.inf)):
            writer.add(_guarded(name, "tda_explorer", method, "calibrated", deadline,
                                lambda m=method: _calibrated(exp, truth, m, device, limit)))


def _oracle(exp, truth, method: str, device: str, limit: float | None, deadline: float) -> dict:
    points, best, total = [], None, 0.0
    for options in sweep(method):
        if time.perf_counter() > deadline:
            points.append({"options": options, "status": "skipped: task time limit"})
            continue
        try:
            r = _ours_lds(exp, truth, method, options, device, limit)
        except Exception as err:  # one failing point of the sweep is a result, not the end of the sweep
            points.append({"options": options, "status": _error(err)})
            continue
        total += r["seconds"]
        points.append({"options": options, "lds": r["lds"], "seconds": r["seconds"]})
        if r["lds"] is not None and math.isfinite(r["lds"]) and (best is None or r["lds"] > best[1]["lds"]):
            best = (options, r)
    if best is None:
        first = next((p["status"] for p in points if p.get("status", "").startswith("error")), "")
        return {"status": f"error: no point of the sweep gave an LDS ({first[len('error: '):]})"[:240], "sweep": points}
    options, r = best
    return {"lds": r["lds"], "seconds": total,
            "options": json.dumps(options) if options else "defaults", "sweep": points}


def refresh_oracles(writer: Writer) -> int:
    """Re-read each oracle of ours as the best of its sweep's explicit points and the file's *current* default row of
    the same task and method (the sweep's ``{}`` point is the default, which a later default run may have changed; the
    explicit points do not depend on it); returns how many oracle rows changed."""
    rows = writer.all_rows() if writer.path else writer.rows
    defaults = {(r["task"], r["method"]): r for r in rows if r["library"] == "tda_explorer"
                and r["setting"] == "default" and r["status"] == "ok" and r.get("lds") is not None}
    changed = 0
    for row in [r for r in rows if r["library"] == "tda_explorer" and r["setting"] == "oracle" and r.get("sweep")]:
        points = [p for p in row["sweep"] if p.get("options") and p.get("lds") is not None and math.isfinite(p["lds"])]
        default = defaults.get((row["task"], row["method"]))
        best = max(points, key=lambda p: p["lds"], default=None)
        if default is not None and (best is None or default["lds"] >= best["lds"]):
            values = {k: default.get(k) for k in ("lds", "mislabel_auc", "recall_at_10")} | {"options": "defaults"}
        elif best is not None:  # sweep points are LDS only
            values = {"lds": best["lds"], "options": json.dumps(best["options"]), "mislabel_auc": None,
                      "recall_at_10": None}
        else:
            continue
        if any(row.get(k) != v for k, v in values.items()):
            writer.add({**row, **values, "status": "ok"})
            changed += 1
    return changed


def _reset_peak_rss() -> None:
    """Reset this process's peak resident set (Linux: ``clear_refs`` 5), so the next ``_peak_rss_mb`` is one row's,
    after handing back to the system the heap that earlier rows freed and the allocator kept (glibc's
    ``malloc_trim``): without it a process's resident set grew by gigabytes over a zoo run, with no reference held
    (after a trim it returns to the same level task after task), and later rows' peaks included it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float | None:
    """This process's peak resident set since the last reset, in MB (None where ``/proc`` does not say): what the
    process already held (the task's data, the model) plus the row's own peak, the same baseline for us and a peer."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _guarded(task: str, library: str, method: str, setting: str, deadline: float, run) -> dict:
    if time.perf_counter() > deadline:
        return _row(task, library, method, setting, status="skipped: task time limit")
    _reset_peak_rss()
    try:
        values = run()
    except Exception as err:  # recorded, never fatal
        traceback.print_exc()
        return _row(task, library, method, setting, status=_error(err))
    return _row(task, library, method, setting, **values, peak_rss_mb=_peak_rss_mb())


# -------------------------------------------------------------------------------------------------------- peers

DATTRI_IF = ("explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac")
DENSE_HESSIAN_LIMIT = 12_000  # parameters: dattri's torch.func.hessian holds p^2 floats and several p-sized passes


def _peer_scores(exp, truth, scores: torch.Tensor, seconds: float) -> dict:
    return {"lds": lds(scores, truth.masks, truth.measurements)[0], "seconds": seconds}


def run_peers(exp, truth, writer: Writer, libraries, device: str, limit: float | None, deadline: float) -> None:
    name, noisy = exp.spec.name, bool(exp.split.flipped.any())
    n_params = sum(p.numel() for p in exp.record.model.parameters())

    def add(library: str, method: str, run, options: str) -> None:
        def go():
            with time_limit(limit):
                return run() | {"options": options}
        writer.add(_guarded(name, library, method, "default", deadline, go))

    if "dattri" in libraries and peers.available("dattri"):
        for solver in DATTRI_IF:
            if solver == "explicit" and n_params > DENSE_HESSIAN_LIMIT:
                writer.add(_row(name, "dattri", "if-explicit", "default",
                                status=f"skipped: dense Hessian of {n_params:,} parameters"))
                continue
            add("dattri", f"if-{solver}",
                lambda s=solver: _peer_scores(exp, truth, *peers.dattri_influence_scores(exp, s, device=device)),
                "defaults" if solver == "arnoldi" else "defaults, damping = wd")
        for method in ("trak", "tracin", "grad-dot", "grad-cos"):
            add("dattri", method,
                lambda m=method: _peer_scores(exp, truth, *peers.dattri_scores(exp, m, device=device)),
                "defaults (512-d projection)")
    if "kronfluence" in libraries and peers.available("kronfluence"):
        # the adapter passes the weight decay as damping; with none (wd = 0) that is an undamped singular Fisher, so
        # kronfluence's own heuristic (0.1 x the mean eigenvalue) is used there instead
        damping, said = ("wd", "damping = wd") if exp.config.weight_decay else (None, "its heuristic damping (wd = 0)")
        for strategy in ("kfac", "ekfac"):
            add("kronfluence", f"if-{strategy}",
                lambda s=strategy: _peer_scores(exp, truth, *peers.kronfluence_scores(exp, s, device=device,
                                                                                      damping=damping)),
                f"defaults, true Fisher, {said}")
    if "dattri-llm" in libraries and peers.available("dattri_llm"):
        for method in ("kfac", "ekfac"):
            add("dattri-llm", f"if-{method}",
                lambda m=method: _peer_scores(exp, truth, *peers.dattri_llm_scores(exp, m, device=device)),
                "defaults (damping 1e-3)")
    if "captum" in libraries and peers.available("captum"):
        writer.add(_row(name, "captum", "tracin", "default", status="not built: no captum adapter in peers.py"))
    if "cleanlab" in libraries and noisy and peers.available("cleanlab"):
        def cleanlab():
            suspicion, seconds = peers.cleanlab_suspicion(exp)
            flipped = exp.split.flipped
            return {"mislabel_auc": mislabel_auc(suspicion, flipped),
                    "recall_at_10": recall_at(suspicion, flipped, 0.1), "seconds": seconds}
        add("cleanlab", "cleanlab", cleanlab, "defaults, out-of-fold probabilities of the same recipe (5 folds)")


# --------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="output file (rewritten after every row)")
    parser.add_argument("--task", nargs="*", default=None, help="zoo task names (default: all)")
    parser.add_argument("--library", nargs="*", default=None, choices=LIBRARIES, help="default: all")
    parser.add_argument("--setting", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--method", nargs="*", default=None, help="our methods to run (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="ground-truth cache (default: the retraining cache's zoo/)")
    parser.add_argument("--task-limit", type=float, default=1200,
                        help="seconds per task for our methods, and again for the peers; later rows are skipped")
    parser.add_argument("--method-limit", type=float, default=600, help="CPU seconds per method run")
    parser.add_argument("--refresh-oracles", action="store_true",
                        help="only re-read the file's oracles against its current default rows (no task is run)")
    args = parser.parse_args()
    tasks = [t.name for t in zoo_tasks()] if not args.task else args.task
    libraries = args.library or list(LIBRARIES)
    missing = [lib for lib in libraries if lib != "tda_explorer" and not peers.available(lib.replace("-", "_"))]
    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "when": time.strftime("%Y-%m-%d %H:%M"), "libraries": libraries, "settings": args.setting,
            "peers_not_installed": missing}
    writer = Writer(args.json, meta)
    if args.refresh_oracles:
        print(f"{refresh_oracles(writer)} oracle rows changed", flush=True)
        return
    for name in tasks:
        t0 = time.perf_counter()
        exp = build_zoo_task(name, device=args.device)
        built = time.perf_counter() - t0
        truth = zoo_ground_truth(exp, cache_dir=args.cache_dir, device=args.device, progress=True)
        spec = exp.spec
        writer.tasks[name] = {"data": spec.data, "architecture": spec.architecture, "optimizer": spec.optimizer,
                              "weight_decay": spec.weight_decay, "epochs": spec.epochs,
                              "batch_size": spec.batch_size or spec.n_train, "noise": spec.noise,
                              "classes": spec.n_classes, "n_train": spec.n_train, "n_test": spec.n_test,
                              "regime": spec.regime, "train_accuracy": exp.train_accuracy(),
                              "test_accuracy": exp.test_accuracy(), "build_seconds": built,
                              "ground_truth_seconds": time.perf_counter() - t0 - built,
                              "seed_agreement": zoo_seed_agreement(exp, cache_dir=args.cache_dir)}
        print(f"== {name}: {writer.tasks[name]}", flush=True)
        deadline = time.perf_counter() + args.task_limit
        if "tda_explorer" in libraries:
            run_ours(exp, truth, writer, args.setting, args.device, args.method_limit, deadline, args.method)
        deadline = time.perf_counter() + args.task_limit  # the peers have their own budget
        run_peers(exp, truth, writer, libraries, args.device, args.method_limit, deadline)
    refresh_oracles(writer)
    writer.write(partial=_incomplete(writer, missing))  # the libraries not installed are named in the file


def _incomplete(writer: Writer, missing: list[str]) -> bool:
    """Whether the file lacks a zoo task for us or for an installed influence peer (a run of part of the zoo)."""
    rows = writer.all_rows() if writer.path else writer.rows
    for library in ("tda_explorer", "dattri", "kronfluence", "dattri-llm"):
        if library in missing:
            continue
        done = {r["task"] for r in rows if r["library"] == library and not str(r["status"]).startswith("skipped")}
        if any(t.name not in done for t in zoo_tasks()):
            return True
    return False


if __name__ == "__main__":
    main()
