"""Clinical evaluation of a pipeline against reference images, tracked as one MLflow run.

Per case: run the pipeline (and the baseline), map output, baseline and reference to [0, 1] with the
reference's own min/max window, compute the task's metrics (``evaluation.tasks``: the task the
pipeline's stage declares; the output may differ in shape from the input, not from the reference). Then aggregate (mean with a bootstrap 95 %
CI), compare with the baseline (paired bootstrap CI of the difference + Wilcoxon signed-rank p-value),
and log params, metrics, the per-case table, worst/best panels and the dataset lineage to MLflow.
Case ids are hashed series keys (phantom seeds for synthetic data): no identifier reaches MLflow.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medidiff.errors import InputError, MedidiffError, OutputError
from medidiff.evaluation.datasets import EvaluationData, load_data
from medidiff.evaluation.statistics import (
    BOOTSTRAP,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    MIN_CASES,
    Interval,
    PairedTest,
    bootstrap_ci,
    paired_test,
)
from medidiff.evaluation.tasks import BASELINES, Task, task_for
from medidiff.metrics import LOWER_IS_BETTER
from medidiff.pipeline import Pipeline
from medidiff.pipeline import _resolve_factory as pipeline_factory

log = logging.getLogger(__name__)

IDENTITY = "identity"
DEFAULT_BASELINE = "default"  # the task's own baseline (identity; bicubic for super-resolution)
MODEL_PARAM_NAMES = ("model", "model_dir")
TABLE_FORMATS = {"PSNR": ".2f", "MSE": ".6f", "NMSE": ".6f"}  # others: .4f


@dataclass
class EvaluationResult:
    """Aggregates (mean and 95 % CI per metric), the paired comparison with the baseline, per-case rows."""

    pipeline: str
    data: str
    metrics: dict[str, Interval]
    baseline: str | None = None
    baseline_metrics: dict[str, Interval] = field(default_factory=dict)
    comparison: dict[str, PairedTest] = field(default_factory=dict)
    cases: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    run_id: str | None = None
    local_copy: Path | None = None
    tracking_error: str | None = None

    def table(self) -> str:
        """A short plain-text table: metric, mean [95 % CI], and the baseline comparison if any."""
        header = f"{self.pipeline} on {self.data}: {len(self.cases)} cases"
        header += f", {len(self.failed)} failed, {self.skipped} skipped; {self.seconds:.1f} s"
        lines = [header, f"{'metric':8s} {'mean [95% CI]':34s}" + (
            f" {'baseline: ' + self.baseline:34s} {'difference [95% CI]':34s} {'Wilcoxon p':>10s}" if self.baseline else "")]
        for name, interval in self.metrics.items():
            line = f"{name:8s} {str(interval):34s}"
            if name in self.comparison:
                test = self.comparison[name]
                line += f" {str(self.baseline_metrics[name]):34s} {str(test.difference):34s} {test.p_text:>10s}"
            lines.append(line)
        lines.append(f"CIs: 95 % {BOOTSTRAP}; n/a below {MIN_CASES} cases")
        if self.run_id:
            lines.append(f"MLflow run {self.run_id}")
        return "\n".join(lines)


def metric_names(pipeline: Pipeline, modality: str) -> tuple[str, ...]:
    """The metrics of the pipeline's task (declared by its stage), else generic (+ NMSE for MR)."""
    return task_for(pipeline.task, modality).metrics


def as_batch(image: torch.Tensor) -> torch.Tensor:
    """(1, cols, rows) -> (1, 1, cols, rows); (1, cols, rows, slices) -> (slices, 1, cols, rows)."""
    image = torch.as_tensor(image).float()
    return image[None] if image.ndim == 3 else image.permute(3, 0, 1, 2)


def compute_metrics(names, output: torch.Tensor, reference: torch.Tensor, original: torch.Tensor) -> dict[str, float]:
    """Metrics of ``output`` against ``reference``, all images mapped to [0, 1] with the reference's min/max.

    3-D images: the mean over slices. ``original`` is only read by metrics that need it (BSR).
    """
    from medidiff.metrics import METRICS

    if output.shape != reference.shape:
        raise InputError(f"output shape {tuple(output.shape)} differs from the reference's {tuple(reference.shape)}")
    lo, hi = float(reference.min()), float(reference.max())
    scale = hi - lo if hi > lo else 1.0

    def unit(t: torch.Tensor) -> torch.Tensor:
        return ((as_batch(t) - lo) / scale).clamp(0, 1)

    out, ref = unit(output), unit(reference)
    before = unit(original) if original.shape == reference.shape else None
    return {name: float(METRICS[name](out, ref, before).mean()) for name in names}


