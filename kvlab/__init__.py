"""kvlab: KV-cache compression for Hugging Face causal LMs, and a lab that compares the methods.

    import kvlab
    model, tok = kvlab.load("smollm2-135m")
    cache = kvlab.make_cache(model, "streaming:sinks=4,window=1020")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=200)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["KVCache", "KvlabError", "Method", "build_method", "load", "make_cache", "methods", "register_method"]

from kvlab.errors import KvlabError
from kvlab.methods import Method
from kvlab.methods import build as build_method
from kvlab.methods import names as methods
from kvlab.methods import register as register_method

if TYPE_CHECKING:
    from kvlab.cache import KVCache, make_cache
    from kvlab.models import load


def __getattr__(name: str) -> Any:  # transformers is imported only when the cache or a model is used
    if name in ("KVCache", "make_cache"):
        from kvlab import cache

        return getattr(cache, name)
    if name == "load":
        from kvlab.models import load

        return load
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
