"""The prompt-engineering rewriting methods (``configs/rewriting_methods.yaml``).

``benign`` methods (style and structure variations) apply to safe seeds of any category;
``unsafe.<macro>`` methods (homophonic substitution, cultural allusion, irony, semantic nesting, ...)
to unsafe seeds of that macro category. A method's ``description`` goes into the rewriting prompt.
Validated on load: unique snake_case names, exactly the taxonomy's macro codes under ``unsafe``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.core.config import CONFIGS, ConfigError
from pipelines.core.taxonomy import load_taxonomy
from pipelines.core.yaml_files import read_yaml_file

DEFAULT_METHODS = CONFIGS / "rewriting_methods.yaml"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class MethodsError(ConfigError):
    """The methods catalogue is malformed, or a lookup names no method."""


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)
    description: str = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _snake_case(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"method name {value!r} is not snake_case")
        return value


class MethodCatalogue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    benign: tuple[Method, ...] = Field(min_length=1)
    unsafe: dict[str, tuple[Method, ...]]

    @model_validator(mode="after")
    def _unique_names(self) -> MethodCatalogue:
        names = [m.name for m in self.all()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate method names: {duplicates}")
        empty = [macro for macro, methods in self.unsafe.items() if not methods]
        if empty:
            raise ValueError(f"unsafe methods missing for macro {empty}")
        return self

    def all(self) -> list[Method]:
        return [*self.benign, *(m for methods in self.unsafe.values() for m in methods)]

    def for_seed(self, label: str, macro: str) -> tuple[Method, ...]:
        """The methods a seed may be rewritten with: benign for safe seeds, the macro's own for
        unsafe ones."""
        if label == "safe":
            return self.benign
        if label == "unsafe":
            if macro not in self.unsafe:
                raise MethodsError(f"no unsafe rewriting methods for macro {macro!r}")
            return self.unsafe[macro]
        raise MethodsError(f"seed label must be safe or unsafe, got {label!r}")

    def get(self, name: str) -> Method:
        for method in self.all():
            if method.name == name:
                return method
        raise MethodsError(f"unknown rewriting method {name!r}")


@functools.lru_cache(maxsize=8)
def load_methods(path: str | Path = DEFAULT_METHODS, taxonomy: str | Path | None = None) -> MethodCatalogue:
    """Read and validate the catalogue; ``unsafe`` must cover exactly the taxonomy's macros."""
    path = Path(path)
    data = read_yaml_file(path, "rewriting methods file", MethodsError)
    try:
        catalogue = MethodCatalogue.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid rewriting methods {path}:"]
        lines += [f"  {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                  for e in exc.errors()]
        raise MethodsError("\n".join(lines)) from None
    macros = load_taxonomy(*(() if taxonomy is None else (taxonomy,))).macro_codes
    if sorted(catalogue.unsafe) != sorted(macros):
        raise MethodsError(f"invalid rewriting methods {path}: unsafe must list exactly the macros "
                           f"{macros}, found {sorted(catalogue.unsafe)}")
    return catalogue
