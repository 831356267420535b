"""Command options from a settings file and environment variables: flags beat the environment, which beats
the file, which beats the built-in defaults.

The file (``medidiff --config FILE COMMAND`` or ``$MEDIDIFF_CONFIG``) is YAML, one mapping per command whose
keys are the command's option names (``ae_title`` or ``ae-title``; positional arguments by name)::

    listen:
      pipeline: normalize-preview
      ae_title: MEDIDIFF
      port: 11112
      allow: [PACS, CT_SCANNER]

``MEDIDIFF_<COMMAND>_<OPTION>`` sets one option from the environment (``MEDIDIFF_LISTEN_PORT=11112``;
repeatable options comma-separated, switches as true/false), as systemd's ``EnvironmentFile`` or a
container's environment would. Values are checked as the flags are; errors name the file or variable.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from medidiff.errors import InputError

CONFIG_ENV = "MEDIDIFF_CONFIG"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def load_file(path: str | Path) -> dict:
    """The settings file as {command: {option: value}}."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise InputError(f"cannot read the settings file {path} ({exc.strerror}); fix --config or ${CONFIG_ENV}") \
            from None
    except yaml.YAMLError as exc:
        raise InputError(f"settings file {path} is not valid YAML ({exc}); fix it") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"settings file {path} must map each command to its options (e.g. 'listen: {{port: 11112}}')")
    return data


def apply(parser: argparse.ArgumentParser, command: str, config: str | None, environ=os.environ) -> None:
    """Make the file's and the environment's values for ``command`` the defaults of its ``parser``."""
    config = config or environ.get(CONFIG_ENV)
    from_file = load_file(config).get(command, {}) if config else {}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}
    file_values = {}
    for key, value in from_file.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise InputError(f"settings file {config}: '{command}' has no option {key!r}; known: "
                             f"{', '.join(sorted(actions))}")
        file_values[dest] = value
    prefix = f"MEDIDIFF_{command.upper().replace('-', '_')}_"
    for dest, action in actions.items():
        variable = prefix + dest.upper()
        if variable in environ:
            value, where = _from_text(environ[variable], action, variable), f"${variable}"
        elif dest in file_values:
            value, where = file_values[dest], f"settings file {config} ({command}.{dest})"
        else:
            continue
        action.default = _checked(value, action, where)
        action.required = False
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"  # a positional argument given by the settings


def _from_text(text: str, action: argparse.Action, where: str):
    if isinstance(action, argparse._AppendAction):
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(action, argparse._StoreTrueAction):
        if text.lower() not in TRUE | FALSE:
            raise InputError(f"{where}={text!r}: give true or false")
        return text.lower() in TRUE
    return text


def _checked(value, action: argparse.Action, where: str):
    """``value`` converted and checked as argparse would check the flag."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise InputError(f"{where}: give true or false, not {value!r}")
        return value
    values = value if isinstance(value, list) else [value]
    if not isinstance(action, argparse._AppendAction) and isinstance(value, list):
        raise InputError(f"{where}: give one value, not a list")
    converted = []
    for item in values:
        try:
            item = action.type(str(item)) if action.type else str(item)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise InputError(f"{where}: {item!r} is not valid ({exc})") from None
        if action.choices is not None and item not in action.choices:
            raise InputError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if isinstance(action, argparse._AppendAction) else converted[0]
