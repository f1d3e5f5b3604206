"""The SKAB suite of benchmarks/accuracy.py: anomaly detection under SKAB's own protocol.

Protocol (waico/SKAB ``core/utils.py`` and the notebooks): the 34 fault files, each scaled by
its own first 400 rows (assumed normal) and tested on the rest; ``anomaly-free.csv`` is extra
normal training data. Point-wise F1, FAR and MAR of the ``anomaly`` label pooled over every test
row of every file (no point adjustment); AUC-PR (scikit-learn's average precision) and VUS-PR
threshold-free; the change-point task scored on the ``changepoint`` label with SKAB's NAB score
(60 s window to the right of each change point; the predicted change points are the rows where the
flags change, as SKAB derives them). Thresholds are fitted on scores of rows before the test
split only (``task.threshold.fit_on``): no label of any file is used for a threshold, a score
normaliser or a model setting. One run per figure, seed 0.

SKAB has no labelled validation split, so a trained detector's score window and POT risk are
also chosen leave-one-group-out over SKAB's three folders (``grouped_choice``: each folder's files
flagged with the setting that is best on the other two folders' labels; records
``<model>[logo]``, ``[logo-f1]``, ``[logo-nab]``); ``<model>[label-free]`` is the setting of
a rule that reads no label (``label_free_choice``: POT risk 1/n of the n validation rows, the
window that flags the smallest persistent shift), and the plain ``<model>`` record is the
config's defaults (conf/task/anomaly.yaml holds that rule's choice for var_kalman on SKAB).

Trained models run through the user's own command, ``tsssm train data=skab model=<m>
task=anomaly``, one process and tracking store each (the record's ``command`` is that exact
command, and rerunning it gives the same figures); the comparators (PCA T²+Q, MSET, Isolation
Forest, EWMA, last value) are fitted in process on the same real training rows and scored by
the same evaluation code, with the same threshold rule; ``*_file`` comparators fit one model per
file on its own first rows, as SKAB's published baselines do (its first 320: the 80 validation
rows the threshold is fitted on stay held out, as for every other method).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from records import commit, device_name, merge_records

#: trained through `tsssm train` (conf/model/<name>.yaml); any other model config given with
#: --models (e.g. a hybrid) is trained the same way
TRAINED = ["var_kalman", "kalman", "mamba"]
#: fitted in process (closed-form or scikit-learn fits on the training rows)
COMPARATORS = ["pca_t2q_file", "mset_file", "pca_t2q", "mset", "isolation_forest", "ewma",
               "last_value"]
#: "gaps" keeps the gaps suite's SKAB records (accuracy_gaps.py, same dataset and task) apart
KEY = ("dataset", "task", "model", "gaps")
REPO = Path(__file__).resolve().parents[1]

#: the score windows (rows) and POT risks every trained detector's setting is chosen from,
#: leave-one-group-out (tsssm.anomaly.selection): for each of SKAB's three experiment folders
#: (valve1, valve2, other), the setting with the best F1 on the *other two* folders' files, and the
#: folder's own files flagged with it; no file's labels choose its own setting
GRID_WINDOWS = (1, 5, 10, 20, 30, 60)
GRID_RISKS = (1e-2, 1e-3, 1e-4)
#: a wider space for the ``[logo-wide]`` record (same rule as ``[logo]``): every window,
#: alignment and risk `tsssm train` takes through task.window.* / task.threshold.risk, a few
#: values each (fixed before it was run; the ``[logo]`` grid is unchanged)
WIDE_WINDOWS = (1, 5, 10, 20, 30, 45, 60, 90)
WIDE_ALIGNS = ("trailing", "centered")
WIDE_RISKS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
#: the re-anchored shift score's space (tsssm.anomaly.reanchor; records ``[reanchor-logo]``,
#: ``[reanchor-logo-f1]``, chosen by the same rules as ``[logo]`` / ``[logo-f1]``): trailing
#: windows x reference drift rate alpha x "clearly normal" fraction gamma of the threshold x
#: re-anchor fraction rho of an alarm's peak x hold rows, at the label-free risk 1/n (n
#: validation rows). Fixed before its leave-one-group-out run (2026-12-01 23:30 UTC), after an
#: in-sample look at a few of its cells on SKAB's test labels (RESULTS.md says which).
#: Redundant cells are left out: gamma only matters with a drift, hold only with a re-anchor.
REANCHOR_WINDOWS = (30, 60)
REANCHOR_ALPHAS = (0.0, 0.001, 0.003, 0.01)
REANCHOR_GAMMAS = (0.5, 1.0)
REANCHOR_RHOS = (0.0, 0.05, 0.1, 0.2)
REANCHOR_HOLDS = (10, 20)
#: the CLEAN re-anchored space (records ``[reanchor-apriori]``, ``[reanchor-apriori-f1]``, the
#: same leave-one-group-out rules with the same MAX_FAR budget), declared in code on 2026-12-02
#: (commit 717f9be, 12:48 UTC) BEFORE any of its cells was run, from SKAB's sampling and
#: physics alone (no test label looked at for it), and containing the old space in every axis
#: (the old records are kept, labelled not clean). SKAB rows are 1 Hz; a fault lasts minutes
#: (about 2-7 min) and a file's normal test rows before it several minutes:
#: - windows 10 / 30 / 60 rows: 10 s (a valve's step is seen within seconds), half a minute,
#:   one minute (NAB's 60 s window, shorter than every fault);
#: - alpha 0 / 1e-3 / 3e-3 / 1e-2 / 3e-2: the reference's time constant none / ~17 min / ~6 min
#:   / ~100 s / ~33 s: from slower than a whole file down to about half the shortest fault
#:   (faster would follow a fault's onset);
#: - gamma 0.5 / 1: "clearly normal" is below half the threshold, or merely below it;
#: - rho 0 / 0.05 / 0.1 / 0.2 / 0.3: re-anchor when an alarm has fallen to 1/20 .. 1/3 of its
#:   peak (0: never), i.e. a leftover offset that much smaller than the fault;
#: - hold 10 / 20 / 60 rows: 10 s, 20 s or a minute of evidence for the new reference.
#: Redundant cells are left out as before (gamma only with a drift, hold only with a re-anchor):
#: 3 x (1 + 4 x 2) x (1 + 4 x 3) = 351 settings.
APRIORI_WINDOWS = (10, 30, 60)
APRIORI_ALPHAS = (0.0, 0.001, 0.003, 0.01, 0.03)
APRIORI_GAMMAS = (0.5, 1.0)
APRIORI_RHOS = (0.0, 0.05, 0.1, 0.2, 0.3)
APRIORI_HOLDS = (10, 20, 60)
#: ``[reanchor-injected]``: one setting of the APRIORI_* space for every file, chosen with no
#: label of the test split: synthetic faults are added to each fault file's training rows, the
#: trained filter is run over the result, and the setting with the best F1 on those faults whose
#: FAR there is at most MAX_FAR is taken (``injected_choice``). Declared 2026-12-04 before its
#: first run, from SKAB's physics and sampling (1 Hz; faults of minutes that move a few of the 8
#: channels by a step, a drift or a burst of vibration):
#: - evaluation rows 60-319 of each file: after a minute in which the filter settles, before the
#:   validation rows the thresholds are fitted on (which stay clean); rows labelled as faults in
#:   the training split are left out of the counts (a training label, never a test one);
#: - one fault per file and replica, 4 replicas (seeds 0-3): start uniform so that it ends by row
#:   300, duration uniform in 60-200 rows (1-3 min), touching 1-3 channels chosen at random;
#: - size log-uniform in 0.5-3 of the channel's scale (the file's first 400 rows set it to 1),
#:   sign random per channel; shape chosen at random: a step, a ramp from 0 to the size over the
#:   fault, or extra white noise of that standard deviation.
INJECT_REPLICAS = 4
INJECT_ROWS = (60, 320)
INJECT_END = 300
INJECT_DURATION = (60, 200)
INJECT_CHANNELS = (1, 3)
INJECT_SIZE = (0.5, 3.0)
INJECT_SHAPES = ("step", "ramp", "noise")
#: the headline choice only takes settings whose FAR on the other folders is at most the FAR of
#: the leader of SKAB's table (Conv-AE, 13.55%): the issue's target is to beat it on F1, FAR and
#: MAR at once, so that FAR is the declared budget (the "f1" variant has none)
MAX_FAR = 0.1355
#: what the benchmark adds to `tsssm train` per model (visible in each record's command); a
#: model's SKAB settings belong in its config, these are only what differs
MODEL_OVERRIDES: dict[str, list[str]] = {}
#: the VAR orders ``var_kalman[val-order]`` chooses from, by the pooled one-step joint Gaussian
#: NLL of the validation rows (rows 320-399 of every file, held out from the fit; no label read).
#: Declared 2026-12-04 before any order but 1 was run on SKAB: lags of 1-3 s at SKAB's 1 Hz,
#: the orders a VAR of a pump's slow loops is usually fitted with. The chosen order then goes
#: through the unchanged protocol (its plain record and every ``grouped_choice`` record, named
#: ``var_kalman_p<order>[...]``); each order's plain record is kept with its validation NLL.
VAL_ORDERS = (1, 2, 3)

#: ``<model>[covering]`` (declared 2026-12-04, before its first run; the claim is var_kalman's,
#: the detector already named the best): the label-free default (its window, its risk, its POT
#: thresholds on the validation rows' trailing scores) with one change, the rule SKAB's own
#: Conv-AE notebook flags rows by: a row is anomalous only when every trailing window that
#: holds it is flagged (tsssm.anomaly.scores.covering_scores). It keeps an alarm's onset and
#: drops the window's drag past a fault's end and alarms shorter than the window. Batch
#: scoring only (it reads window - 1 rows ahead).
COVERING_NOTE = "label-free default, flagged by SKAB Conv-AE's all-covering-windows rule"
#: --small: three files and a short training (a smoke run, never a benchmark figure)
SMALL_FILES = "[data/valve1/0.csv,data/valve2/0.csv,data/other/9.csv]"
SMALL = [f"data.files={SMALL_FILES}", "trainer.max_epochs=1", "trainer.limit_train_batches=0.2"]
#: models fitted on whole streams (one batch an epoch, which a fraction would leave empty)
WHOLE_STREAM = ("var_kalman", "kalman")

#: SKAB's published leaderboards (README of waico/SKAB at commit b2c0d46, "Proposed
#: Leaderboard", test rows only, NAB window 60 s to the right): outlier detection F1, FAR %,
#: MAR %; change-point detection NAB standard, low FP, low FN.
PUBLISHED_OUTLIER = {
    "Conv-AE": (0.78, 13.55, 28.02), "MSET": (0.78, 39.73, 14.13),
    "T-squared+Q (PCA)": (0.76, 26.62, 24.92), "LSTM-AE": (0.74, 29.96, 25.92),
    "T-squared": (0.66, 19.21, 42.6), "LSTM-VAE": (0.56, 9.13, 55.03),
    "Vanilla LSTM": (0.54, 12.54, 59.53), "MSCRED": (0.36, 49.94, 69.88),
    "Vanilla AE": (0.39, 2.59, 75.15), "Isolation forest": (0.29, 2.56, 82.89),
    "Null detector": (0.0, 0.0, 100.0),
}
PUBLISHED_CPD = {  # NAB standard, low FP, low FN, missed change points, false positives
    "MSCRED": (32.42, 16.53, 40.28, 55, 342), "Isolation forest": (26.16, 19.5, 30.82, 76, 135),
    "T-squared+Q (PCA)": (25.35, 14.51, 31.33, 72, 232), "Conv-AE": (23.61, 21.54, 27.55, 82, 23),
    "LSTM-AE": (23.51, 20.11, 25.91, 88, 69), "T-squared": (19.54, 10.2, 24.31, 70, 106),
    "MSET": (13.84, 10.22, 17.37, 96, 66), "Vanilla AE": (11.41, 6.53, 13.91, 103, 106),
    "Vanilla LSTM": (11.31, -3.8, 17.25, 90, 342), "ArimaFD": (-0.09, -0.17, -0.06, 127, 2),
}

_FIELDS = {  # record field: metric key
    "f1": "test/f1", "far": "test/far", "mar": "test/mar", "precision": "test/precision",
    "recall": "test/recall", "auc_pr": "test/auc_pr", "vus_pr": "test/vus_pr",
    "nab_standard": "test/nab_standard", "nab_low_fp": "test/nab_low_fp",
    "nab_low_fn": "test/nab_low_fn", "nab_missed": "test/nab_missed", "nab_fp": "test/nab_fp",
    "event_recall": "test/event_recall", "event_precision": "test/event_precision",
    "event_f1": "test/event_f1", "delay_mean": "test/delay_mean",
    "threshold": "train/threshold", "val_nll": "val/nll_one_step",
    "far_before": "test/far_before", "far_after": "test/far_after",
    "far_convae_rows": "test/far_convae_rows",
}
#: the rows of a file's test split Conv-AE's notebook can flag (its flags cover
#: range(N_STEPS - 1, len(X) - N_STEPS + 1) of 60-row windows: not the first 59, not the last 118)
CONVAE_SKIP = (59, 118)


def far_where(labels: list[np.ndarray], flags: list[np.ndarray]) -> dict[str, float]:
    """Where the false alarms sit: the FAR of the normal test rows before each file's first
    anomalous row, after its last, and on the rows Conv-AE's notebook can flag (CONVAE_SKIP).
    A reading aid for the FAR column, computed from the flags already chosen."""
    fp = {"before": 0, "after": 0, "convae_rows": 0}
    normal = dict.fromkeys(fp, 0)
    for y, f in zip(labels, flags):
        y, f = np.asarray(y).astype(bool), np.asarray(f).astype(bool)
        n = np.arange(len(y))
        hits = np.flatnonzero(y)
        first, last = (hits[0], hits[-1]) if hits.size else (len(y), len(y))
        keep = (n >= CONVAE_SKIP[0]) & (n < len(y) - CONVAE_SKIP[1])
        for key, rows in (("before", n < first), ("after", n > last), ("convae_rows", keep)):
            fp[key] += int((f & ~y & rows).sum())
            normal[key] += int((~y & rows).sum())
    return {f"far_{k}": fp[k] / normal[k] if normal[k] else math.nan for k in fp}


def _record(m: dict[str, float]) -> dict:
    return {"dataset": "skab", "task": "anomaly",
            **{k: m.get(v, math.nan) for k, v in _FIELDS.items()}}


def _store_uri(args, job_dir: Path) -> str:
    if getattr(args, "store", "sqlite") == "file":
        return (job_dir / "mlruns").resolve().as_uri()
    return f"sqlite:///{job_dir.resolve()}/mlflow.db"


def train_command(args, model: str, job_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [
        "data=skab", f"data.root={Path(args.root).resolve()}", f"model={model}", "task=anomaly",
        f"trainer={args.accelerator}", "seed=0", f"tracking.uri={_store_uri(args, job_dir)}",
        f"tracking.artifact_root={job_dir}/artifacts", f"tracking.output_dir={job_dir}",
        "trainer.enable_progress_bar=false",
        # one intra-op thread on the CPU: a small model's ops are too short to split, and on a
        # shared or 2-core machine a second thread costs 3.6x the CPU-seconds (mamba on SKAB:
        # 445 against 124 CPU-s, same figures; RESULTS.md)
        *(["trainer.threads=1"] if args.accelerator == "cpu" else []),
        *MODEL_OVERRIDES.get(model, []), *extra,
        *([o for o in SMALL if not (model in WHOLE_STREAM and "limit_train_batches" in o)]
          if args.small else []), *args.set,
    ]
    return ["tsssm", "train", *overrides]


def _run_trained(args, model: str, extra: tuple[str, ...] = (), name: str | None = None) -> dict:
    """Train ``model`` (a config name) with the ``extra`` overrides through `tsssm train`; the
    record is named ``name`` (default: the config name)."""
    from tsssm.tracking import Tracker

    name = name or model
    logs = Path(args.logs) if args.logs else Path(tempfile.gettempdir()) / "tsssm-accuracy"
    job_dir = logs / f"skab-{name}"
    job_dir.mkdir(parents=True, exist_ok=True)
    command = train_command(args, model, job_dir, extra)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(job_dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "tsssm.cli", *command[1:]], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole command (user + system): what it costs whatever else runs on
    # the machine (with --jobs > 1 the children overlap and this is approximate)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = (job_dir / "log.txt").read_text().strip().splitlines()[-3:]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {' | '.join(tail)}")
    tracker = Tracker(_store_uri(args, job_dir), "tsssm")
    run_id = tracker.latest_run("train")
    metrics = tracker.run_metrics(run_id)
    print(f"  skab {name}: {tail[-3] if len(tail) >= 3 else tail}", flush=True)
    task = comparator_config(args).task  # the task the command ran (same overrides)
    return {**_record(metrics), "model": name, "train_s": round(elapsed, 1),
            "train_cpu_s": round(cpu, 1), "command": " ".join(command),
            "window": int(task.window.size), "risk": float(task.threshold.risk),
            "bundle": str(job_dir / "models" / run_id)}


def comparator_config(args):
    """The composed config the comparators are evaluated under (the trained models' task)."""
    from tsssm.cli import compose

    return compose(["data=skab", f"data.root={Path(args.root).resolve()}", "task=anomaly",
                    *([f"data.files={SMALL_FILES}"] if args.small else []),
                    *[s for s in args.set if s.startswith(("data.", "task."))]])


def _run_comparator(args, name: str, cfg=None, data=None) -> dict:
    from tsssm.baselines import build_baseline
    from tsssm.commands.common import evaluation_options
    from tsssm.commands.compare import per_stream_train_rows
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import evaluate

    cfg = cfg if cfg is not None else comparator_config(args)
    data = data if data is not None else build_dataset(cfg.data).load()
    started = time.perf_counter()
    model = build_baseline(name, **({"train_rows": per_stream_train_rows(data)}
                                    if name.endswith("_file") else {}))
    model.fit(data.split_arrays("train"))  # the real training rows of every stream, no padding
    fit_s = time.perf_counter() - started
    ev = evaluate(model, data, context=cfg.data.input_len, horizon=cfg.data.horizon,
                  eval_stride=cfg.data.eval_stride, chunk_size=cfg.score.chunk_size,
                  **evaluation_options(cfg.task))
    command = (f"python benchmarks/accuracy.py --suite skab --root {args.root} --models {name}"
               + (" --small" if args.small else ""))
    return {**_record(ev.metrics), "model": name, "train_s": round(fit_s, 1),
            "eval_s": round(time.perf_counter() - started - fit_s, 1), "command": command}


def run(args) -> list[dict]:
    models = args.models or (TRAINED + COMPARATORS)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    common = {"device": device_name(args.accelerator), "commit": commit(), "runs": 1, "seed": 0,
              "date": started}
    records: list[dict] = []
    cheap = [m for m in models if m in COMPARATORS]
    if cheap:
        from tsssm.data.datasets import build_dataset

        cfg = comparator_config(args)
        data = build_dataset(cfg.data).load()
        for name in cheap:
            records.append({**_run_comparator(args, name, cfg, data), **common,
                            "device": device_name("cpu")})
            r = records[-1]
            print(f"  skab {name}: f1 {r['f1']:.3f} far {r['far']:.3f} mar {r['mar']:.3f} "
                  f"auc_pr {r['auc_pr']:.3f} nab {r['nab_standard']:.1f}", flush=True)
    jobs = [m for m in models if m not in COMPARATORS and m != ORDER_CHOICE]
    failures = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_trained, args, m): m for m in jobs}
        for fut in cf.as_completed(futures):
            try:
                record = fut.result()
                bundle = record.pop("bundle")
                records.append({**record, **common})
                if not args.small:  # three files are too few groups to choose anything on
                    records += [{**r, **common} for r in grouped_choice(
                        args, record["model"], bundle, record["command"])]
            except RuntimeError as err:
                failures.append(str(err))
                print(f"  FAILED {futures[fut]}: {err}", flush=True)
    if ORDER_CHOICE in models:
        try:
            records += [{**r, **common} for r in order_choice(args)]
        except RuntimeError as err:
            failures.append(str(err))
            print(f"  FAILED {ORDER_CHOICE}: {err}", flush=True)
    merge_records(args.out, records, KEY)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    return records


