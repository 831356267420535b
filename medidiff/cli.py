"""`medidiff` command line. Heavy libraries are imported inside the commands, so --help is fast.

Exit codes: 0 success; 1 a series failed or nothing matched; 2 a usage or input error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EPILOG = """examples:
  medidiff inspect datasets/samples/chest-dx-sample
  medidiff run bone-suppression datasets/samples/chest-dx-sample -o out/
  medidiff run pipelines/normalize-preview.yaml studies.zip -o out/
  medidiff run normalize-preview --from dicomweb://pacs:8042/dicom-web --query ModalitiesInStudy=CT \
      -o out/ --to dicomweb://pacs:8042/dicom-web
  medidiff stages
  medidiff train configs/bone_suppression/ldm.yaml
  medidiff evaluate bone-suppression --data synthetic-cxr:test:20 --baseline identity
  medidiff models register bone_suppression
  medidiff reader-study export bone-suppression --data synthetic-cxr:test:20 -o study/
  medidiff batch bone-suppression /data/incoming -o out/ --workers 2
  medidiff status out/
  medidiff listen normalize-preview --ae-title MEDIDIFF --port 11112 -o out/ --allow MODALITY \
      --destination PACS@10.0.0.5:104
"""


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _add_sending(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", metavar="DESTINATION", help="send the derived DICOM series to dicomweb://HOST:PORT/PATH "
                        "(STOW-RS) or AE@HOST:PORT (C-STORE); what cannot be delivered stays queued in "
                        "OUT/.medidiff/outbox/ and is sent by the next run with --to")
    parser.add_argument("--send-tries", type=_positive_int, default=3,
                        help="delivery rounds before leaving the rest queued (default 3; waits of 1 s, 2 s, ... between them)")


def _add_running(parser: argparse.ArgumentParser, default_workers: int) -> None:
    """The options of the work queue's executor (`batch`, `listen`)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=default_workers, metavar="N",
                       help=f"N local Dask worker processes (default {default_workers}); 0: in this process, "
                       "without Dask")
    where.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask scheduler (its workers "
                       "must see the input and output folders at the same paths)")
    parser.add_argument("--max-attempts", type=_positive_int, default=3,
                        help="quarantine a study after this many failed attempts (default 3)")
    parser.add_argument("--retry-delay", type=float, default=5.0,
                        help="seconds before the first retry of a failed study, doubled each time (default 5)")


def _in_process(args) -> bool:
    """Whether the studies run in this process (else Dask workers build the pipeline, not this process)."""
    return not (args.scheduler or args.workers)


