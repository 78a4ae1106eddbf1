"""The `slmflow` command.

Run as:
    slmflow run [--config FILE] [--set dotted.key=value ...] [--no-prefect]
    slmflow validate [--config FILE] [--set ...]
    slmflow show-config [--config FILE] [--set ...]
    slmflow make-tiny-model DIR [--seed N] [--shape phi3-mini --layers 2]
    slmflow convert-olive OLIVE_CONFIG.json      # the slmflow config, and what each Olive key became
    slmflow predict --model DIR "text" ... | --input FILE [--output FILE.jsonl] [--free]
    slmflow serve --model DIR [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import os
import sys

from slmflow.errors import ConfigError, SlmflowError


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
    predict.add_argument("--free", action="store_true",
                         help="the free greedy answer (may be outside the label set)")
    serve = sub.add_parser("serve", help="serve a published model folder over HTTP "
                           "(POST /classify, GET /health)")
    serve.add_argument("--model", "-m", required=True, help="OUTPUT_DIR/model of a finished run")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
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
    try:
        return _dispatch(args)
    except SlmflowError as exc:
        if getattr(exc, "report_path", None):
            print(f"report: {exc.report_path}", flush=True)
        # Always one line: values quoted in a message may hold any line break (\r, \u2028, ...).
        print("error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run again to resume", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "make-tiny-model":
        from slmflow.tiny import build_tiny_phi3

        print(build_tiny_phi3(args.dir, seed=args.seed, shape=args.shape, layers=args.layers))
        return 0

    if args.command == "predict":
        from slmflow.predict import run_predict

        return run_predict(args.model, args.texts, args.input, args.output, args.free)

    if args.command == "serve":
        from slmflow.serve import serve

        return serve(args.model, args.host, args.port)

    if args.command == "convert-olive":
        from slmflow.configio import convert_olive_file

        print(convert_olive_file(args.file), end="")
        return 0

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
    from slmflow.preflight import validate_run

    inputs = validate_run(config)  # a bad input ends here, on one line, before any output
    for note in config.notes:  # what each key of a translated Olive config became
        print(f"olive: {note}", file=sys.stderr, flush=True)
    if args.command == "validate":
        print(f"ok: model {inputs.model_source.uri}, {inputs.train_rows} training rows"
              + (f", {inputs.eval_rows} eval rows" if inputs.eval_rows else ""))
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


if __name__ == "__main__":
    sys.exit(main())
