"""KV-cache methods: small dataclasses in one registry (see :mod:`kvlab.methods.registry`)."""

from kvlab.methods.base import Group, LayerInfo, Method
from kvlab.methods.registry import build, describe, get, is_reference, names, register

__all__ = ["Group", "LayerInfo", "Method", "build", "describe", "get", "is_reference", "names", "register"]