def _executor(args, pipeline):
    """The executor the options ask for (not yet entered): Dask workers, or this process."""
    from medidiff.errors import InputError

    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: give 0 (in this process) or more worker processes")
    if args.retry_delay < 0:
        raise InputError(f"--retry-delay {args.retry_delay}: give 0 or more seconds")
    if not _in_process(args):
        from medidiff.scaleout import DaskExecutor

        return DaskExecutor(workers=args.workers, scheduler=args.scheduler)
    from medidiff.batch import InProcess

    return InProcess(pipeline)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medidiff",
        description="Diffusion models for medical imaging, on DICOM studies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (never patient data)")
    parser.add_argument("--config", metavar="FILE", help="settings file (YAML, one mapping of options per command; "
                        "default $MEDIDIFF_CONFIG); MEDIDIFF_<COMMAND>_<OPTION> variables override it, flags override both")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = sub.choices

    inspect = sub.add_parser("inspect", help="list the studies and series in a folder, zip, DICOMDIR or volume",
                             description="List studies and series (identifiers hashed) and every file that "
                             "cannot be used, with the reason. Unusable files are shown by their path "
                             "relative to the input, for your own terminal; `run` reports name them by hash.")
    inspect.add_argument("path", help="folder, .zip, DICOMDIR, single DICOM file or .nii[.gz]/.nrrd/.mha volume")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")

    run = sub.add_parser("run", help="run a pipeline over every matching series of INPUT (or of a DICOMweb "
                         "server's studies)")
    run.add_argument("pipeline", help="a pipeline YAML file or a built-in name (see pipelines/)")
    run.add_argument("input", nargs="?", help="folder, .zip, DICOMDIR, single DICOM file or .nii[.gz]/.nrrd/.mha "
                     "volume (never modified; volumes are written as NIfTI, never as DICOM); or use --from")
    run.add_argument("-o", "--output", required=True, help="output folder (created; re-runs resume)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--from", dest="source", metavar="dicomweb://HOST:PORT/PATH",
                     help="instead of INPUT: the studies of a DICOMweb server that match --query (QIDO-RS search, "
                     "WADO-RS retrieve into a temporary folder, always removed)")
    run.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                     help="a QIDO-RS filter for --from, e.g. PatientID=123, StudyDate=20240101-20241231, "
                     "ModalitiesInStudy=CT (repeatable)")
    _add_sending(run)

    sub.add_parser("stages", help="list every available stage with its parameters")

    train = sub.add_parser("train", help="train a model from a config in configs/")
    train.add_argument("config", help="training config YAML, e.g. configs/bone_suppression/ldm.yaml")
    train.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    train.add_argument("--run-dir", default=None, help="run folder: checkpoints, weights, model card "
                       "(default ~/.cache/medidiff/runs/NAME; never the source tree)")
    train.add_argument("--export", default=None, help="also copy the trained weights and card into this model "
                       "folder, e.g. models/bone_suppression")
    train.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    train.add_argument("--device", default="cpu", help="torch device to train on: cpu (default), cuda, cuda:1")
    train.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI "
                       "or ./mlflow.db)")
    train.add_argument("--no-tracking", action="store_true", help="do not log the training to MLflow")

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                          "else sqlite:///mlflow.db in the working directory)")

    evaluate = sub.add_parser("evaluate", parents=[tracking], help="evaluate a pipeline against references, "
                              "with 95%% CIs, tracked in MLflow")
    evaluate.add_argument("pipeline", help="a pipeline YAML file or a built-in name")
    evaluate.add_argument("--data", required=True,
                          help="synthetic-cxr:test:N[:SIZE], drr-cxr:test:N[:SIZE], cs-held-out:test:N[:SIZE], "
                          "ct-denoise:test:N, mr-sr2:test:N, mr-sr4:test:N, xray-sr4:test:N, or a folder of DICOM "
                          "studies with a reference/ subfolder")
    evaluate.add_argument("--baseline", help="a pipeline to compare with (paired test), 'identity' (the input), "
                          "'bicubic' (the input resampled to the reference grid), 'zero-filled' (MR: zero-filled k-space "
                          "interpolation onto the reference grid) or 'default' (the task's own)")
    evaluate.add_argument("--experiment", default="medidiff-evaluation", help="MLflow experiment name")
    evaluate.add_argument("--cases", type=_positive_int, default=None, help="evaluate only the first N cases")
    evaluate.add_argument("--no-tracking", action="store_true", help="compute and print only; log nothing")
    evaluate.add_argument("-o", "--output", help="new folder for the local copy of the results (default when "
                          "tracking: evaluations/<pipeline>-<data>-<time>/)")

    models = sub.add_parser("models", help="the MLflow model registry")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    register = models_sub.add_parser("register", parents=[tracking], help="register models/NAME/ (or --folder)")
    register.add_argument("name", help="model name, e.g. bone_suppression")
    register.add_argument("--folder", help="model folder (default: the shipped models/NAME/)")
    resolve = models_sub.add_parser("resolve", parents=[tracking], help="print the local folder of a model spec")
    resolve.add_argument("spec", help="default, a folder, or models:/NAME/VERSION")

    reader = sub.add_parser("reader-study", help="blinded reader studies: export images, import scores")
    reader_sub = reader.add_subparsers(dest="reader_command", metavar="ACTION", required=True)
    export = reader_sub.add_parser("export", help="write a blinded, randomised A/B image package and its key")
    export.add_argument("pipeline", help="method A: a pipeline YAML file or a built-in name")
    export.add_argument("--data", required=True, help="as for 'medidiff evaluate'")
    export.add_argument("--baseline", default="default",
                        help="method B: a pipeline, 'identity', 'bicubic' or 'default' (the task's own baseline)")
    export.add_argument("-o", "--output", required=True, help="new folder: reader_package/ + key.json")
    export.add_argument("--cases", type=_positive_int, default=None, help="export only the first N cases")
    export.add_argument("--no-reference", action="store_true", help="do not show the reference image")
    export.add_argument("--seed", type=int, default=None, help="randomisation seed (default: random)")
    import_ = reader_sub.add_parser("import", parents=[tracking], help="analyse readers' score CSVs, log to MLflow")
    import_.add_argument("key", help="the study's key.json")
    import_.add_argument("scores", nargs="+", help="filled-in score CSV files, one per reader")
    import_.add_argument("--experiment", default="medidiff-reader-study", help="MLflow experiment name")
    import_.add_argument("--no-tracking", action="store_true", help="print only; log nothing")

    batch = sub.add_parser("batch", help="run a pipeline study by study from a durable queue: resumes after a "
                           "kill, retries, quarantines, scales out on Dask", description="Queue every study of "
                           "INPUT in OUT/.medidiff/queue.sqlite and run PIPELINE on each, on Dask worker processes. "
                           "A killed batch resumes where it stopped when run again; a failed study is retried "
                           "after a backoff and quarantined (with its reason) after --max-attempts failures. "
                           "Logs are JSON lines on stderr with hashed keys only.")
    batch.add_argument("pipeline", help="a pipeline YAML file or a built-in name (see pipelines/)")
    batch.add_argument("input", help="folder, .zip, DICOMDIR or single file (never modified)")
    batch.add_argument("-o", "--output", required=True, help="output folder (created; re-runs resume)")
    _add_running(batch, default_workers=1)
    batch.add_argument("--retry-quarantined", action="store_true", help="give quarantined studies a new chance")
    _add_sending(batch)

    status = sub.add_parser("status", help="health and metrics of an output folder (JSON): processed, failed, "
                            "queue length, seconds per study, quarantine, outbox")
    status.add_argument("output", help="an output folder of `medidiff batch`, `run` or `listen`")

    listen = sub.add_parser("listen", help="a DICOM C-STORE SCP: run a pipeline on each received study, "
                            "send the results by C-STORE", description="Receive studies by C-STORE (and answer "
                            "C-ECHO), queue each study once no instance arrived for --idle-seconds in OUT/.medidiff/queue.sqlite, "
                            "run PIPELINE on it (in this process or on Dask workers; retried, then quarantined) and "
                            "send every derived DICOM file to --destination (retried until it answers). A killed "
                            "listener picks up where it stopped when started again. Logs are "
                            "JSON lines on stderr with hashed keys only. Stop with Ctrl-C or SIGTERM.")
    listen.add_argument("pipeline", help="a pipeline YAML file or a built-in name (see pipelines/)")
    listen.add_argument("--ae-title", required=True, help="this listener's AE title")
    listen.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    listen.add_argument("--bind", default="0.0.0.0", help="address to listen on (default: all)")
    listen.add_argument("-o", "--output", required=True, help="output folder (spool and outbox in OUT/.medidiff/)")
    listen.add_argument("--allow", action="append", metavar="CALLING_AE",
                        help="accept associations only from this calling AE title (repeatable; default: any)")
    listen.add_argument("--destination", metavar="AE@HOST:PORT", help="send derived series here by C-STORE "
                        "(or by STOW-RS to a dicomweb://HOST:PORT/PATH)")
    listen.add_argument("--idle-seconds", type=float, default=30.0,
                        help="a study is complete after this long without a new instance (default 30)")
    _add_running(listen, default_workers=0)
    return parser


