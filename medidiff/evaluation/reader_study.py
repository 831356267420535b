"""Blinded reader studies: export randomised A/B (/reference) image sets, import readers' scores, analyse.

Export writes::

    <out>/reader_package/      give this to the readers
        images/<random id>.png    greyscale PNGs, no metadata, names reveal nothing
        scores_template.csv       one row per trial: trial, image_1, image_2[, reference], preferred, comment
        README.txt                instructions
    <out>/key.json             the hidden key (which image is which method): keep it away from readers

Readers copy the template, fill ``preferred`` with 1, 2 or "equal" (and their name in ``reader``);
:func:`analyse` decodes the choices with the key and reports preference rates with Wilson 95 % CIs
(judgments treated as independent), Cohen's kappa between every pair of readers, a sign test per
reader and a combined A-versus-B estimate with cases as the unit (each case's score averaged over
readers: +1 A preferred, -1 B, 0 equal; bootstrap CI over cases, Wilcoxon signed-rank p), so that
several readers judging the same case are not counted as independent evidence. A judgment given twice
(same reader, same trial) is refused; readers who left trials blank are reported. The MLflow run
records the sha256 of the key and of every score file it read (lineage).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medidiff.errors import InputError
from medidiff.evaluation.statistics import MIN_CASES, Interval, PairedTest, paired_test, wilson_interval
from medidiff.io.writers import write_png

PACKAGE = "reader_package"
KEY_FILE = "key.json"
TEMPLATE = "scores_template.csv"
EQUAL = "equal"
SCORE = {"A": 1.0, "B": -1.0, EQUAL: 0.0}  # a judgment as a score for A
WILSON_NOTE = "Wilson score over all judgments (judgments independent)"
COMBINED = "percentile bootstrap over cases (readers averaged per case; cases independent)"
CHOICES = ("1", "2", EQUAL)
COLUMNS = ("reader", "trial", "image_1", "image_2", "reference", "preferred", "comment")
README = """Blinded reader study ({trials} trials).

For each row of scores_template.csv, open images/<image_1>.png and images/<image_2>.png
(and images/<reference>.png where given, the reference standard) and write in 'preferred'
1 or 2 for the image you prefer for diagnosis, or 'equal'. Put your name or initials in 'reader'.
Save your copy as scores_<your initials>.csv and return it. Do not rename the images.
"""


@dataclass
class ReaderKey:
    """The hidden key: methods, and for each trial the method shown as image 1 and image 2."""

    methods: dict[str, str]
    trials: dict[str, dict]
    seed: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"methods": self.methods, "trials": self.trials, "seed": self.seed}, indent=2),
                        encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ReaderKey:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(raw["methods"], raw["trials"], int(raw["seed"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a reader-study key file ({exc})") from None


@dataclass
class ReaderStudyResult:
    """Preference rates (Wilson 95 % CI) by method label and Cohen's kappa per reader pair."""

    preferences: dict[str, Interval]
    kappa: dict[str, float]
    readers: list[str]
    judgments: int
    run_id: str | None = None
    methods: dict[str, str] = field(default_factory=dict)
    per_reader: dict[str, dict] = field(default_factory=dict)  # {reader: {A, B, equal, net, sign_p}}
    combined: PairedTest | None = None  # per-case net preference for A, readers averaged
    incomplete: dict[str, int] = field(default_factory=dict)  # {reader: trials left blank}

    def table(self) -> str:
        lines = [f"{self.judgments} judgments by {len(self.readers)} reader(s)"]
        for label, interval in self.preferences.items():
            lines.append(f"prefer {label:5s} {self.methods.get(label, ''):28s} {interval}")
        lines.append(f"  (95 % CIs: {next(iter(self.preferences.values())).method})")
        lines += [f"kappa {pair}: {value:.3f}" for pair, value in self.kappa.items()]
        for reader, row in self.per_reader.items():
            lines.append(f"reader {reader}: A {row['A']}, B {row['B']}, equal {row['equal']}; "
                         f"net preference for A {row['net']:+.3f}, sign test p {row['sign_p']:.3g}")
        if self.combined:
            lines.append(f"combined net preference for A: {self.combined.difference}, Wilcoxon p "
                         f"{self.combined.p_text} over {self.combined.n} cases (95 % CI: {COMBINED}; "
                         f"n/a below {MIN_CASES} cases)")
        lines += [f"reader {reader}: incomplete, {missing} trial(s) not judged" for reader, missing
                  in self.incomplete.items()]
        if self.run_id:
            lines.append(f"MLflow run {self.run_id}")
        return "\n".join(lines)