#: the --models entry that trains var_kalman at every VAL_ORDERS order and keeps the one with the
#: lowest validation NLL (order_choice)
ORDER_CHOICE = "var_kalman[val-order]"


def order_choice(args) -> list[dict]:
    """``var_kalman[val-order]``: var_kalman trained at each of VAL_ORDERS (``var_kalman_p<k>``
    records, each with the validation NLL its training logged: ``val/nll_one_step``, the joint
    one-step Gaussian NLL per observed entry of the validation rows), the order with the lowest
    validation NLL kept (a copy of its record named ``var_kalman[val-order]`` holding every
    order's NLL) and taken through ``grouped_choice`` as ``var_kalman_p<k>[...]``. No test row
    or label enters the choice of the order."""
    out, bundles = [], {}
    for order in VAL_ORDERS:
        rec = _run_trained(args, "var_kalman", (f"model.net.order={order}",),
                           name=f"var_kalman_p{order}")
        bundles[order] = rec.pop("bundle")
        if not math.isfinite(rec["val_nll"]):
            raise RuntimeError(f"{rec['command']} logged no val/nll_one_step to choose on")
        print(f"  skab {rec['model']}: validation NLL {rec['val_nll']:.5f}", flush=True)
        out.append(rec)
    best = min(out, key=lambda r: r["val_nll"])
    order = VAL_ORDERS[out.index(best)]
    out.append({**best, "model": ORDER_CHOICE, "chosen_order": order,
                "val_nll_by_order": {str(k): r["val_nll"] for k, r in zip(VAL_ORDERS, out)}})
    if not args.small:
        out += grouped_choice(args, best["model"], bundles[order], best["command"])
    return out


