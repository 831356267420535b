"""Options from a settings file and MEDIDIFF_<COMMAND>_<OPTION> variables: flags beat the environment, which
beats the file; a listener configured that way serves as configured; bad settings are one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess

from medidiff import settings
from medidiff.cli import _parser
from tests.cli_runner import CLI, assert_user_error, medidiff
from tests.orthanc import LISTENER_AE, PUSHER_AE, echo, events, free_port, wait_for


def _parse(argv: list[str], config=None, environ=None):
    parser = _parser()
    settings.apply(parser.commands[argv[0]], argv[0], config and str(config), environ or {})
    return parser.parse_args(argv)


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    config = tmp_path / "medidiff.yaml"
    config.write_text("batch:\n  pipeline: normalize-preview\n  input: /data/in\n  output: /data/out\n"
                      "  workers: 4\n  max-attempts: 5\n  retry_quarantined: true\n")
    args = _parse(["batch"], config)
    assert (args.pipeline, args.input, args.output, args.workers, args.max_attempts) == \
        ("normalize-preview", "/data/in", "/data/out", 4, 5)
    assert args.retry_quarantined and args.retry_delay == 5.0
    args = _parse(["batch"], config, {"MEDIDIFF_BATCH_WORKERS": "2", "MEDIDIFF_BATCH_RETRY_QUARANTINED": "false"})
    assert (args.workers, args.retry_quarantined) == (2, False)
    args = _parse(["batch", "bone-suppression", "/x", "--workers", "1"], config, {"MEDIDIFF_BATCH_WORKERS": "2"})
    assert (args.pipeline, args.input, args.workers, args.output) == ("bone-suppression", "/x", 1, "/data/out")
    args = _parse(["listen", "p", "-o", "o"], None, {"MEDIDIFF_LISTEN_ALLOW": "PACS, CT1", "MEDIDIFF_LISTEN_PORT": "104",
                                                   "MEDIDIFF_LISTEN_AE_TITLE": "MEDIDIFF", "MEDIDIFF_CONFIG": str(config)})
    assert (args.allow, args.port, args.ae_title) == (["PACS", "CT1"], 104, "MEDIDIFF")


def test_listener_configured_by_file_and_environment(tmp_path):
    port = free_port()
    config = tmp_path / "medidiff.yaml"
    config.write_text(f"listen:\n  pipeline: normalize-preview\n  ae_title: {LISTENER_AE}\n  output: {tmp_path / 'out'}\n"
                      f"  allow: [{PUSHER_AE}]\n  idle_seconds: 1\n")
    env = os.environ | {"MEDIDIFF_CONFIG": str(config), "MEDIDIFF_LISTEN_PORT": str(port),
                        "MEDIDIFF_LISTEN_BIND": "127.0.0.1"}
    log = tmp_path / "listener.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([*CLI, "listen"], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: echo(port, PUSHER_AE) or process.poll() is not None, "listener start", log=log)
        assert process.poll() is None, log.read_text()
        assert not echo(port, "INTRUDER")  # the allow list came from the file
        (listening,) = events(log, "listening")
        assert (listening["port"], listening["allowed"], listening["idle_seconds"]) == (port, [PUSHER_AE], 1.0)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()


def test_bad_settings_are_one_line_errors(tmp_path):
    config = tmp_path / "medidiff.yaml"
    config.write_text("batch:\n  wokers: 2\n")
    assert_user_error(medidiff("--config", config, "batch"), 2, "has no option 'wokers'", str(config))
    config.write_text("batch: [1, 2]\n")
    assert_user_error(medidiff("--config", config, "batch"), 2, "must map each command to its options")
    assert_user_error(medidiff("--config", tmp_path / "missing.yaml", "status"), 2, "cannot read the settings file")
    bad = os.environ | {"MEDIDIFF_BATCH_WORKERS": "many"}
    assert_user_error(medidiff("batch", "normalize-preview", tmp_path, "-o", tmp_path / "o", env=bad), 2,
                      "$MEDIDIFF_BATCH_WORKERS: 'many' is not valid")
