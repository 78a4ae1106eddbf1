"""The `slmflow` command.

Run as:
    slmflow run [--config FILE] [--set dotted.key=value ...] [--no-prefect] [--verify]
    slmflow cache ls|du|verify|prune [--dir CACHE] ...   # the shared stage cache
    slmflow validate [--config FILE] [--set ...]
    slmflow show-config [--config FILE] [--set ...]
    slmflow make-tiny-model DIR [--seed N] [--shape phi3-mini --layers 2]
    slmflow convert-olive OLIVE_CONFIG.json      # the slmflow config, and what each Olive key became
    slmflow predict --model DIR "text" ... | --input FILE [--output FILE.jsonl] [--free]
    slmflow serve --model DIR [--host 127.0.0.1] [--port 8000]
    slmflow bundle --output DIR RUN_DIR RUN_DIR ...   # one base, the adapters of separate runs
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from slmflow.errors import ConfigError, SlmflowError


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, to end a run alike."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def _interrupted_status(exc: BaseException) -> int | None:
    """128 + the signal that interrupted the run (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if type(exc).__name__ == "TerminationSignal":  # Prefect's, should its SIGTERM bridge win
        return 128 + int(getattr(exc, "signal", signal.SIGTERM))
    return None


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML or JSON config (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set finetune.max_steps=20 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (default command)")
    _config_args(run)
    run.add_argument("--no-prefect", action="store_true",
                     help="run the same stages as plain functions, without Prefect")
    run.add_argument("--verify", action="store_true",
                     help="re-hash every cached stage output it reuses (default: only those whose "
                     "files' sizes, mtimes or inodes changed)")
    cache = sub.add_parser("cache", help="the shared stage cache: ls, du, verify, prune")
    cache.add_argument("action", choices=("ls", "du", "verify", "prune"))
    cache.add_argument("--dir", help="the cache folder (default: $SLMFLOW_CACHE, "
                       "$XDG_CACHE_HOME/slmflow or ~/.cache/slmflow)")
    cache.add_argument("--older-than", metavar="AGE", help="prune: entries unused for AGE (30d, 12h, 0s)")
    cache.add_argument("--keep-last", type=int, metavar="N", help="prune: keep the N last used per stage")
    cache.add_argument("--max-size", metavar="SIZE", help="prune: least recently used first, down to "
                       "SIZE (20G, 500M, 0)")
    cache.add_argument("--all", action="store_true", help="prune: every entry")
    cache.add_argument("--dry-run", action="store_true", help="prune, verify: say what, remove nothing")
    _config_args(sub.add_parser("validate", help="check the config, files and data; load no model"))
    show = sub.add_parser("show-config", help="print the resolved config as YAML")
    _config_args(show)
    show.add_argument("--reference", action="store_true", help="print the config reference (Markdown)")
    show.add_argument("--format", choices=("yaml", "json"), default="yaml",
                      help="json: one line, e.g. for `prefect deployment run --param config=...`")
    olive = sub.add_parser("convert-olive", help="translate an Olive config: print the slmflow "
                           "config (YAML) and what each Olive key became")
    olive.add_argument("file", help="an Olive config (JSON or YAML)")
    predict = sub.add_parser("predict", help="label texts with a published model folder "
                             "(OUTPUT_DIR/model): one JSON line each")
    predict.add_argument("--model", "-m", required=True, help="OUTPUT_DIR/model of a finished run")
    predict.add_argument("texts", nargs="*", help="texts to label")
    predict.add_argument("--input", "-i", help=".jsonl or .csv with the model's text columns")
    predict.add_argument("--output", "-o", help="write the answers here (.jsonl; default stdout)")
    predict.add_argument("--adapter", help="a folder with adapter files: the one to answer with "
                         "(default: the folder's default)")
    predict.add_argument("--free", action="store_true",
                         help="the free greedy answer (may be outside the label set)")
    serve = sub.add_parser("serve", help="serve a published model folder over HTTP "
                           "(POST /classify, GET /health)")
    serve.add_argument("--model", "-m", required=True, help="OUTPUT_DIR/model of a finished run")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    bundle = sub.add_parser("bundle", help="one folder (OUTPUT/model) with the shared int4 base "
                            "and the adapter files of several export.adapters=separate runs")
    bundle.add_argument("runs", nargs="+", help="output folders (or their model/ folders)")
    bundle.add_argument("--output", "-o", required=True, help="the bundle goes to OUTPUT/model")
    tiny = sub.add_parser("make-tiny-model", help="build the tiny random-init Phi-3 for tests")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shape", choices=("tiny", "phi3-mini"), default="tiny",
                      help="phi3-mini: Phi-3-mini-4k's real widths (random init)")
    tiny.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    before = {}
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        # SIGTERM and SIGHUP end a run as Ctrl-C does: children stopped, status 128 + signal.
        before = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except SlmflowError as exc:
        if getattr(exc, "report_path", None):
            print(f"report: {exc.report_path}", flush=True)
        # Always one line: values quoted in a message may hold any line break (\r, \u2028, ...).
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:
        status = _interrupted_status(exc)
        if status is None:
            raise
        from slmflow import lifeline

        lifeline.stop_all()  # any child a worker thread still waits on
        name = signal.Signals(status - 128).name
        print(f"interrupted ({name}): finished stages and fine-tuning checkpoints are kept; "
              "run again to resume", file=sys.stderr, flush=True)
        return status


def _tools(args: argparse.Namespace) -> int | None:
    """The commands that take no pipeline config; None for the others."""
    if args.command == "make-tiny-model":
        from slmflow.tiny import build_tiny_phi3

        print(build_tiny_phi3(args.dir, seed=args.seed, shape=args.shape, layers=args.layers))
        return 0
    if args.command == "cache":
        return _cache(args)
    if args.command == "predict":
        from slmflow.predict import run_predict

        return run_predict(args.model, args.texts, args.input, args.output, args.free,
                           args.adapter)
    if args.command == "serve":
        from slmflow.serve import serve

        return serve(args.model, args.host, args.port)
    if args.command == "bundle":
        from slmflow.bundle import bundle_folders

        print(f"bundle: {bundle_folders(args.runs, args.output)}")
        return 0
    if args.command == "convert-olive":
        from slmflow.configio import convert_olive_file

        print(convert_olive_file(args.file), end="")
        return 0
    return None


def _dispatch(args: argparse.Namespace) -> int:
    status = _tools(args)
    if status is not None:
        return status

    from slmflow.configio import config_reference, dump_config, load_config

    if args.command == "show-config" and args.reference:
        print(config_reference())
        return 0

    config = load_config(args.config, args.overrides)
    if args.command == "show-config":
        if args.format == "json":
            print(config.model_dump_json())
        else:
            print(dump_config(config), end="")
        return 0
    if args.command == "run" and args.no_prefect and config.placement.pools():
        raise ConfigError("placement: placed stages run as Prefect flow runs on their work pools; "
                          "drop --no-prefect, or clear placement to run every stage here")
    if args.command == "run" and args.verify:
        from slmflow.artifacts import VERIFY_ENV

        os.environ[VERIFY_ENV] = "1"  # inputs and stage folders re-hashed (Prefect's threads too)
    from slmflow.preflight import validate_run

    inputs = validate_run(config)  # a bad input ends here, on one line, before any output
    for note in config.notes:  # what each key of a translated Olive config became
        print(f"olive: {note}", file=sys.stderr, flush=True)
    if args.command == "validate":
        print(f"ok: model {inputs.model_source.uri}, {inputs.train_rows} training rows"
              + (f", {inputs.eval_rows} eval rows" if inputs.eval_rows else "")
              + (f", given adapter {inputs.adapter_source.uri} (nothing to train)"
                 if inputs.adapter_source else ""))
        return 0
    if args.no_prefect:
        from flows.pipeline import run_pipeline, run_plain

        path = run_pipeline(config, run_plain, inputs=inputs)
    else:
        from slmflow.prefect_api import ephemeral_api

        # The ephemeral Prefect API can take over 20 s to start on a busy 2-core machine.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry
        timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        with ephemeral_api(timeout) as api:  # starts while the pipeline's code is imported
            from flows.pipeline import slmflow_pipeline

            with api():
                path = slmflow_pipeline(config, resolved_inputs=inputs)
    print(f"report: {path}", flush=True)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slmflow import cache

    folder = cache.resolve_cache_dir(args.dir, Path.cwd())
    if args.action == "ls":
        lines = cache.ls_lines(folder)
    elif args.action == "du":
        lines = cache.du_lines(folder)
    elif args.action == "verify":
        lines, _ = cache.verify(folder, dry_run=args.dry_run)
    else:
        rules = (args.older_than, args.keep_last, args.max_size)
        if not args.all and all(r is None for r in rules):
            raise ConfigError("cache prune: say what to remove: --older-than AGE, --keep-last N, "
                              "--max-size SIZE or --all")
        try:
            lines = cache.prune(
                folder, older_than=cache.parse_age(args.older_than) if args.older_than else None,
                keep_last=args.keep_last, everything=args.all, dry_run=args.dry_run,
                max_size=cache.parse_size(args.max_size) if args.max_size is not None else None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