def _group(part) -> str:
    """SKAB's experiment folder of a file (valve1, valve2, other)."""
    return Path(part.stream.path).parent.name


def bundle_terms(bundle, data, cfg) -> list[tuple]:
    """(means, variances, StepTerms) of every stream under the bundle's one-step model and score
    kind: one filter pass per stream, shared by every grid below."""
    from tsssm.anomaly.scores import ScoreSpec
    from tsssm.tasks.evaluate import stream_terms

    kind = ScoreSpec.from_dict(bundle.score, bundle.score_kind).kind
    return [stream_terms(bundle.model, p.stream.values, kind, cfg.score.chunk_size,
                         exog=p.exog()) for p in data.parts]


def grid_cells(bundle, data, cfg, windows=GRID_WINDOWS, risks=GRID_RISKS,
               aligns: tuple[str, ...] | None = None, terms: list | None = None
               ) -> list[tuple[tuple, list, list]]:
    """[((window, risk) or (window, risk, align), preds, flags)] of a trained detector over
    windows x risks (x aligns): scored with its own score kind and window kind (and its own
    alignment unless ``aligns`` is given), the POT threshold fitted as in training (validation
    rows' scores, the bundle's scope). One filter pass per stream serves every window. No label
    is read here."""
    from tsssm.anomaly.scores import ScoreSpec
    from tsssm.anomaly.thresholds import build_threshold
    from tsssm.tasks.evaluate import fit_thresholds, window_prediction

    base = ScoreSpec.from_dict(bundle.score, bundle.score_kind)
    terms = terms if terms is not None else bundle_terms(bundle, data, cfg)
    cells = []
    for align in aligns or (base.align,):
        for w in windows:
            spec = ScoreSpec(base.kind, w, base.window_kind, align).check()
            preds = [window_prediction(*t, spec) for t in terms]
            for risk in risks:
                _, thresholds = fit_thresholds(
                    data, preds, lambda s, r=risk: build_threshold(
                        "pot", q=r, level=cfg.task.threshold.level).fit(s),
                    scope=bundle.threshold_scope, fit_on=cfg.task.threshold.fit_on)
                key = (w, risk) if aligns is None else (w, risk, align)
                cells.append((key, preds,
                              [t.flags(pr.score) for t, pr in zip(thresholds, preds)]))
    return cells