def export(
    pipeline, data, out_dir: str | Path, *, baseline: str = "default", cases: int | None = None,
    include_reference: bool = True, seed: int | None = None,
) -> ReaderKey:
    """Write a blinded, randomised A/B (/reference) package for ``pipeline`` (A) vs ``baseline`` (B: a
    pipeline, ``identity``, ``bicubic`` or ``default``, the task's own)."""
    from medidiff.evaluation.datasets import EvaluationData, load_data
    from medidiff.evaluation.evaluate import DEFAULT_BASELINE, load_baseline
    from medidiff.evaluation.tasks import task_for
    from medidiff.pipeline import Pipeline

    pipeline = pipeline if isinstance(pipeline, Pipeline) else Pipeline.from_yaml(pipeline)
    data = data if isinstance(data, EvaluationData) else load_data(data, reference=include_reference)
    baseline_name, baseline_fn = load_baseline(baseline or DEFAULT_BASELINE, task_for(pipeline.task))
    out = Path(out_dir)
    images = out / PACKAGE / "images"
    if (out / KEY_FILE).exists():
        raise InputError(f"{out} already holds a reader study ({KEY_FILE}); choose a new folder")
    images.mkdir(parents=True, exist_ok=True)
    seed = secrets.randbits(32) if seed is None else seed
    rng = np.random.default_rng(seed)
    used: set[str] = set()

    def new_id() -> str:
        while (name := f"{rng.integers(16**8):08x}") in used:
            pass
        used.add(name)
        return name

    rows, trials = [], {}
    for item in data.cases(cases):
        shown = {"B": baseline_fn(dict(item) | {"image": item["original"].clone()})["image"],
                 "A": pipeline(item)["image"]}
        order = ["A", "B"] if rng.random() < 0.5 else ["B", "A"]
        trial = new_id()
        row = {"reader": "", "trial": trial, "reference": "", "preferred": "", "comment": ""}
        for position, label in enumerate(order, start=1):
            row[f"image_{position}"] = new_id()
            write_png(shown[label], images / f"{row[f'image_{position}']}.png")
        if include_reference and "reference" in item:
            row["reference"] = new_id()
            write_png(item["reference"], images / f"{row['reference']}.png")
        trials[trial] = {"case": item["source"].key, "image_1": order[0], "image_2": order[1]}
        rows.append(row)
    if not rows:
        raise InputError(f"{data.name}: no cases to export")
    rng.shuffle(rows)
    with open(out / PACKAGE / TEMPLATE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / PACKAGE / "README.txt").write_text(README.format(trials=len(rows)), encoding="utf-8")
    key = ReaderKey({"A": f"{pipeline.name} ({pipeline.digest})", "B": baseline_name}, trials, seed)
    key.save(out / KEY_FILE)
    return key


def read_scores(paths: list[str | Path]) -> list[dict]:
    """Rows ``{reader, trial, preferred}`` from filled-in score CSVs (reader defaults to the file name).

    A second judgment of the same trial by the same reader is an InputError naming both places."""
    judgments, seen = [], {}
    for path in map(Path, paths):
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror})") from None
        for line, row in enumerate(rows, start=2):
            choice = (row.get("preferred") or "").strip().lower()
            if not choice:
                continue
            if choice not in CHOICES:
                raise InputError(f"{path} line {line}: 'preferred' must be 1, 2 or equal, not {choice!r}")
            reader = (row.get("reader") or "").strip() or path.stem
            trial = (row.get("trial") or "").strip()
            if (reader, trial) in seen:
                raise InputError(f"{path} line {line}: reader {reader!r} already judged trial {trial!r} "
                                 f"({seen[reader, trial]}); keep one judgment per trial")
            seen[reader, trial] = f"{path.name} line {line}"
            judgments.append({"reader": reader, "trial": trial, "preferred": choice})
    return judgments


def decode(judgments: list[dict], key: ReaderKey) -> list[dict]:
    """Replace image positions by method labels (A/B) or ``equal``, using the key."""
    decoded = []
    for judgment in judgments:
        if judgment["trial"] not in key.trials:
            raise InputError(f"trial {judgment['trial']!r} (reader {judgment['reader']}) is not in the key")
        choice = judgment["preferred"]
        method = EQUAL if choice == EQUAL else key.trials[judgment["trial"]][f"image_{choice}"]
        decoded.append(judgment | {"method": method})
    return decoded


def pairwise_kappa(decoded: list[dict]) -> dict[str, float]:
    """Cohen's kappa for every pair of readers over the trials both judged."""
    from sklearn.metrics import cohen_kappa_score

    by_reader: dict[str, dict[str, str]] = {}
    for row in decoded:
        by_reader.setdefault(row["reader"], {})[row["trial"]] = row["method"]
    kappas = {}
    for first, second in itertools.combinations(sorted(by_reader), 2):
        common = sorted(set(by_reader[first]) & set(by_reader[second]))
        if not common:
            continue
        a = [by_reader[first][t] for t in common]
        b = [by_reader[second][t] for t in common]
        # Identical one-category ratings leave kappa undefined (0/0); perfect agreement is 1.
        kappas[f"{first} vs {second}"] = 1.0 if a == b else float(cohen_kappa_score(a, b))
    return kappas


