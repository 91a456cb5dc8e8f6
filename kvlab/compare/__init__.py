"""Side by side with other KV-cache libraries, each run in its own environment as a subprocess.

* :mod:`kvlab.compare.kvpress` — NVIDIA's kvpress (in ``.kvpress-venv``, built by ``make kvpress-env``): the samples
  and the evaluation; :mod:`~kvlab.compare.kvpress_driver` runs the worker, :mod:`~kvlab.compare.kvpress_results`
  turns its lines into metrics and rows; :mod:`~kvlab.compare.samples` the inputs both libraries see.
* :mod:`kvlab.compare.kvpress_worker` — the script run in that venv (press construction, the protocol), with
  :mod:`~kvlab.compare.kvpress_measure` (one sample's timed run: cache bytes, peak RSS).
* :mod:`kvlab.compare.kvlab_runs`, :mod:`~kvlab.compare.side_by_side` — kvlab's side at kvpress's kept tokens, and
  the combined run. Its table, targets and figure are the lab's (:mod:`kvlab.lab.kvpress_figure`), from rows only.
"""