def _inspect(args) -> int:
    from medidiff.io.discovery import discover, open_source

    with open_source(args.path) as root:
        inventory = discover(root)
    if args.json:
        import json

        print(json.dumps({
            "series": [s.to_public_dict() for s in inventory.series],
            "refused": [r.to_local_dict() for r in inventory.refused],
        }, indent=2))
        return 0
    rows = inventory.summary_rows()
    if rows:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(inventory.series)} series; {len(inventory.refused)} file(s) could not be used")
    for refusal in inventory.refused:
        print(f"  {refusal.local_line()}")
    return 0


def _run(args) -> int:
    from contextlib import nullcontext

    from medidiff.errors import InputError

    if (args.input is None) == (args.source is None):
        raise InputError("give either INPUT or --from dicomweb://HOST:PORT/PATH")
    if args.query and not args.source:
        raise InputError("--query filters the studies of --from; give --from dicomweb://HOST:PORT/PATH or drop --query")
    destination = _destination(args.to)
    studies = nullcontext(args.input)
    if args.source:
        from medidiff.dicomweb import http_url, parse_query, retrieved_studies

        studies = retrieved_studies(http_url(args.source, "--from"), parse_query(args.query))
    from medidiff.executor import run_pipeline
    from medidiff.pipeline import Pipeline

    pipeline = Pipeline.from_yaml(args.pipeline)
    with studies as input_path:
        report = run_pipeline(pipeline, input_path, args.output, progress=not args.no_progress)
    print(report.summary())
    print(f"report: {args.output}/report.json")
    if destination:
        from medidiff.dicomnet.outbox import deliver_outputs

        if _sent(*deliver_outputs(report.results, args.output, destination, args.send_tries), destination):
            return 1
    return 0 if report.ok else 1


