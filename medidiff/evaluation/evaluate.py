"""Clinical evaluation of a pipeline against reference images, tracked as one MLflow run.

Per case: run the pipeline (and the baseline), map output, baseline and reference to [0, 1] with the
reference's own min/max window, compute the task's metrics (``evaluation.tasks``: the task the
pipeline's stage declares; the output may differ in shape from the input, not from the reference). Then aggregate (mean with a bootstrap 95 %
CI), compare with the baseline (paired bootstrap CI of the difference + Wilcoxon signed-rank p-value),
and log params, metrics, the per-case table, worst/best panels and the dataset lineage to MLflow.
Case ids are hashed series keys (phantom seeds for synthetic data): no identifier reaches MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medidiff.errors import InputError, MedidiffError
from medidiff.evaluation.datasets import EvaluationData, load_data
from medidiff.evaluation.statistics import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Interval,
    PairedTest,
    bootstrap_ci,
    paired_test,
)
from medidiff.evaluation.tasks import BASELINES, Task, task_for
from medidiff.metrics import LOWER_IS_BETTER
from medidiff.pipeline import Pipeline

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
                line += f" {str(self.baseline_metrics[name]):34s} {str(test.difference):34s} {test.p_value:10.3g}"
            lines.append(line)
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


def model_card_digests(pipeline: Pipeline) -> dict[str, str]:
    """sha256 of each stage's MODEL_CARD.md (its model folder: a model parameter, else models/<stage>/)."""
    from medidiff.model_registry import resolve_model_dir

    digests = {}
    for index, call in enumerate(pipeline.stages):
        spec = next((call.params[k] for k in MODEL_PARAM_NAMES if k in call.params), "default")
        try:
            card = resolve_model_dir(str(spec), default_name=call.name) / "MODEL_CARD.md"
        except MedidiffError:
            continue
        if card.is_file():
            digests[f"stage.{index}.{call.name}.model_card_sha256"] = hashlib.sha256(card.read_bytes()).hexdigest()
    return digests


def load_baseline(
    baseline: str | Pipeline | None, task: Task | None = None
) -> tuple[str | None, Callable[[dict], dict] | None]:
    """(name, item -> item) for a baseline: a name in ``evaluation.tasks.BASELINES`` (``identity``,
    ``bicubic``), ``"default"`` (the task's own), a pipeline (file, name or object), or None."""
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
    """The best and worst case so far by one metric, with their images for the panels."""

    metric: str
    best: tuple | None = None
    worst: tuple | None = None

    def offer(self, value: float, case: str, images: tuple) -> None:
        sign = -1 if self.metric in LOWER_IS_BETTER else 1
        if self.best is None or sign * value > sign * self.best[0]:
            self.best = (value, case, images)
        if self.worst is None or sign * value < sign * self.worst[0]:
            self.worst = (value, case, images)


def evaluate(
    pipeline: str | Path | Pipeline,
    data: str | EvaluationData,
    *,
    baseline: str | Pipeline | None = None,
    tracking_uri: str | None = None,
    experiment: str = "medidiff-evaluation",
    cases: int | None = None,
    track: bool = True,
) -> EvaluationResult:
    """Evaluate ``pipeline`` on ``data`` (a spec or :class:`EvaluationData`) and log one MLflow run.

    ``baseline`` is another pipeline (file, name or object), a named baseline (``"identity"``: the input
    image itself; ``"bicubic"``: the input resampled to the reference grid) or ``"default"`` (the
    task's own). ``track=False`` computes everything without MLflow.
    """
    start = time.perf_counter()
    pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.from_yaml(pipeline)
    data = data if isinstance(data, EvaluationData) else load_data(data)
    baseline_name, baseline_fn = load_baseline(baseline, task_for(pipeline.task))
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
            output = pipeline(item)["image"]
            seconds = time.perf_counter() - case_start
            row = {"case": source.key} | compute_metrics(names, output, item["reference"], item["original"])
            if baseline_fn is not None:
                base = compute_metrics(names, baseline_fn(baseline_item)["image"], item["reference"], item["original"])
                row |= {f"baseline_{k}": v for k, v in base.items()}
        except MedidiffError as exc:
            log.warning("case %s failed: %s", source.key, exc)
            result.failed.append({"case": source.key, "error": type(exc).__name__})
            continue
        row["seconds"] = round(seconds, 3)
        result.cases.append(row)
        extremes.offer(row[names[0]], source.key, (item["original"], output, item["reference"]))
    if not result.cases:
        raise InputError(f"no case of {data.name} could be evaluated "
                         f"({len(result.failed)} failed, {result.skipped} skipped by the pipeline's selection)")
    _aggregate(result)
    result.seconds = time.perf_counter() - start
    if track:
        result.run_id = _log_run(result, pipeline, data, extremes, tracking_uri, experiment)
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


def _log_run(result: EvaluationResult, pipeline: Pipeline, data: EvaluationData, extremes: _Extremes,
             tracking_uri: str | None, experiment: str) -> str:
    import mlflow

    from medidiff import tracking
    from medidiff.display import before_after_figure

    tracking.setup(tracking_uri, experiment)
    with mlflow.start_run(run_name=f"{pipeline.name} on {data.name}") as run:
        tracking.log_params({
            "pipeline.file": Path(pipeline.source).name, "pipeline.name": pipeline.name,
            "pipeline.digest": pipeline.digest, "data.name": data.name, "data.digest": data.digest,
            "baseline": result.baseline or "none", "bootstrap.resamples": DEFAULT_RESAMPLES,
            "bootstrap.seed": DEFAULT_SEED, "normalisation": "reference min/max -> [0, 1]",
        } | tracking.provenance() | model_card_digests(pipeline))
        tracking.log_params({f"stage.{i}.{call.name}": call.params or "{}" for i, call in enumerate(pipeline.stages)})
        mlflow.set_tags({"medidiff.task": "evaluation", "medidiff.pipeline": pipeline.name})
        mlflow.log_input(data.mlflow_dataset(), context="evaluation")
        metrics = _interval_metrics("", result.metrics) | _interval_metrics("baseline_", result.baseline_metrics)
        for name, test in result.comparison.items():
            metrics |= _interval_metrics("diff_", {name: test.difference}) | {f"diff_{name}_wilcoxon_p": test.p_value}
        metrics |= {"cases": len(result.cases), "cases_failed": len(result.failed), "cases_skipped": result.skipped,
                    "seconds_total": result.seconds}
        tracking.log_metrics(metrics)
        tracking.log_table(result.cases, "per_case_metrics.json")
        if result.failed:
            tracking.log_table(result.failed, "failed_cases.json")
        for label, (value, case, (before, after, reference)) in (("worst", extremes.worst), ("best", extremes.best)):
            figure = before_after_figure(before, after, extra={"reference": reference})
            figure.suptitle(f"{label} case by {extremes.metric}: {case} ({extremes.metric} = {value:.4g})")
            tracking.log_figure(figure, f"panels/{label}_{extremes.metric}.png")
    return run.info.run_id
