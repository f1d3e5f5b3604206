"""`tsssm <command> [overrides...]`: compose the Hydra config, validate it, run the command.

No logic lives here beyond turning the config and errors into what a user reads: one line
naming the key, file or column and what to do, and a non-zero exit (a traceback only with
--verbose).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, str] = {
    "train": "Fit a forecaster on the training split, evaluate it on val/test, fit the anomaly "
             "threshold, and log metrics, forecasts, scores, figures and the model to MLflow.",
    "score": "Score a stream for anomalies with a trained model (model.run_id=..., "
             "model.checkpoint=<bundle folder>, or the newest trained model): per-timestep "
             "scores and flags to Parquet. data.path=<file.csv|.parquet> scores that file whole; "
             "otherwise the test split of the configured dataset.",
    "compare": "Compare trained models with classical comparators (last value, seasonal naive, "
               "EWMA, IsolationForest) on the same test split: forecast and anomaly metrics in "
               "one table.",
    "run": "The main job: train each model in run.models, score the held-out data with each, "
           "and compare them with the classical comparators (one MLflow run per step).",
    "data": "Fetch the benchmark datasets (SKAB, ETT) from their upstream repositories into the "
            "cache folder that data.root defaults to: tsssm data fetch skab|ett [--to DIR].",
    "dashboard": "Look at the runs in a browser: runs table, forecasts, anomaly scores with a "
                 "threshold slider, comparisons, benchmark tables (tracking.uri=... picks the "
                 "store; --port N, default 8050; --host H, default 127.0.0.1).",
}

#: options that take a value, and the commands that have them
VALUE_OPTIONS = {"--port": "dashboard", "--host": "dashboard"}

EXAMPLES = """examples:
  tsssm run                                          # the bundled SKAB sample, end to end
  tsssm data fetch skab && tsssm train data=skab model=mamba trainer=gpu
  tsssm data fetch ett && tsssm train experiment=ett data=ett_m1 data.horizon=336
  tsssm score data.path=/my/stream.parquet model.checkpoint=tsssm_runs/models/<run id>
  tsssm compare compare.runs=[<run id>,<run id>]
  tsssm train --cfg model=mamba                      # print the composed config and exit
  tsssm dashboard --port 8050                        # look at the runs in a browser"""

log = logging.getLogger("tsssm")

#: OS errors that mean "the disk is full or not writable", not a bug in tsssm
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def config_dir() -> Path:
    return Path(__file__).resolve().parent / "conf"


def group_options() -> dict[str, list[str]]:
    root = config_dir()
    return {
        g.name: sorted(p.stem for p in g.glob("*.yaml"))
        for g in sorted(root.iterdir()) if g.is_dir()
    }


def _width() -> int:
    """The terminal's width for wrapped help (60..120 columns)."""
    return max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))


def default_options() -> dict[str, str]:
    """{group: default option} from conf/config.yaml's defaults list."""
    import yaml

    entries = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    return {k: v for e in entries if isinstance(e, dict) for k, v in e.items()}


def usage(command: str | None = None, overrides: list[str] | None = None) -> str:
    """The help text; for a command, with the keys it takes (composed with ``overrides``, so
    `tsssm train --help model=mamba` shows the Mamba model's keys)."""
    lines = []
    if command is None:
        lines.append("usage: tsssm <command> [--help] [--verbose] [--cfg] [key=value ...]\n")
        lines.append("commands:")
        width = max(map(len, COMMANDS))
        lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    else:
        extra = "".join(f" [{o} ...]" for o, c in VALUE_OPTIONS.items() if c == command)
        lines.append(f"usage: tsssm {command} [--verbose] [--cfg]{extra} [key=value ...]\n")
        lines += textwrap.wrap(COMMANDS[command], width=_width())
        lines.append("")
        lines += _keys_help(command, overrides or [])
    lines.append("\nconfig groups (choose with group=option; defaults in conf/config.yaml):")
    defaults = default_options()
    groups = group_options()
    pad = max(map(len, groups)) + 1
    for group, options in groups.items():
        shown = ", ".join(f"{o}*" if defaults.get(group) == o else o for o in options)
        lines += textwrap.wrap(shown, width=_width(), initial_indent=f"  {group:<{pad}}",
                               subsequent_indent=" " * (pad + 2))
    lines += textwrap.wrap("(* = default) any key can be set: data.input_len=96 "
                           "model.epochs=20 trainer.max_epochs=3 tracking.uri=sqlite:///runs.db",
                           width=_width(), initial_indent="  ", subsequent_indent="  ")
    lines.append("\noptions:\n  -h, --help     this help\n  -v, --verbose  full tracebacks "
                 "and library logs\n  --cfg          print the composed config and exit\n")
    lines.append(EXAMPLES)
    return "\n".join(lines)