def _destination(text: str | None):
    """The --to destination, checked before any work; None without --to."""
    from medidiff.dicomnet.outbox import parse_destination

    return parse_destination(text) if text else None


def _sent(pending: int, folder, destination) -> int:
    """Say whether everything reached ``destination``; returns how many instances wait in ``folder``."""
    if pending:
        print(f"medidiff: {pending} instance(s) could not be delivered to {destination} yet; they wait in {folder} "
              "and are sent by the next run with the same --to and -o", file=sys.stderr)
    else:
        print(f"sent to {destination}; nothing waiting")
    return pending


def _stages(args) -> int:
    from medidiff.stages.registry import available_stages

    for spec in available_stages().values():
        print(f"{spec.name}\n    {spec.summary}")
        for name, param in spec.parameters().items():
            default = "" if param.default is param.empty else f" = {param.default!r}"
            print(f"    - {name}{default}")
    print("\nAny MONAI dictionary transform can be used by import path, e.g. monai.transforms.ScaleIntensityd")
    return 0


def _train(args) -> int:
    from pathlib import Path

    from medidiff.train import train

    options = {"resume": not args.fresh, "max_minutes": args.max_minutes, "out_dir": args.run_dir,
               "export_to": args.export, "device": args.device}
    if args.no_tracking:
        train(args.config, **options)
        return 0
    from medidiff.tracking import training_logger

    with training_logger(Path(args.config).stem, args.config, tracking_uri=args.tracking_uri) as log:
        weights = train(args.config, log=log, **options)
        log.add_model_files(weights, weights.with_suffix(".json"), weights.parent / "MODEL_CARD.md")
    return 0


def _evaluate(args) -> int:
    from medidiff import tracking

    if not args.no_tracking:  # before the heavy imports: a dead server is reported in a second or two
        tracking.check_reachable(args.tracking_uri)
    from medidiff.evaluation import evaluate

    result = evaluate(args.pipeline, args.data, baseline=args.baseline, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, cases=args.cases, track=not args.no_tracking, output=args.output)
    print(result.table())
    if result.local_copy:
        print(f"results saved in {result.local_copy}")
    if result.tracking_error:
        print(f"medidiff evaluate: error: MLflow did not store the run completely ({result.tracking_error}); "
              f"the results are saved in {result.local_copy}", file=sys.stderr)
        return 2
    return 0 if not result.failed else 1