def reanchor_settings(windows=REANCHOR_WINDOWS, alphas=REANCHOR_ALPHAS, gammas=REANCHOR_GAMMAS,
                      rhos=REANCHOR_RHOS, holds=REANCHOR_HOLDS) -> list[tuple]:
    """The (window, alpha, gamma, rho, hold) settings of a re-anchor space, without its
    redundant cells (gamma only matters with a drift, hold only with a re-anchor)."""
    import itertools

    return [s for s in itertools.product(windows, alphas, gammas, rhos, holds)
            if not (s[1] == 0 and s[2] != gammas[0]) and not (s[3] == 0 and s[4] != holds[0])]


def window_thresholds(data, cfg, terms: list, kind: str, risk: float, windows
                      ) -> dict[int, list[float]]:
    """{window: the threshold of every tested stream} of the plain trailing shift score at
    ``risk`` (POT on the validation rows' scores; the task's scope), as reanchor_cells fits
    them. No label is read."""
    from tsssm.anomaly.scores import ScoreSpec
    from tsssm.anomaly.thresholds import build_threshold
    from tsssm.tasks.evaluate import fit_thresholds, window_prediction

    tested = [i for i, p in enumerate(data.parts) if p.split is not None]
    thresholds = {}
    for w in sorted({int(w) for w in windows}):
        spec = ScoreSpec(kind, w, "shift", "trailing").check()
        preds = [window_prediction(*t, spec) for t in terms]
        _, own = fit_thresholds(data, preds, lambda s: build_threshold(
            "pot", q=risk, level=cfg.task.threshold.level).fit(s),
            scope=cfg.task.threshold.scope, fit_on=cfg.task.threshold.fit_on)
        thresholds[w] = [float(own[i].value) for i in tested]
    return thresholds


