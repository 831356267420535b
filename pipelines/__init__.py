"""Built-in pipeline files, installed as the package data of ``medidiff.builtin_pipelines``."""