def stage_parameters(pipeline: Pipeline, prefix: str = "") -> dict[str, dict]:
    """``{"<prefix>stage.<i>.<name>": {param: value}}``: every parameter of every stage, defaults included."""
    out = {}
    for index, call in enumerate(pipeline.stages):
        signature = inspect.signature(pipeline_factory(call.name, call.line))
        defaults = {name: p.default for name, p in signature.parameters.items()
                    if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        out[f"{prefix}stage.{index}.{call.name}"] = defaults | call.params
    return out


@dataclass
class ModelProvenance:
    """What identifies the models a pipeline uses: params to log, registered versions to link."""

    params: dict[str, str] = field(default_factory=dict)
    registered: list = field(default_factory=list)  # mlflow ModelVersion objects


def model_provenance(pipeline: Pipeline, prefix: str = "") -> ModelProvenance:
    """Resolve each stage's model (once, up front: a mistyped ``models:/`` spec fails here) and identify it
    by the sha256 of its files (``model.<file>.sha256``), the folder digest and, for ``models:/``, the
    registered version. Stages without a model parameter contribute their shipped folder if they have one
    (``models/<the stage class's model_folder, else the stage's name>``)."""
    from medidiff.model_registry import file_sha256, folder_digest, resolve_model_dir

    found = ModelProvenance()
    for (key, params), call in zip(stage_parameters(pipeline, prefix).items(), pipeline.stages, strict=True):
        spec = str(next((params[k] for k in MODEL_PARAM_NAMES if k in params), "default"))
        try:
            folder = resolve_model_dir(spec, default_name=getattr(pipeline_factory(call.name, call.line), "model_folder",
                                                                  call.name))
        except MedidiffError:
            if spec in ("", "default"):
                continue
            raise
        if not folder.is_dir():
            continue
        found.params |= {f"{key}.model.spec": spec, f"{key}.model.folder_sha256": folder_digest(folder)}
        found.params |= {f"{key}.model.{path.name}.sha256": file_sha256(path)
                         for path in sorted(folder.iterdir()) if path.is_file()}
        if spec.startswith("models:/"):
            version = registered_version(spec)
            found.registered.append(version)
            found.params[f"{key}.model.registered"] = f"models:/{version.name}/{version.version} (run {version.run_id})"
    return found


def registered_version(spec: str):
    """The registry's ModelVersion for ``models:/<name>/<version or alias>`` (InputError if unknown)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from medidiff import tracking

    name, ref = spec.removeprefix("models:/").split("/")
    client = MlflowClient(tracking.resolve_tracking_uri(), tracking.resolve_tracking_uri())
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        if ref == "latest":
            return max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        return client.get_model_version_by_alias(name, ref)
    except (MlflowException, ValueError) as exc:
        raise InputError(f"model {spec}: not in the registry ({str(exc).splitlines()[0]})") from None


def load_baseline(
    baseline: str | Pipeline | None, task: Task | None = None
) -> tuple[str | None, Callable[[dict], dict] | None]:
    """(name, item -> item) for a baseline: a name in ``evaluation.tasks.BASELINES`` (``identity``,
    ``bicubic``, ``zero-filled``), ``"default"`` (the task's own), a pipeline (file, name or object), or None."""
    if baseline is None:
        return None, None
    if baseline == DEFAULT_BASELINE:
        baseline = (task or task_for(None)).baseline
    if isinstance(baseline, str) and baseline in BASELINES:
        return baseline, BASELINES[baseline]
    pipeline = baseline if isinstance(baseline, Pipeline) else Pipeline.from_yaml(baseline)
    return pipeline.name, pipeline


# (inputs, references) -> outputs on (N, 1, rows, cols) batches; only an oracle looks at the references
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compare_methods(
    methods: dict[str, tuple[Method, int]], data: EvaluationData, task: Task, *, batch: int = 25
) -> list[dict]:
    """Rows ``{method, n, <METRIC>..., s/img}`` for methods called on tensors rather than pipelines.

    For data already in [0, 1] (phantoms): inputs and references are batched as (N, 1, rows, cols),
    outputs clamped to [0, 1] and scored without a window; each method gets its first ``n`` cases.
    """
    from medidiff.io.layout import swap_rows_cols
    from medidiff.metrics import METRICS

    items = list(data.cases())
    inputs, references = (torch.stack([swap_rows_cols(torch.as_tensor(i[key]).float()) for i in items])
                          for key in ("image", "reference"))
    rows = []
    for name, (method, n) in methods.items():
        x, ref = inputs[:n], references[:n]
        start = time.perf_counter()
        with torch.no_grad():
            out = torch.cat([method(x[i:i + batch], ref[i:i + batch]) for i in range(0, len(x), batch)]).clamp(0, 1)
        seconds = (time.perf_counter() - start) / len(x)
        scores = {m.upper(): round(float(METRICS[m](out, ref, x).mean()), 5) for m in task.metrics}
        rows.append({"method": name, "n": len(x), **scores, "s/img": round(seconds, 3)})
        log.info("%s", rows[-1])
    return rows


def methods_markdown(rows: list[dict], title: str, note: str = "") -> str:
    """:func:`compare_methods` rows as a Markdown section (a model card's results table)."""
    metrics = [k for k in rows[0] if k not in ("method", "n", "s/img")]
    lines = [f"## {title}\n\n", f"{note}\n\n" if note else "",
             f"| method | n | {' | '.join(metrics)} | s/img |\n", f"|{'---|' * (len(metrics) + 3)}\n"]
    for row in rows:
        values = " | ".join(format(row[m], TABLE_FORMATS.get(m, ".4f")) for m in metrics)
        lines.append(f"| {row['method']} | {row['n']} | {values} | {row['s/img']:.3f} |\n")
    return "".join(lines)


@dataclass
class _Extremes:
    """The best and worst case so far by one metric, with their images for the panels (distinct cases
    when there are two or more: ties keep the first as best and the last as worst)."""

    metric: str
    best: tuple | None = None
    worst: tuple | None = None

    def offer(self, value: float, case: str, images: tuple) -> None:
        sign = -1 if self.metric in LOWER_IS_BETTER else 1
        if self.best is None or sign * value > sign * self.best[0]:
            self.best = (value, case, images)
        if self.worst is None or sign * value <= sign * self.worst[0]:
            self.worst = (value, case, images)

    def panels(self) -> list[tuple[str, tuple]]:
        """``[(label, (value, case, images))]``: worst and best, or the only case."""
        if self.best[1] == self.worst[1]:
            return [("only", self.best)]
        return [("worst", self.worst), ("best", self.best)]


def evaluate(
    pipeline: str | Path | Pipeline,
    data: str | EvaluationData,
    *,
    baseline: str | Pipeline | None = None,
    tracking_uri: str | None = None,
    experiment: str = "medidiff-evaluation",
    cases: int | None = None,
    track: bool = True,
    output: str | Path | None = None,
) -> EvaluationResult:
    """Evaluate ``pipeline`` on ``data`` (a spec or :class:`EvaluationData`) and log one MLflow run.

    ``baseline`` is another pipeline (file, name or object), a named baseline (``"identity"``: the input
    image itself; ``"bicubic"``: the input resampled to the reference grid; ``"zero-filled"``: MR's k-space
    interpolation onto it) or ``"default"`` (the task's own). ``track=False`` computes everything without
    MLflow. The results (per-case table, summary, panels) are also saved in ``output`` (default when
    tracking: ``evaluations/<name>-<time>/``), so they survive a tracking server that fails mid-run
    (``result.tracking_error`` says why).
    The tracking server is checked before any work; models are resolved once, up front.
    """
    from medidiff import tracking

    start = time.perf_counter()
    if cases is not None and cases < 1:
        raise InputError(f"cases must be a positive number, not {cases}")
    if track:
        tracking.check_reachable(tracking_uri)
    pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.from_yaml(pipeline)
    data = data if isinstance(data, EvaluationData) else load_data(data)
    baseline_name, baseline_fn = load_baseline(baseline, task_for(pipeline.task))
    models = model_provenance(pipeline)
    if isinstance(baseline_fn, Pipeline):
        baseline_models = model_provenance(baseline_fn, "baseline.")
        models = ModelProvenance(models.params | baseline_models.params, models.registered + baseline_models.registered)
    result = EvaluationResult(pipeline.name, data.name, {}, baseline=baseline_name)
    extremes: _Extremes | None = None
    for item in data.cases(cases):
        source = item["source"]
        if pipeline.selection.reason_to_skip(source):
            result.skipped += 1
            continue
        names = metric_names(pipeline, source.modality)
        extremes = extremes or _Extremes(names[0])
        try:
            case_start = time.perf_counter()
            baseline_item = dict(item) | {"image": item["original"].clone()}
            output_image = pipeline(item)["image"]
            seconds = time.perf_counter() - case_start
            row = {"case": source.key} | compute_metrics(names, output_image, item["reference"], item["original"])
            if baseline_fn is not None:
                base = compute_metrics(names, baseline_fn(baseline_item)["image"], item["reference"], item["original"])
                row |= {f"baseline_{k}": v for k, v in base.items()}
        except MedidiffError as exc:
            log.warning("case %s failed: %s", source.key, exc)
            result.failed.append({"case": source.key, "error": type(exc).__name__})
            continue
        row["seconds"] = round(seconds, 3)
        result.cases.append(row)
        extremes.offer(row[names[0]], source.key, (item["original"], output_image, item["reference"]))
    if not result.cases:
        raise InputError(f"no case of {data.name} could be evaluated "
                         f"({len(result.failed)} failed, {result.skipped} skipped by the pipeline's selection)")
    _aggregate(result)
    result.seconds = time.perf_counter() - start
    record = _record(result, pipeline, data, baseline_fn, models)
    if output is not None or track:
        result.local_copy = save_local(record, extremes, output or default_output(pipeline, data))
    if track:
        _log_run(result, record, data, models, tracking_uri, experiment)
    return result


def _aggregate(result: EvaluationResult) -> None:
    metric_keys = [k for k in result.cases[0] if k not in ("case", "seconds") and not k.startswith("baseline_")]
    for name in dict.fromkeys(metric_keys):
        rows = [r for r in result.cases if name in r]
        result.metrics[name] = bootstrap_ci([r[name] for r in rows])
        if result.baseline:
            base = [r[f"baseline_{name}"] for r in rows]
            result.baseline_metrics[name] = bootstrap_ci(base)
            result.comparison[name] = paired_test([r[name] for r in rows], base)


def _interval_metrics(prefix: str, intervals: dict[str, Interval]) -> dict[str, float]:
    out = {}
    for name, interval in intervals.items():
        out |= {f"{prefix}{name}_mean": interval.estimate, f"{prefix}{name}_ci95_low": interval.low,
                f"{prefix}{name}_ci95_high": interval.high}
    return out


@dataclass
class _Record:
    """Everything one evaluation logs: params, metrics, tags, the per-case and failed tables."""

    run_name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    cases: list[dict]
    failed: list[dict]


def _record(result: EvaluationResult, pipeline: Pipeline, data: EvaluationData, baseline_fn,
            models: ModelProvenance) -> _Record:
    from medidiff import tracking

    params = {
        "pipeline.file": Path(pipeline.source).name, "pipeline.name": pipeline.name,
        "pipeline.digest": pipeline.digest, "data.name": data.name, "data.digest": data.digest,
        "data.spec": data.source.removeprefix("medidiff://"), "baseline": result.baseline or "none",
        "bootstrap.resamples": DEFAULT_RESAMPLES, "bootstrap.seed": DEFAULT_SEED,
        "normalisation": "reference min/max -> [0, 1]", "ci.method": BOOTSTRAP, "ci.min_cases": MIN_CASES,
    } | tracking.provenance() | stage_parameters(pipeline)
    if isinstance(baseline_fn, Pipeline):
        params |= {"baseline.file": Path(baseline_fn.source).name, "baseline.digest": baseline_fn.digest}
        params |= stage_parameters(baseline_fn, "baseline.")
    metrics = _interval_metrics("", result.metrics) | _interval_metrics("baseline_", result.baseline_metrics)
    for name, test in result.comparison.items():
        metrics |= _interval_metrics("diff_", {name: test.difference}) | {f"diff_{name}_wilcoxon_p": test.p_value}
    metrics |= {"cases": len(result.cases), "cases_failed": len(result.failed), "cases_skipped": result.skipped,
                "seconds_total": result.seconds}
    tags = {"medidiff.task": "evaluation", "medidiff.pipeline": pipeline.name}
    return _Record(f"{pipeline.name} on {data.name}", tracking.flatten(params | models.params), metrics, tags,
                   result.cases, result.failed)


def default_output(pipeline: Pipeline, data: EvaluationData) -> Path:
    """``evaluations/<pipeline>-<data>-<UTC time>/`` in the working directory."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{pipeline.name}-{data.name}")
    return Path("evaluations") / f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def _write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, columns)
        writer.writeheader()
        writer.writerows(rows)


def save_local(record: _Record, extremes: _Extremes, folder: str | Path) -> Path:
    """Write the results whole or not at all: ``per_case_metrics.csv``, ``failed_cases.csv`` (if any),
    ``summary.json`` (params, metrics, tags) and ``panels/<label>_<metric>.png``; returns the folder."""
    from medidiff.display import evaluation_figure
    from medidiff.io.atomic import atomic_dir

    folder = Path(folder)
    if folder.exists():
        raise OutputError(f"{folder} already exists; choose another --output folder")
    try:
        with atomic_dir(folder) as partial:
            _write_csv(record.cases, partial / "per_case_metrics.csv")
            if record.failed:
                _write_csv(record.failed, partial / "failed_cases.csv")
            summary = {"run_name": record.run_name, "params": record.params, "metrics": record.metrics,
                       "tags": record.tags}
            (partial / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
            (partial / "panels").mkdir()
            for label, (value, case, images) in extremes.panels():
                figure = evaluation_figure(*images)
                figure.suptitle(f"{label} case by {extremes.metric}: {case} ({extremes.metric} = {value:.4g})")
                figure.savefig(partial / "panels" / f"{label}_{extremes.metric}.png", dpi=80)
    except OSError as exc:
        raise OutputError(f"cannot write the evaluation results to {folder}: {exc.strerror or exc}") from None
    return folder


def _log_run(result: EvaluationResult, record: _Record, data: EvaluationData, models: ModelProvenance,
             tracking_uri: str | None, experiment: str) -> None:
    """One MLflow run from ``record`` and the local copy. The run is tagged ``medidiff.complete=false``
    until everything is logged; a failure tags the reason (``medidiff.incomplete_reason``) where the
    server still answers, marks the run FAILED and lands in ``result.tracking_error``."""
    import mlflow

    from medidiff import tracking

    with tracking.quick_failure():
        try:
            tracking.setup(tracking_uri, experiment)
            run = mlflow.start_run(run_name=record.run_name)
            result.run_id = run.info.run_id
            mlflow.set_tags(record.tags | {"medidiff.complete": "false"})
            mlflow.log_params(record.params)
            mlflow.log_input(data.mlflow_dataset(), context="evaluation", tags={"cases": str(len(result.cases))})
            _link_registered(models.registered, result.run_id, record.run_name)
            tracking.log_metrics(record.metrics)
            tracking.log_table(record.cases, "per_case_metrics.json")
            if record.failed:
                tracking.log_table(record.failed, "failed_cases.json")
            if result.local_copy:
                mlflow.log_artifacts(str(result.local_copy))
            mlflow.set_tag("medidiff.complete", "true")
            mlflow.end_run()
        except Exception as exc:  # MlflowException, requests and OS errors: all mean "not stored"
            result.tracking_error = " ".join(str(exc).split())[:300] or type(exc).__name__
            _mark_incomplete(result.tracking_error)


def _link_registered(versions: list, run_id: str, run_name: str) -> None:
    """Tag each registered model version used with ``medidiff.evaluation.<run id>`` = the run's name, so the
    registry lists the evaluations of a version (the run's params name the version)."""
    from mlflow import MlflowClient

    from medidiff import tracking

    uri = tracking.resolve_tracking_uri()  # the registry the stages resolved models:/ from
    registry = MlflowClient(uri, uri)
    for version in versions:
        registry.set_model_version_tag(version.name, version.version, f"medidiff.evaluation.{run_id}", run_name)


def _mark_incomplete(reason: str) -> None:
    """Tag the active run incomplete with ``reason`` and end it FAILED, as far as the server still answers."""
    import mlflow

    if mlflow.active_run() is None:
        return
    try:
        mlflow.set_tags({"medidiff.complete": "false", "medidiff.incomplete_reason": reason})
    except Exception:  # the server is gone: the run keeps medidiff.complete=false
        log.warning("could not tag the MLflow run as incomplete: the tracking server does not answer")
    try:
        mlflow.end_run("FAILED")  # leaves no active run even when the server does not answer
    except Exception:
        log.warning("could not mark the MLflow run as failed: the tracking server does not answer")