def reanchor_cells(data, cfg, terms: list, kind: str, risk: float,
                   settings: list[tuple] | None = None, chunk: int = 16,
                   thresholds: dict[int, list[float]] | None = None
                   ) -> list[tuple[tuple, list, list]]:
    """[((window, alpha, gamma, rho, hold), preds, flags)] of the re-anchored shift score
    (tsssm.anomaly.reanchor) over ``settings`` (default: the REANCHOR_* space). Each window's
    threshold is the one the plain trailing shift score gets at ``risk`` (POT on the validation
    rows' scores, where no reference has moved; the task's scope); the re-anchored score of
    every stream is then computed with it, ``chunk`` settings x all streams per batch (the
    per-channel contributions are not kept: the metrics read scores and flags). No label is
    read here."""
    from tsssm.anomaly.reanchor import reanchored_shift_scores
    from tsssm.tasks.evaluate import StreamPrediction

    settings = reanchor_settings() if settings is None else list(settings)
    tested = [i for i, p in enumerate(data.parts) if p.split is not None]
    if thresholds is None:  # window: per-stream threshold values
        thresholds = window_thresholds(data, cfg, terms, kind, risk, [s[0] for s in settings])
    T = max(len(terms[i][2].whitened) for i in tested)
    C = terms[tested[0]][2].whitened.shape[1]
    S = len(tested)
    u = np.zeros((S, T, C))
    obs = np.zeros((S, T, C), bool)
    for j, i in enumerate(tested):
        n = len(terms[i][2].whitened)
        u[j, :n], obs[j, :n] = terms[i][2].whitened, terms[i][2].observed
    scores = []
    for lo in range(0, len(settings), chunk):
        col = np.array(settings[lo:lo + chunk], dtype=np.float64)  # (K, 5)
        K = len(col)
        score, _ = reanchored_shift_scores(
            np.tile(u, (K, 1, 1)), np.tile(obs, (K, 1, 1)),
            np.concatenate([thresholds[int(w)] for w in col[:, 0]]), np.repeat(col[:, 0], S),
            alpha=np.repeat(col[:, 1], S), gamma=np.repeat(col[:, 2], S),
            rho=np.repeat(col[:, 3], S), hold=np.repeat(col[:, 4], S), contributions=False)
        scores += list(score.reshape(K, S, T))
    cells = []
    for setting, score in zip(settings, scores):
        preds, flags = [], []
        for i, (mean, var, t) in enumerate(terms):
            if i in tested:
                j = tested.index(i)
                sc = score[j, :len(t.whitened)]
                preds.append(StreamPrediction(mean, var, sc))
                flags.append(sc > thresholds[int(setting[0])][j])
            else:  # not tested (anomaly-free): never read by the metrics
                preds.append(StreamPrediction(mean, var, np.zeros(len(mean))))
                flags.append(np.zeros(len(mean), bool))
        cells.append((tuple(setting), preds, flags))
    return cells


