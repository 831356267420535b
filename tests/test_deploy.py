"""deploy/: the container image is built from the tested wheel's inputs and runs as a non-root user; the
systemd unit, compose file and settings file make a valid `medidiff listen` command; the installed wheel
runs `medidiff batch` on a Dask worker and `medidiff status` from another folder."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from medidiff import settings
from medidiff.cli import _parser
from medidiff.dicomnet.listener import check_ae_title
from medidiff.dicomnet.outbox import parse_destination
from medidiff.pipeline import resolve_pipeline_path
from tests.studies import ct_series_copies
from tests.test_packaging import BUILD_INPUTS, ROOT, fresh_venv, wheel  # noqa: F401  (fixtures)

DEPLOY = ROOT / "deploy"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def test_image_is_built_from_the_wheel_inputs_and_runs_as_non_root():
    steps = _instructions((DEPLOY / "Containerfile").read_text())
    stages = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(stages) == 2
    build, final = steps[:stages[1]], steps[stages[1]:]
    copied = {src for op, arg in build if op == "COPY" for src in arg.split()[:-1]}
    assert copied == set(BUILD_INPUTS)  # the same files as the wheel that tests/test_packaging.py installs
    assert all((ROOT / name).exists() for name in copied)
    assert not [arg for op, arg in final if op == "COPY" and "--from=wheel" not in arg]  # only the wheel
    (user,) = [arg for op, arg in final if op == "USER"]
    assert user == "medidiff" and "useradd --system --uid 10001 --home-dir /var/lib/medidiff --create-home medidiff" \
        in " ".join(arg for op, arg in final if op == "RUN")
    makefile_torch = re.search(r"torch==[\d.]+", (ROOT / "Makefile").read_text())[0]
    assert makefile_torch in " ".join(arg for op, arg in final if op == "RUN")
    assert dict(steps)["ENTRYPOINT"] == '["medidiff"]'


def _listen_args(argv: list[str], environ: dict):
    parser = _parser()
    settings.apply(parser.commands["listen"], "listen", None, environ)
    args = parser.parse_args(argv)
    resolve_pipeline_path(args.pipeline)
    check_ae_title(args.ae_title, "ae_title")
    parse_destination(args.destination, args.ae_title)
    return args


def test_unit_and_compose_make_a_valid_listen_command():
    config = str(DEPLOY / "medidiff.yaml")
    unit = (DEPLOY / "medidiff-listen.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.+)$", unit, re.M)
    assert re.search(r"^Environment=MEDIDIFF_CONFIG=/etc/medidiff/medidiff.yaml$", unit, re.M)
    args = _listen_args(shlex.split(exec_start)[1:], {"MEDIDIFF_CONFIG": config})
    assert (args.port, args.pipeline, args.output) == (11112, "bone-suppression", "/var/lib/medidiff/out")
    assert (args.workers, args.max_attempts, args.retry_delay) == (0, 3, 30.0)
    assert re.search(r"^User=medidiff$", unit, re.M) and "ReadWritePaths=/var/lib/medidiff" in unit

    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["medidiff"]
    assert service["environment"]["MEDIDIFF_CONFIG"] == "/etc/medidiff/medidiff.yaml"
    assert "./medidiff.yaml:/etc/medidiff/medidiff.yaml:ro" in service["volumes"]
    image_env = dict(re.findall(r"(MEDIDIFF_\w+)=(\S+)", (DEPLOY / "Containerfile").read_text()))
    args = _listen_args(service["command"], image_env | {"MEDIDIFF_CONFIG": config})
    assert (args.port, args.output) == (11112, "/var/lib/medidiff/out")
    assert f"{args.port}:{args.port}" in service["ports"]

    parser = _parser()
    settings.apply(parser.commands["batch"], "batch", config, {})
    assert parser.parse_args(["batch", "/data/in"]).workers == 2


@pytest.mark.slow
def test_installed_wheel_runs_batch_on_a_dask_worker_and_reports_status(fresh_venv, tmp_path):  # noqa: F811
    ct_series_copies(tmp_path / "in", 2)
    medidiff = fresh_venv / "bin" / "medidiff"
    batch = subprocess.run([medidiff, "batch", "normalize-preview", "in", "-o", "out", "--workers", "1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert batch.returncode == 0 and "2 done now" in batch.stdout, batch.stdout + batch.stderr
    status = subprocess.run([medidiff, "status", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and yaml.safe_load(status.stdout)["queue"]["processed"] == 2