def _models(args) -> int:
    from medidiff import model_registry

    if args.models_command == "register":
        model = model_registry.register_model_folder(args.name, args.folder, tracking_uri=args.tracking_uri)
        print(f"registered {model.uri} (run {model.run_id})")
    else:
        print(model_registry.resolve_model_dir(args.spec, tracking_uri=args.tracking_uri))
    return 0


def _reader_study(args) -> int:
    from medidiff.evaluation import reader_study

    if args.reader_command == "export":
        key = reader_study.export(args.pipeline, args.data, args.output, baseline=args.baseline, cases=args.cases,
                                  include_reference=not args.no_reference, seed=args.seed)
        print(f"{len(key.trials)} trials: give {args.output}/{reader_study.PACKAGE}/ to the readers; "
              f"keep {args.output}/{reader_study.KEY_FILE} away from them")
    else:
        result = reader_study.analyse(args.key, args.scores, tracking_uri=args.tracking_uri,
                                      experiment=args.experiment, track=not args.no_tracking)
        print(result.table())
    return 0


def _batch(args) -> int:
    from medidiff.batch import run_batch
    from medidiff.pipeline import Pipeline

    destination = _destination(args.to)
    pipeline = Pipeline.from_yaml(args.pipeline, build=_in_process(args))
    with _executor(args, pipeline) as executor:
        summary = run_batch(pipeline, args.input, args.output, executor, max_attempts=args.max_attempts,
                            retry_delay=args.retry_delay, retry_quarantined=args.retry_quarantined,
                            destination=destination, send_tries=args.send_tries)
    print(summary.text())
    print(f"report: {args.output}/report.json; health: medidiff status {args.output}")
    if destination and _sent(summary.waiting, summary.outbox.root, destination):
        return 1
    return 0 if summary.ok else 1


def _status(args) -> int:
    import json

    from medidiff.health import health

    print(json.dumps(health(args.output), indent=2))
    return 0


def _listen(args) -> int:
    import signal
    import threading

    if not args.verbose:  # its own error lines would break the JSON-lines log; the events say the same
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    from medidiff.dicomnet.listener import Listener
    from medidiff.dicomnet.outbox import parse_destination
    from medidiff.pipeline import Pipeline

    destination = parse_destination(args.destination, args.ae_title) if args.destination else None
    pipeline = Pipeline.from_yaml(args.pipeline, build=_in_process(args))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with _executor(args, pipeline) as executor:
        Listener(pipeline, args.output, ae_title=args.ae_title, port=args.port, bind=args.bind, allowed=args.allow,
                 destination=destination, idle_seconds=args.idle_seconds, executor=executor,
                 max_attempts=args.max_attempts, retry_delay=args.retry_delay).serve(stop)
    return 0


COMMANDS = {
    "inspect": _inspect, "run": _run, "stages": _stages, "train": _train, "evaluate": _evaluate,
    "models": _models, "reader-study": _reader_study, "listen": _listen, "batch": _batch, "status": _status,
}


def _command_and_config(argv: list[str]) -> tuple[str | None, str | None]:
    """The command named in ``argv`` and the --config file given before it, without parsing the rest."""
    config, tokens = None, iter(argv)
    for token in tokens:
        if token == "--config":
            config = next(tokens, None)
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
        elif not token.startswith("-"):
            return token, config
    return None, config


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that sleep instead of spinning while they wait (read when torch loads; a user's own
    # setting wins): on a machine busy with other jobs, spinning threads made a bone-suppression run 3x
    # slower (40 s against 15 s beside one training process); on an idle machine both take the same time
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from medidiff import settings
    from medidiff.errors import MedidiffError

    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command, config = _command_and_config(argv)
    if command in parser.commands:
        try:
            settings.apply(parser.commands[command], command, config)
        except MedidiffError as exc:
            print(f"medidiff {command}: error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:  # pydicom warns about every sloppy header it reads or copies: noise in batch logs
        logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except MedidiffError as exc:
        print(f"medidiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
