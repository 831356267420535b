"""Shipped model folders (weights, configs, model cards), installed as the package data of
``medidiff.builtin_models``."""
