"""Side by side with other KV-cache libraries, each run in its own environment as a subprocess.

* :mod:`kvlab.compare.kvpress` — NVIDIA's kvpress (in ``.kvpress-venv``, built by ``make kvpress-env``),
  driven through :mod:`kvlab.compare.kvpress_worker`.
"""
