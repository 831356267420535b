"""`medidiff` command line. Heavy libraries are imported inside the commands, so --help is fast.

Exit codes: 0 success; 1 a series failed or nothing matched; 2 a usage or input error.
"""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """examples:
  medidiff inspect datasets/samples/chest-dx-sample
  medidiff run bone-suppression datasets/samples/chest-dx-sample -o out/
  medidiff run pipelines/normalize-preview.yaml studies.zip -o out/
  medidiff stages
  medidiff train configs/bone_suppression/ldm.yaml
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medidiff",
        description="Diffusion models for medical imaging, on DICOM studies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (never patient data)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="list the studies and series in a folder, zip or DICOMDIR")
    inspect.add_argument("path", help="folder, .zip, DICOMDIR or single DICOM file")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")

    run = sub.add_parser("run", help="run a pipeline over every matching series of INPUT")
    run.add_argument("pipeline", help="a pipeline YAML file or a built-in name (see pipelines/)")
    run.add_argument("input", help="folder, .zip, DICOMDIR or single DICOM file (never modified)")
    run.add_argument("-o", "--output", required=True, help="output folder (created; re-runs resume)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser("stages", help="list every available stage with its parameters")

    train = sub.add_parser("train", help="train a model from a config in configs/")
    train.add_argument("config", help="training config YAML, e.g. configs/bone_suppression/ldm.yaml")
    train.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    train.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    return parser


def _inspect(args) -> int:
    from medidiff.io.discovery import discover, open_source

    with open_source(args.path) as root:
        inventory = discover(root)
    if args.json:
        import json

        print(json.dumps({
            "series": [s.to_public_dict() for s in inventory.series],
            "refused": [{"path": r.path, "reason": r.reason} for r in inventory.refused],
        }, indent=2))
        return 0
    rows = inventory.summary_rows()
    if rows:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(inventory.series)} series; {len(inventory.refused)} file(s) could not be used")
    for refusal in inventory.refused:
        print(f"  {refusal.path}: {refusal.reason}")
    return 0


def _run(args) -> int:
    from medidiff.executor import run_pipeline
    from medidiff.pipeline import Pipeline

    pipeline = Pipeline.from_yaml(args.pipeline)
    report = run_pipeline(pipeline, args.input, args.output, progress=not args.no_progress)
    print(report.summary())
    print(f"report: {args.output}/report.json")
    return 0 if report.ok else 1


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
    from medidiff.train import train

    train(args.config, resume=not args.fresh, max_minutes=args.max_minutes)
    return 0


COMMANDS = {"inspect": _inspect, "run": _run, "stages": _stages, "train": _train}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from medidiff.errors import MedidiffError

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