def inject_fault(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fault (INJECT_* above) added to a copy of a scaled stream (T, C): the copy
    and the fault's rows (T,) bool. Missing entries stay missing."""
    out = values.copy()
    T, C = values.shape
    duration = int(rng.integers(INJECT_DURATION[0], INJECT_DURATION[1] + 1))
    start = int(rng.integers(INJECT_ROWS[0], INJECT_END - duration + 1))
    rows = np.arange(start, start + duration)
    k = int(rng.integers(INJECT_CHANNELS[0], INJECT_CHANNELS[1] + 1))
    channels = rng.choice(C, size=min(k, C), replace=False)
    shape = INJECT_SHAPES[int(rng.integers(len(INJECT_SHAPES)))]
    for c in channels:
        size = float(np.exp(rng.uniform(np.log(INJECT_SIZE[0]), np.log(INJECT_SIZE[1]))))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if shape == "step":
            out[rows, c] += sign * size
        elif shape == "ramp":
            out[rows, c] += sign * size * (np.arange(1, duration + 1) / duration)
        else:
            out[rows, c] += size * rng.standard_normal(duration)
    fault = np.zeros(T, bool)
    fault[rows] = True
    return out, fault


def injected_choice(bundle, data, cfg, terms: list, kind: str, risk: float,
                    settings: list[tuple]) -> tuple[int, dict]:
    """Index into ``settings`` of the ``[reanchor-injected]`` choice and its record.

    For each of INJECT_REPLICAS seeds, a synthetic fault is added to every fault file's training
    rows (``inject_fault``), the bundle's filter is run over the changed streams, and every
    setting is scored as ``reanchor_cells`` scores it, with the thresholds fitted on the
    validation rows of the clean streams (``terms``; a fault's windows would otherwise reach
    into them). Counts are pooled over the INJECT_ROWS rows of every file and replica, rows
    labelled in the training split left out. The choice is the best F1 among the settings with
    FAR <= MAX_FAR there (the best F1 if none). Reads no label of a test split."""
    from tsssm.anomaly.selection import pooled_rates, stream_counts
    from tsssm.tasks.evaluate import stream_terms

    tested = [i for i, p in enumerate(data.parts) if p.split is not None]
    lo, hi = INJECT_ROWS
    for i in tested:
        start, stop = data.parts[i].rows("train")
        if start > lo or stop < hi:
            raise RuntimeError(f"injected_choice: {data.parts[i].stream.path}'s training rows "
                               f"{start}-{stop} do not hold the rows {lo}-{hi} faults go into")
    clean = window_thresholds(data, cfg, terms, kind, risk, [s[0] for s in settings])
    keep = {}  # the rows counted of each file: INJECT_ROWS, training rows labelled faults left out
    for i in tested:
        rows, labels = np.arange(lo, hi), data.parts[i].stream.labels
        keep[i] = rows if labels is None else rows[labels[rows] != 1]
    counts = np.zeros((len(settings), 4), dtype=np.int64)  # tp, fp, tn, fn (stream_counts)
    for replica in range(INJECT_REPLICAS):
        rng = np.random.default_rng(replica)
        changed, faults = [], {}
        for i, part in enumerate(data.parts):
            if i in tested:
                values, faults[i] = inject_fault(part.stream.values, rng)
                changed.append(stream_terms(bundle.model, values, kind, cfg.score.chunk_size,
                                            exog=part.exog()))
            else:
                changed.append(terms[i])
        cells = reanchor_cells(data, cfg, changed, kind, risk, settings, thresholds=clean)
        for k, (_, _, flags) in enumerate(cells):
            for i in tested:
                counts[k] += stream_counts([faults[i][keep[i]]], [flags[i][keep[i]]])[0]
    rates = [pooled_rates(c) for c in counts]  # (f1, far, mar) each
    ok = [k for k, (_, far, _) in enumerate(rates) if far <= MAX_FAR]
    best = max(ok or range(len(settings)), key=lambda k: (rates[k][0], -k))
    f1, far, mar = rates[best]
    return best, {"injected_f1": f1, "injected_far": far, "injected_mar": mar,
                  "injected_rows": int(counts[best].sum()),
                  "injected_within_budget": len(ok)}


def label_free_choice(data, cells, cfg) -> dict:
    """The default setting's rule, which reads no label (tsssm.anomaly.selection): the POT risk
    ``1 / n`` of the ``n`` validation rows the threshold is fitted on, and the window of
    GRID_WINDOWS whose threshold at that risk flags the smallest persistent shift. Returns the
    risk, the window, the threshold and that shift of every window, and ``cell``: the chosen
    setting's ((window, risk), preds, flags), flagged as training flags it."""
    from tsssm.anomaly.selection import risk_for_rows, smallest_detectable_shift
    from tsssm.anomaly.thresholds import build_threshold
    from tsssm.tasks.evaluate import fit_thresholds

    fit_on = cfg.task.threshold.fit_on
    n_rows = sum(b - a for p in data.parts if p.split is not None
                 for a, b in [p.rows(fit_on)])
    risk = risk_for_rows(n_rows)
    thresholds, flags = {}, {}
    for w in GRID_WINDOWS:
        preds = next(pr for (cw, _), pr, _ in cells if cw == w)
        pooled, own = fit_thresholds(data, preds, lambda s: build_threshold(
            "pot", q=risk, level=cfg.task.threshold.level).fit(s),
            scope=cfg.task.threshold.scope, fit_on=fit_on)
        thresholds[w] = float(pooled.value)
        flags[w] = (preds, [t.flags(pr.score) for t, pr in zip(own, preds)])
    window, shift = smallest_detectable_shift(thresholds)
    return {"risk": risk, "fit_rows": n_rows, "window": window,
            "thresholds": thresholds, "shift": shift,
            "cell": ((window, risk), *flags[window])}


def grouped_choice(args, model: str, bundle_dir: str, command: str) -> list[dict]:
    """Records of ``model`` with its score window and POT risk chosen leave-one-group-out over
    SKAB's folders (GRID_WINDOWS x GRID_RISKS; tsssm.anomaly.selection): ``<model>[logo]`` (best
    F1 on the other folders within MAX_FAR), ``<model>[logo-f1]`` (best F1) and
    ``<model>[logo-nab]`` (best NAB standard, for the change-point table), ``<model>[logo-wide]``
    (the ``[logo]`` rule over WIDE_WINDOWS x WIDE_ALIGNS x WIDE_RISKS), ``<model>[label-free]``
    (``label_free_choice``, no label read) and ``<model>[reanchor-logo]`` /
    ``[reanchor-logo-f1]`` (the re-anchored shift score, ``reanchor_cells``, chosen by the
    ``[logo]`` / ``[logo-f1]`` rules). The ``[logo]`` record also holds the whole grid's
    pooled test metrics (``grid``), in-sample, for the reader."""
    from tsssm.anomaly.events import nab_score
    from tsssm.anomaly.scores import ScoreSpec, covering_scores
    from tsssm.anomaly.selection import choose_by_group, choose_by_group_with, stream_counts
    from tsssm.bundle import load_bundle
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import detection_metrics, range_metrics

    started = time.perf_counter()
    cfg = comparator_config(args)
    bundle = load_bundle(bundle_dir)
    if args.accelerator == "gpu" and hasattr(bundle.model, "to"):
        bundle.model.to("cuda")  # scoring the grid on the device the model trained on
    data = build_dataset(cfg.data).load(
        scaler=None if bundle.per_stream_scaling else bundle.scaler,
        input_scaler=None if bundle.per_stream_scaling else bundle.input_scaler)
    terms = bundle_terms(bundle, data, cfg)
    cells = grid_cells(bundle, data, cfg, terms=terms)
    idx = [i for i, p in enumerate(data.parts)
           if p.split is not None and p.stream.labels is not None]
    rows = [slice(*data.parts[i].rows("test")) for i in idx]
    groups = [_group(data.parts[i]) for i in idx]
    lab = [data.parts[i].stream.labels[r] for i, r in zip(idx, rows)]
    cps = [data.parts[i].stream.changepoints[r] for i, r in zip(idx, rows)]
    tms = [data.parts[i].stream.time[r] for i, r in zip(idx, rows)]

    def test_of(k: int, what: str) -> list[np.ndarray]:
        _, preds, flags = cells[k]
        return [(flags if what == "flags" else [p.score for p in preds])[i][r]
                for i, r in zip(idx, rows)]

    counts = np.stack([stream_counts(lab, test_of(k, "flags")) for k in range(len(cells))])

    def nab_of(k: int, mask: np.ndarray) -> float:
        keep = np.flatnonzero(mask)
        flags = test_of(k, "flags")
        return nab_score([cps[j] for j in keep], [flags[j] for j in keep],
                         [tms[j] for j in keep], cfg.task.nab_window)["nab_standard"]

    def metrics_of(choice: dict[str, int] | int) -> dict[str, float]:
        pick = [choice if isinstance(choice, int) else choice[g] for g in groups]
        flg = [test_of(k, "flags")[j] for j, k in enumerate(pick)]
        sco = [test_of(k, "scores")[j] for j, k in enumerate(pick)]
        m = detection_metrics(np.concatenate(lab), np.concatenate(sco), np.concatenate(flg))
        m.update(range_metrics(lab, sco, flg, cps, tms, cfg.task.nab_window,
                               cfg.task.vus_max_buffer))
        m.update(far_where(lab, flg))
        return {f"test/{k}": v for k, v in m.items()}

    n_grid = len(cells)
    choices = {
        "logo": choose_by_group(counts, groups, MAX_FAR),
        "logo-f1": choose_by_group(counts, groups),
        "logo-nab": choose_by_group_with(n_grid, groups, nab_of),
    }
    free = label_free_choice(data, cells, cfg)  # its own cell, after the grid's
    cells.append(free.pop("cell"))
    choices["label-free"] = {g: n_grid for g in groups}
    # [covering]: the label-free setting and thresholds unchanged, a row flagged only when every
    # trailing window that holds it is flagged (SKAB's Conv-AE notebook's rule; declared in
    # COVERING_NOTE before its first run). No label and no new knob.
    (w_free, risk_free), preds_free, flags_free = cells[n_grid]
    cells.append(((w_free, risk_free, "covering"),
                  [replace(pr, score=covering_scores(pr.score, None, w_free)[0])
                   for pr in preds_free],
                  [covering_scores(f.astype(np.float64), None, w_free)[0] > 0.5
                   for f in flags_free]))
    choices["covering"] = {g: n_grid + 1 for g in groups}
    wide = grid_cells(bundle, data, cfg, WIDE_WINDOWS, WIDE_RISKS, WIDE_ALIGNS, terms=terms)
    wide_counts = np.stack([stream_counts(lab, [c[2][i][r] for i, r in zip(idx, rows)])
                            for c in wide])
    offset = len(cells)
    cells += wide
    choices["logo-wide"] = {g: offset + k for g, k in
                            choose_by_group(wide_counts, groups, MAX_FAR).items()}
    # the re-anchored shift score (tsssm.anomaly.reanchor) at the label-free risk, its five
    # settings chosen leave-one-group-out by the [logo] and [logo-f1] rules: over the clean
    # APRIORI_* space ([reanchor-apriori*]) and, for continuity, over the old REANCHOR_* space
    # ([reanchor-logo*], not clean: that grid was fixed after an in-sample look), a subset of
    # the clean one, so its cells are taken from the same run
    kind = ScoreSpec.from_dict(bundle.score, bundle.score_kind).kind
    apriori = reanchor_settings(APRIORI_WINDOWS, APRIORI_ALPHAS, APRIORI_GAMMAS, APRIORI_RHOS,
                                APRIORI_HOLDS)
    anchored = reanchor_cells(data, cfg, terms, kind, free["risk"], apriori)
    anchored_counts = np.stack([stream_counts(lab, [c[2][i][r] for i, r in zip(idx, rows)])
                                for c in anchored])
    offset = len(cells)
    cells += anchored
    picked, injected = injected_choice(bundle, data, cfg, terms, kind, free["risk"], apriori)
    choices["reanchor-injected"] = {g: offset + picked for g in groups}
    old = [apriori.index(s) for s in reanchor_settings()]
    for how, sub in (("reanchor-apriori", list(range(len(apriori)))), ("reanchor-logo", old)):
        for suffix, budget in (("", MAX_FAR), ("-f1", None)):
            picked = choose_by_group(anchored_counts[sub], groups, budget)
            choices[how + suffix] = {g: offset + sub[k] for g, k in picked.items()}
    grid = []
    for k, ((w, risk), _, _) in enumerate(cells[:n_grid]):
        m = metrics_of(k)
        grid.append({"window": w, "risk": risk, "f1": m["test/f1"], "far": m["test/far"],
                     "mar": m["test/mar"], "auc_pr": m["test/auc_pr"],
                     "nab_standard": m["test/nab_standard"]})
    out = []
    for how, choice in choices.items():
        rec = {**_record(metrics_of(choice)), "model": f"{model}[{how}]",
               "choice": {g: (dict(zip(("window", "alpha", "gamma", "rho", "hold"),
                                       cells[k][0]), risk=free["risk"])
                              if how.startswith("reanchor") else
                              {"window": cells[k][0][0], "risk": cells[k][0][1],
                               **({"align": cells[k][0][2]} if len(cells[k][0]) > 2 else {})})
                          for g, k in choice.items()},
               "train_s": math.nan, "command": command,
               "selection_s": round(time.perf_counter() - started, 1)}
        if how == "logo":
            rec["grid"] = grid
        if how == "label-free":
            rec["label_free"] = free
        if how == "reanchor-injected":
            rec.update(injected)
        print(f"  skab {rec['model']}: f1 {rec['f1']:.3f} far {rec['far']:.3f} "
              f"mar {rec['mar']:.3f} nab {rec['nab_standard']:.1f} choice {rec['choice']}",
              flush=True)
        out.append(rec)
    return out


def _label(model: str) -> str:
    if model in COMPARATORS:
        how = "one per file" if model.endswith("_file") else "pooled fit"
        return f"{model} (comparator, {how})"
    if "[reanchor-logo" in model:  # REANCHOR_*: fixed after an in-sample look at test labels
        return f"tsssm {model} (not clean: grid fixed after an in-sample look)"
    return f"**tsssm {model}**"


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.2f}"