def _compose_unchecked(overrides: list[str]):
    """The composed config, typed but not yet checked for missing keys and ranges."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tsssm.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except Exception as err:
        raise _config_error(err, overrides) from err


def _keys_help(command: str, overrides: list[str]) -> list[str]:
    from tsssm.confighelp import command_help
    from tsssm.errors import TsssmError

    try:
        return command_help(_compose_unchecked(overrides), command)
    except TsssmError as err:  # a bad override: say so, still show the rest of the help
        return [f"(the keys cannot be listed for these overrides: {err})"]


def compose(overrides: list[str]):
    """The validated config for these overrides; ConfigError with one clear line otherwise."""
    from omegaconf import OmegaConf

    from tsssm.config import validate

    cfg = _compose_unchecked(overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        from tsssm.errors import ConfigError

        raise ConfigError(
            f"config key '{missing[0]}' must be set for this config (e.g. {missing[0]}=...)"
        )
    validate(cfg)
    return cfg


def _config_error(err: Exception, overrides: list[str]):
    """Hydra's multi-line composition errors as one line naming the key or group."""
    from tsssm.errors import ConfigError

    text = str(err)
    cause = err.__cause__
    first = text.splitlines()[0] if text else type(err).__name__
    if "Could not find" in text and "/" in first:
        # "In 'config': Could not find 'model/foo'"
        path = first.split("Could not find")[-1].strip(" '")
        group, _, option = path.partition("/")
        options = group_options().get(group)
        if options is not None:
            return ConfigError(f"unknown option '{option}' for config group '{group}'; "
                               f"choose one of: {', '.join(options)}")
    if first.startswith("Could not override"):
        key = first.split("'")[1]
        return ConfigError(f"unknown config key '{key}'; see `tsssm <command> --cfg` for the "
                           "keys (add new keys with +key=value only where a config allows it)")
    if "Error merging override" in first:
        override = first.split("Error merging override")[-1].strip()
        detail = str(cause).splitlines()[0] if cause else ""
        return ConfigError(f"bad value in '{override}': {detail}")
    if "Could not load" in first or "Could not find" in first:
        return ConfigError(first)
    if "LexerNoViableAltException" in text or "token recognition error" in text:
        bad = next((o for o in overrides if o in text), None)
        if bad is not None and "=" in bad:
            from tsssm.data.io import shell_override

            key, _, value = bad.partition("=")
            quoted = shell_override(key, value)
            return ConfigError(f"cannot parse the override {bad!r}: Hydra reads its value as "
                               f"syntax; quote it (for the shell too): {quoted}")
    if "mismatched input" in text or "extraneous input" in text or "no viable" in text:
        return ConfigError(f"cannot parse the overrides {overrides}: {first}; write key=value")
    detail = str(cause).splitlines()[0] if cause else first
    return ConfigError(f"invalid config: {detail}")


def _setup_logging(verbose: bool, lightning: bool = True) -> None:
    if lightning:
        import lightning as _  # noqa: F401 - it sets its loggers' levels on import; ours after

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "alembic", "mlflow", "urllib3", "numexpr"):
        logging.getLogger(name).setLevel(quiet)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _interrupted_message(command: str, overrides: list[str], err: KeyboardInterrupt) -> str:
    """What to type to continue: the same command with trainer.resume=last where a training
    checkpoint exists to continue from."""
    import shlex

    again = [o for o in overrides if not o.startswith(("trainer.resume=", "+trainer.resume="))]
    if command == "train" and getattr(err, "tsssm_checkpoint", None) is None:
        return ("interrupted before the first checkpoint; start again with "
                + shlex.join(["tsssm", command, *overrides]))
    if command in ("train", "run"):
        return "interrupted; resume with " + shlex.join(
            ["tsssm", command, *again, "trainer.resume=last"])
    return "interrupted; run it again with " + shlex.join(["tsssm", command, *overrides])


def _runner(command: str) -> Callable:
    if command == "train":
        from tsssm.commands.train import train

        return train
    if command == "score":
        from tsssm.commands.score import score

        return score
    if command == "compare":
        from tsssm.commands.compare import compare

        return compare
    if command == "dashboard":
        from tsssm.commands.dashboard import dashboard

        return dashboard
    from tsssm.commands.run import run

    return run


