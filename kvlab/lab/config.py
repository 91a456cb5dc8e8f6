"""Experiment configs: a YAML grid of models x methods x evaluations x settings x seeds, as typed objects.

    name: quick                          # experiment name (default: the file's stem)
    out: runs/quick                      # output folder (``kvlab run --out`` overrides it)
    device: auto                         # cpu, cuda, cuda:N or auto (resolved on the worker)
    dtype: auto                          # float32, bfloat16, float16 or auto
    models: [smollm2-135m]               # aliases, hub ids or paths; ``{model}`` below is replaced per model
    methods:
      - full
      - streaming:sinks=4,window=252     # a method spec, as on the command line
      - {name: h2o, budget: [256, 512], recent: 64}   # a mapping: each list expands into one spec per value
    evals:
      ppl: {data: pydoc, tokens: [1024, 2048]}        # each list expands as a product
    seeds: [0]                           # given to every evaluation whose Params has a ``seed`` field

``evals`` may also be a list of ``{name: ppl, ...}`` mappings, to run one evaluation with two different
grids. Everything is checked by :func:`load_config` before any model loads: an unknown key names
itself and the closest valid key, method specs go through the method registry, evaluation settings
through each evaluation's ``Params``. :meth:`LabConfig.cells` expands the grid into :class:`Cell`s,
each with an id that is the hash of its resolved config.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from kvlab.errors import KvlabError, did_you_mean, unknown
from kvlab.evals import get_eval, make_params
from kvlab.methods import build as build_method
from kvlab.models.aliases import ALIASES
from kvlab.results import config_hash
from kvlab.spec import format_spec, parse_spec

TOP_KEYS = ("name", "description", "out", "device", "dtype", "models", "methods", "evals", "seeds")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class Cell:
    """One unit of work: one model, one method spec, one evaluation at one settings point.

    ``params`` is the evaluation's whole resolved ``Params`` (defaults included), so that two configs
    that spell the same cell differently share an id and a rerun finds it done.
    """

    model: str
    method: str
    eval: str
    params: dict[str, Any]
    device: str = "auto"
    dtype: str = "auto"

    def config(self) -> dict[str, Any]:
        """The resolved config stored in the row; its hash is the cell id."""
        return {"model": self.model, "method": self.method, "eval": self.eval, "params": dict(self.params),
                "device": self.device, "dtype": self.dtype}

    @property
    def id(self) -> str:
        return config_hash(self.config())

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Cell:
        return cls(**config)


@dataclass
class EvalGrid:
    """One evaluation and its settings grid: each value is a list of the points to run."""

    name: str
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class LabConfig:
    """A validated experiment grid. Build it with :func:`load_config` or :func:`parse_config`."""

    name: str
    models: list[str]
    methods: list[str]
    evals: list[EvalGrid]
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    description: str = ""

    def __post_init__(self) -> None:
        if not self.models:
            raise KvlabError("config: 'models' is empty; name at least one model")
        if not self.methods:
            raise KvlabError("config: 'methods' is empty; name at least one method spec (e.g. full)")
        if not self.evals:
            raise KvlabError("config: 'evals' is empty; name at least one evaluation (e.g. ppl)")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise KvlabError(f"config: 'seeds' must be a non-empty list of integers, got {self.seeds!r}")
        try:
            dev = torch.device(self.device) if self.device != "auto" else None
        except (RuntimeError, TypeError) as exc:
            raise KvlabError(f"config: unknown device '{self.device}'; use auto, cpu, cuda or cuda:N") from exc
        if dev is not None and dev.type not in ("cpu", "cuda", "mps"):
            raise KvlabError(f"config: unsupported device '{self.device}'; use auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise KvlabError(f"config: unknown dtype '{self.dtype}'{did_you_mean(self.dtype, DTYPES)}; "
                             f"choose from: {', '.join(DTYPES)}")

    def method_specs(self, model: str) -> list[str]:
        """The method specs for one model (``{model}`` replaced by the model's name)."""
        return [m.replace("{model}", _safe_name(model)) for m in self.methods]

    def cells(self) -> list[Cell]:
        """Expand the grid: models x methods x evaluations x settings x seeds, in that nesting order."""
        cells: list[Cell] = []
        for model in self.models:
            for method in map(canonical_method, self.method_specs(model)):
                for ev in self.evals:
                    for params in _resolved_points(ev, self.seeds):
                        cells.append(Cell(model, method, ev.name, params, self.device, self.dtype))
        unique = {c.id: c for c in cells}
        return list(unique.values())

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as saved next to the rows (``DIR/config.yaml``)."""
        return {"name": self.name, "description": self.description, "out": self.out, "device": self.device,
                "dtype": self.dtype, "models": list(self.models), "methods": list(self.methods),
                "evals": [{"name": e.name, **e.grid} for e in self.evals], "seeds": list(self.seeds)}


def load_config(path: str | Path, *, validate: bool = True) -> LabConfig:
    """Read and validate a YAML experiment config (a KvlabError naming the file on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise KvlabError(f"config file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KvlabError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    try:
        return parse_config(raw, default_name=path.stem, validate=validate)
    except KvlabError as exc:
        raise KvlabError(f"{path}: {exc}") from exc


def parse_config(raw: Any, *, default_name: str = "experiment", validate: bool = True) -> LabConfig:
    """Turn a parsed YAML mapping into a :class:`LabConfig`; ``validate`` also checks every cell."""
    if not isinstance(raw, dict):
        raise KvlabError("a config must be a YAML mapping with keys: " + ", ".join(TOP_KEYS))
    for key in raw:
        if key not in TOP_KEYS:
            hint = did_you_mean(str(key), TOP_KEYS)
            raise KvlabError(f"unknown key '{key}'{hint}; valid keys: {', '.join(TOP_KEYS)}")
    cfg = LabConfig(
        name=str(raw.get("name") or default_name),
        description=str(raw.get("description") or ""),
        out=None if raw.get("out") is None else str(raw["out"]),
        device=str(raw.get("device", "auto")),
        dtype=str(raw.get("dtype", "auto")),
        models=_str_list(raw.get("models"), "models"),
        methods=_methods(raw.get("methods")),
        evals=_evals(raw.get("evals")),
        seeds=_as_list(raw.get("seeds", [0])),
    )
    if validate:
        validate_config(cfg)
    return cfg


def validate_config(cfg: LabConfig) -> list[Cell]:
    """Check model names, method specs and every settings point; return the cells. Loads no model."""
    for model in cfg.models:
        check_model_name(model)
    return cfg.cells()


def check_model_name(name: str) -> None:
    """The name-level checks of :func:`kvlab.models.load`, without loading anything: an alias, an
    existing folder or ``.gguf`` file, or a hub id ``org/name``."""
    path = Path(name).expanduser()
    if name in ALIASES or path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.suffix.lower() == ".gguf":
        raise KvlabError(f"model '{name}': no such model folder or .gguf file")
    if "/" not in name:
        raise KvlabError(f"{unknown('model', name, ALIASES)}; or give a folder, a .gguf file or a hub id 'org/name'")


def canonical_method(spec: str) -> str:
    """A method spec as the registry spells it (all settings, in field order): equal methods share cells."""
    try:
        return build_method(spec).spec()
    except KvlabError as exc:
        raise KvlabError(f"method '{spec}': {exc}") from exc


def check_files(cells: list[Cell]) -> None:
    """Files the methods read (``profile=FILE``) must exist before a sweep starts loading models."""
    for cell in {c.method: c for c in cells}.values():
        _, settings = parse_spec(cell.method)
        path = settings.get("profile")
        if path and not Path(path).expanduser().is_file():
            raise KvlabError(f"method '{cell.method.split(',')[0]}...' reads the head profile {path}, which does not "
                             f"exist; make it with: kvlab heads profile --model {cell.model} --output {path}")


def _safe_name(model: str) -> str:
    """A model name usable in a file name (``Qwen/Qwen2.5-3B`` -> ``Qwen--Qwen2.5-3B``)."""
    return model.strip("/").replace("/", "--")


def _resolved_points(ev: EvalGrid, seeds: list[int]) -> list[dict[str, Any]]:
    """Every settings point of one evaluation as a full ``Params`` dict (defaults filled in)."""
    has_seed = any(f.name == "seed" for f in dataclasses.fields(get_eval(ev.name).Params))
    if "seed" in ev.grid:
        raise KvlabError(f"evals.{ev.name}: set seeds at the top level ('seeds: [...]'), not per evaluation")
    out = []
    for point in ev.points():
        for seed in seeds if has_seed else [None]:
            values = point if seed is None else {**point, "seed": seed}
            try:
                params = make_params(ev.name, values)
            except KvlabError as exc:
                raise KvlabError(f"evals.{ev.name}: {exc}") from exc
            except (ValueError, TypeError) as exc:
                raise KvlabError(f"evals.{ev.name} {values}: {exc}") from exc
            out.append(dataclasses.asdict(params))
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        raise KvlabError(f"missing key '{key}'")
    items = _as_list(value)
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise KvlabError(f"'{key}' must be a list of names, got {value!r}")
    return [v.strip() for v in items]


def _methods(value: Any) -> list[str]:
    """Method entries: a spec string, or ``{name: x, key: value-or-list}`` expanded into specs."""
    if value is None:
        raise KvlabError("missing key 'methods'")
    specs: list[str] = []
    for entry in _as_list(value):
        if isinstance(entry, str):
            name, params = parse_spec(entry)
            specs.append(format_spec(name, params))
        elif isinstance(entry, dict):
            if "name" not in entry:
                raise KvlabError(f"method entry {entry!r} has no 'name' key")
            grid = {k: _as_list(v) for k, v in entry.items() if k != "name"}
            for combo in itertools.product(*grid.values()):
                specs.append(format_spec(str(entry["name"]), dict(zip(grid, combo))))
        else:
            raise KvlabError(f"a method must be a spec string or a mapping with 'name', got {entry!r}")
    return list(dict.fromkeys(specs))


def _evals(value: Any) -> list[EvalGrid]:
    """``{ppl: {...}, needle: {...}}`` or ``[{name: ppl, ...}, ...]`` -> EvalGrids (names checked)."""
    if value is None:
        raise KvlabError("missing key 'evals'")
    if isinstance(value, dict):
        entries = [{"name": k, **(v or {})} if isinstance(v, dict) or v is None else {"name": k, "_bad": v}
                   for k, v in value.items()]
    elif isinstance(value, list):
        entries = [{"name": v} if isinstance(v, str) else v for v in value]
    else:
        raise KvlabError(f"'evals' must be a mapping of evaluation name to settings, got {value!r}")
    grids = []
    for entry in entries:
        if not isinstance(entry, dict) or "name" not in entry:
            raise KvlabError(f"an evaluation entry needs a 'name', got {entry!r}")
        if "_bad" in entry:
            raise KvlabError(f"evals.{entry['name']} must be a mapping of settings, got {entry['_bad']!r}")
        name = str(entry["name"])
        get_eval(name)  # unknown evaluation -> suggestion
        grids.append(EvalGrid(name, {k: _as_list(v) for k, v in entry.items() if k != "name"}))
    return grids
