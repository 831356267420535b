"""User-facing errors: the CLI prints their message without a traceback."""


class MedidiffError(Exception):
    """Base of every error caused by the user's input, configuration or environment."""


class InputError(MedidiffError):
    """An input file or folder cannot be used (names the path and the fix)."""


class PipelineError(MedidiffError):
    """A pipeline file is invalid (names the key and line at fault)."""


class StageError(MedidiffError):
    """A stage refused an item (wrong modality, absurd size, NaNs, ...)."""


class OutputError(MedidiffError):
    """The output location cannot be written."""