def _setting(r: dict) -> str:
    """The score window / POT risk a record was flagged with (per folder when chosen)."""
    if "label_free" in r:
        return f"{r['label_free']['window']}/{r['label_free']['risk']:.3g} (label-free rule)"
    if "choice" in r and any("rho" in c for c in r["choice"].values()):
        return ", ".join(f"{g} {c['window']}/{c['risk']:.3g} a {c['alpha']:g} g {c['gamma']:g} "
                         f"r {c['rho']:g} h {c['hold']:g}" for g, c in r["choice"].items())
    if "choice" in r:
        return ", ".join(f"{g} {c['window']}/{c['risk']:g}"
                         + (f" {c['align']}" if "align" in c else "")
                         for g, c in r["choice"].items())
    if "window" in r:
        return f"{r['window']}/{r['risk']:.3g} (config default)"
    return "–"


def _seconds(x: float) -> str:
    return "–" if x != x else f"{x:.0f}"


def table(path: Path, only: list[dict] | None = None) -> str:
    """Markdown: our detectors (best F1 first) beside SKAB's two published leaderboards."""
    records = only if only is not None else (json.loads(Path(path).read_text())
                                             if Path(path).exists() else [])
    rows = sorted((r for r in records if r.get("dataset") == "skab"
                   and r.get("task") == "anomaly" and "gaps" not in r),
                  key=lambda r: -r.get("f1", 0.0))
    out = ["\n#### SKAB outlier detection (test rows of the 34 files, pooled; FAR/MAR in %)\n",
           "| method | window / risk | F1 | FAR % | MAR % | AUC-PR | VUS-PR | event F1 "
           "| mean delay (rows) | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {_label(r['model'])} | {_setting(r)} | {r['f1']:.3f} | {_pct(r['far'])} "
                   f"| {_pct(r['mar'])} | {r['auc_pr']:.3f} | {r['vus_pr']:.3f} "
                   f"| {r['event_f1']:.2f} | {r['delay_mean']:.0f} | {_seconds(r['train_s'])} |")
    for name, (f1, far, mar) in PUBLISHED_OUTLIER.items():
        out.append(f"| {name} (published) | – | {f1:.2f} | {far:.2f} | {mar:.2f} | – | – | – "
                   "| – | – |")
    located = [r for r in rows if r.get("far_before", math.nan) == r.get("far_before")]
    if located:
        out += ["\n#### Where the false alarms sit (FAR % of the normal test rows before each "
                "file's first anomalous row, after its last, and on the rows Conv-AE's notebook "
                "can flag: not a file's first 59 or last 118 test rows)\n",
                "| method | window / risk | FAR % all | before | after | Conv-AE's rows |",
                "|---|---|---|---|---|---|"]
        out += [f"| {_label(r['model'])} | {_setting(r)} | {_pct(r['far'])} "
                f"| {_pct(r['far_before'])} | {_pct(r['far_after'])} "
                f"| {_pct(r['far_convae_rows'])} |" for r in located]
    out += ["\n#### SKAB change-point detection (NAB, 60 s window to the right; 127 change "
            "points)\n", "| method | NAB standard | NAB low FP | NAB low FN | missed CPs | FPs |",
            "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r.get("nab_standard", -1e9)):
        out.append(f"| {_label(r['model'])} | {r['nab_standard']:.2f} | {r['nab_low_fp']:.2f} "
                   f"| {r['nab_low_fn']:.2f} | {r['nab_missed']:.0f} | {r['nab_fp']:.0f} |")
    for name, (std, low_fp, low_fn, missed, fps) in PUBLISHED_CPD.items():
        out.append(f"| {name} (published) | {std:.2f} | {low_fp:.2f} | {low_fn:.2f} | {missed} "
                   f"| {fps} |")
    for r in rows:
        if "grid" not in r:
            continue
        out += [f"\n#### The grid of `{r['model'].split('[')[0]}` (pooled test metrics of every "
                "setting, in-sample: for reading, not for choosing)\n",
                "| window (rows) | POT risk | F1 | FAR % | MAR % | AUC-PR | NAB standard |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {g['window']} | {g['risk']:g} | {g['f1']:.3f} | {_pct(g['far'])} "
                f"| {_pct(g['mar'])} | {g['auc_pr']:.3f} | {g['nab_standard']:.1f} |"
                for g in r["grid"]]
    return "\n".join(out)


def sensitivity(bundle_dir: str, root: str, windows=(1, 5, 10, 20, 30, 60),
                risks=(1e-2, 1e-3, 1e-4)) -> str:
    """Markdown: a trained detector's test metrics over score windows and POT risks (threshold
    fitted on the validation rows as the default task). A sensitivity study, reported beside the
    headline so that no reader mistakes a chosen cell for a fitted one: the defaults were set by
    the developers while looking at SKAB's test results, not by any procedure (the defaults
    since 2026-12-01 come from a label-free rule: see conf/task/anomaly.yaml)."""
    from tsssm.anomaly.scores import ScoreSpec
    from tsssm.anomaly.thresholds import build_threshold
    from tsssm.bundle import load_bundle
    from tsssm.cli import compose
    from tsssm.data.datasets import build_dataset
    from tsssm.tasks.evaluate import evaluate

    cfg = compose(["data=skab", f"data.root={Path(root).resolve()}", "task=anomaly"])
    data = build_dataset(cfg.data).load()
    bundle = load_bundle(bundle_dir)
    out = ["| window (rows) | POT risk | F1 | FAR % | MAR % | AUC-PR | NAB standard |",
           "|---|---|---|---|---|---|---|"]
    for w in windows:
        spec = ScoreSpec("mahalanobis", w, "shift", "trailing")
        for risk in risks:
            ev = evaluate(bundle.model, data, score_kind=spec, context=cfg.data.input_len,
                          horizon=cfg.data.horizon, eval_stride=10**9, chunk_size=100_000,
                          make_threshold=lambda s, r=risk: build_threshold(
                              "pot", q=r, level=0.98).fit(s), fit_on="val")
            m = ev.metrics
            out.append(f"| {w} | {risk:g} | {m['test/f1']:.3f} | {100 * m['test/far']:.1f} | "
                       f"{100 * m['test/mar']:.1f} | {m['test/auc_pr']:.3f} | "
                       f"{m['test/nab_standard']:.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="SKAB sensitivity table of a trained detector")
    ap.add_argument("--sensitivity", required=True, help="the trained model bundle folder")
    ap.add_argument("--root", required=True, help="the SKAB folder (holding data/)")
    a = ap.parse_args()
    print(sensitivity(a.sensitivity, a.root))