def analyse(
    key_path: str | Path, score_paths: list[str | Path], *, tracking_uri: str | None = None,
    experiment: str = "medidiff-reader-study", track: bool = True,
) -> ReaderStudyResult:
    """Decode the readers' scores, compute preference rates, kappas and the A-versus-B tests, and log them
    to one MLflow run (the tracking server is checked first)."""
    from medidiff import tracking

    if track:
        tracking.check_reachable(tracking_uri)
    key = ReaderKey.load(key_path)
    decoded = decode(read_scores(score_paths), key)
    if not decoded:
        raise InputError("the score files hold no filled-in 'preferred' column")
    n = len(decoded)
    preferences = {label: wilson_interval(sum(r["method"] == label for r in decoded), n)
                   for label in (*sorted(key.methods), EQUAL)}
    readers = sorted({r["reader"] for r in decoded})
    result = ReaderStudyResult(preferences, pairwise_kappa(decoded), readers, n, methods=key.methods,
                               per_reader={reader: reader_test([r for r in decoded if r["reader"] == reader])
                                           for reader in readers},
                               combined=combined_test(decoded))
    judged = {reader: sum(r["reader"] == reader for r in decoded) for reader in readers}
    result.incomplete = {reader: len(key.trials) - count for reader, count in judged.items() if count < len(key.trials)}
    if track:
        from medidiff.model_registry import file_sha256

        lineage = {"key.sha256": file_sha256(key_path)} | {f"scores.{i}.sha256": file_sha256(path)
                                                           for i, path in enumerate(score_paths)}
        result.run_id = _log_run(result, decoded, key, lineage, experiment, tracking_uri)
    return result


def reader_test(decoded: list[dict]) -> dict:
    """One reader's counts, net preference for A ((A - B) / judgments) and two-sided sign test p (ties out)."""
    from scipy.stats import binomtest

    counts = {label: sum(r["method"] == label for r in decoded) for label in ("A", "B", EQUAL)}
    decisive = counts["A"] + counts["B"]
    p_value = float(binomtest(counts["A"], decisive).pvalue) if decisive else 1.0
    return counts | {"net": (counts["A"] - counts["B"]) / len(decoded), "sign_p": p_value}


def combined_test(decoded: list[dict]) -> PairedTest:
    """Net preference for A with cases as the unit: each trial's mean score over its readers (+1 A, -1 B,
    0 equal), a bootstrap CI over trials and the Wilcoxon signed-rank p against no preference."""
    by_trial: dict[str, list[float]] = {}
    for row in decoded:
        by_trial.setdefault(row["trial"], []).append(SCORE[row["method"]])
    per_case = [float(np.mean(scores)) for scores in by_trial.values()]
    test = paired_test(per_case, [0.0] * len(per_case))
    return dataclasses.replace(test, difference=dataclasses.replace(test.difference, method=COMBINED))


def _log_run(result: ReaderStudyResult, decoded: list[dict], key: ReaderKey, lineage: dict[str, str],
             experiment: str, tracking_uri: str | None) -> str:
    import mlflow

    from medidiff import tracking

    tracking.setup(tracking_uri, experiment)
    with mlflow.start_run(run_name="reader study") as run:
        tracking.log_params({f"method.{k}": v for k, v in key.methods.items()}
                            | {"trials": len(key.trials), "readers": len(result.readers), "key.seed": key.seed,
                               "ci.preference": WILSON_NOTE, "ci.combined": COMBINED}
                            | lineage | tracking.provenance())
        mlflow.set_tags({"medidiff.task": "reader-study", "medidiff.reader_study_key": lineage["key.sha256"]})
        metrics = {"judgments": result.judgments, "readers_incomplete": len(result.incomplete)}
        for label, interval in result.preferences.items():
            metrics |= {f"prefer_{label}_rate": interval.estimate, f"prefer_{label}_ci95_low": interval.low,
                        f"prefer_{label}_ci95_high": interval.high}
        metrics |= {_metric_name(f"kappa {pair}"): value for pair, value in result.kappa.items()}
        if result.kappa:
            metrics["kappa_mean"] = float(np.mean(list(result.kappa.values())))
        for reader, row in result.per_reader.items():
            metrics |= {_metric_name(f"reader {reader} net_A"): row["net"],
                        _metric_name(f"reader {reader} sign_p"): row["sign_p"]}
        combined = result.combined
        metrics |= {"net_A_mean": combined.difference.estimate, "net_A_ci95_low": combined.difference.low,
                    "net_A_ci95_high": combined.difference.high, "net_A_wilcoxon_p": combined.p_value}
        tracking.log_metrics(metrics)
        tracking.log_table(decoded, "judgments.json")
        if result.incomplete:
            tracking.log_table([{"reader": r, "trials_not_judged": m} for r, m in result.incomplete.items()],
                               "incomplete_readers.json")
    return run.info.run_id


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)