def _value_options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--port 8050`` / ``--port=8050`` taken out of argv: (rest, {"--port": "8050"})."""
    rest, found = [], {}
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in VALUE_OPTIONS:
            found[name] = value if eq else next(it, "")
        else:
            rest.append(a)
    return rest, found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tsssm.distributed import WORKER_COMMAND

    if argv[:1] == [WORKER_COMMAND]:  # a DDP rank > 0, started by rank 0's trainer
        return _ddp_worker(argv[1:])
    argv, values = _value_options(argv)
    flags = {a for a in argv if a.startswith("-")}
    args = [a for a in argv if not a.startswith("-")]
    verbose = bool(flags & {"-v", "--verbose"}) or "verbose=true" in args
    if not args or args[0] not in COMMANDS:
        if args:
            print(f"error: unknown command '{args[0]}'; choose one of: {', '.join(COMMANDS)}",
                  file=sys.stderr)
            return 2
        print(usage(), file=sys.stdout if flags & {"-h", "--help"} else sys.stderr)
        return 0 if flags & {"-h", "--help"} else 2
    command, overrides = args[0], args[1:]
    if command == "data":  # its own arguments (argparse), no Hydra config
        from tsssm.commands.data import main as data_main

        return data_main(argv[argv.index("data") + 1 :])
    if flags & {"-h", "--help"}:
        print(usage(command, overrides))
        return 0
    unknown = flags - {"-h", "--help", "-v", "--verbose", "--cfg"}
    if unknown:
        print(f"error: unknown option {sorted(unknown)[0]}; see `tsssm {command} --help`",
              file=sys.stderr)
        return 2
    for name, value in values.items():
        if VALUE_OPTIONS[name] != command:
            print(f"error: {name} is an option of `tsssm {VALUE_OPTIONS[name]}`, not of "
                  f"`tsssm {command}`", file=sys.stderr)
            return 2
        if not value or (name == "--port" and not value.isdigit()):
            print(f"error: {name} needs a value, e.g. {name} "
                  f"{'8050' if name == '--port' else '127.0.0.1'}", file=sys.stderr)
            return 2
    # The dashboard only reads the tracking store: it starts without torch and Lightning.
    computes = command != "dashboard"
    _setup_logging(verbose, lightning=computes)
    handlers = _install_interrupts()
    flushed = _flush_denormals() if computes else None
    try:
        return _main(command, overrides, flags, verbose, values)
    finally:
        # process state back as it was, for callers that run main() in-process
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if flushed is not None:
            import torch

            torch.set_flush_denormal(flushed)


def _flush_denormals() -> bool:
    """Decays exp(ΔA) and filter covariances underflow into subnormal floats, which the CPU
    handles 10-100x slower; flushing them to zero changes no result that matters. Returns
    whether they were flushed before, to restore that for callers of main() in-process."""
    import torch

    before = bool((torch.tensor([1e-310], dtype=torch.float64) * 1.0 == 0).item())
    torch.set_flush_denormal(True)
    return before


def _install_interrupts() -> dict:
    """A `kill` (SIGTERM) ends the command like Ctrl-C, so its MLflow run is marked KILLED.
    Returns the handlers to restore (Lightning sets SIGINT to ignored after an interrupt)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return {s: h for s, h in previous.items() if h is not None}


def _main(command: str, overrides: list[str], flags: set[str], verbose: bool,
          values: dict[str, str] | None = None) -> int:
    from tsssm.errors import TsssmError

    try:
        cfg = compose(overrides)
        if "--cfg" in flags:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        if command == "run":
            _runner(command)(cfg, overrides, compose)
        elif command in ("score", "train"):
            # score tells the keys a user set from those the bundle gives; train composes an
            # ensemble's members from them
            _runner(command)(cfg, overrides)
        elif command == "dashboard":
            values = values or {}
            options = {"host": values.get("--host", "127.0.0.1"), "verbose": verbose}
            if "--port" in values:
                options["port"] = int(values["--port"])
            _runner(command)(cfg, **options)
        else:
            _runner(command)(cfg)
        return 0
    except TsssmError as err:
        if verbose:
            log.exception("tsssm %s failed", command)
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(_interrupted_message(command, overrides, err), file=sys.stderr)
        return 130
    except Exception as err:  # a bug in tsssm or a library: say so, keep the details for -v
        if verbose:
            log.exception("tsssm %s failed", command)
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            # a full or read-only disk mid-command: the run is FAILED and its artifacts removed
            print(f"error: cannot write {err.filename or 'a file'} ({err.strerror}); free space "
                  "or choose a writable tracking.output_dir / tracking.artifact_root, then run "
                  "the command again", file=sys.stderr)
            return 2
        print(f"error: internal error in tsssm {command}: {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''} (run again with --verbose for "
              "the traceback)", file=sys.stderr)
        return 1


def _ddp_worker(args: list[str]) -> int:
    """``tsssm _ddp-worker <config.yaml>`` (internal): its part of a DDP fit, then exit."""
    _setup_logging(verbose=False)
    import torch

    from tsssm.distributed import run_worker

    torch.set_flush_denormal(True)
    run_worker(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
