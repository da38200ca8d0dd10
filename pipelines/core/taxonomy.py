"""The risk taxonomy: 5 macro (A-E) and 31 micro categories (A1-E2), bilingual, with seed keywords.

``configs/taxonomy.yaml`` holds the codes, the Chinese and English names and 20 seed keywords per
micro category (``"中文 | english"``). Everything else asks this module: label lookups, which macro a
micro belongs to, the seeds of the keyword pool. The file is validated on load: 5 macros, 31 micros,
unique codes, every micro code under its macro (``B3`` under ``B``), bilingual keywords.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.core.config import ConfigError
from pipelines.core.yaml_files import read_yaml_file

DEFAULT_TAXONOMY = Path(__file__).resolve().parents[2] / "configs" / "taxonomy.yaml"
EXPECTED_MACROS, EXPECTED_MICROS = 5, 31


class TaxonomyError(ConfigError):
    """The taxonomy file is malformed, or a code is not in it."""


class Keyword(BaseModel):
    model_config = ConfigDict(frozen=True)

    zh: str
    en: str

    @classmethod
    def parse(cls, text: str) -> Keyword:
        """``"人肉搜索 | doxxing"`` -> Keyword(zh="人肉搜索", en="doxxing")."""
        parts = [p.strip() for p in str(text).split("|")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"keyword {text!r} is not 'Chinese | English'")
        return cls(zh=parts[0], en=parts[1])

    def __str__(self) -> str:
        return f"{self.zh} | {self.en}"


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)

    def label(self, lang: Literal["zh", "en"] = "zh") -> str:
        return self.zh if lang == "zh" else self.en


class Micro(Category):
    keywords: tuple[Keyword, ...] = Field(min_length=1)

    @field_validator("keywords", mode="before")
    @classmethod
    def _parse_keywords(cls, value):
        return tuple(Keyword.parse(v) if isinstance(v, str) else v for v in value)

    @field_validator("keywords")
    @classmethod
    def _unique(cls, value: tuple[Keyword, ...]) -> tuple[Keyword, ...]:
        for side in ("zh", "en"):
            seen: set[str] = set()
            for kw in value:
                key = getattr(kw, side).casefold()
                if key in seen:
                    raise ValueError(f"duplicate keyword {getattr(kw, side)!r}")
                seen.add(key)
        return value


class Macro(Category):
    micros: tuple[Micro, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _micros_under_macro(self) -> Macro:
        for micro in self.micros:
            if not (micro.code.startswith(self.code) and micro.code[len(self.code):].isdigit()):
                raise ValueError(f"micro code {micro.code!r} is not under macro {self.code!r}")
        return self


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    macros: tuple[Macro, ...]

    @model_validator(mode="after")
    def _shape(self) -> Taxonomy:
        codes = [m.code for m in self.macros] + [u.code for m in self.macros for u in m.micros]
        duplicates = sorted({c for c in codes if codes.count(c) > 1})
        if duplicates:
            raise ValueError(f"duplicate codes: {duplicates}")
        n_micro = sum(len(m.micros) for m in self.macros)
        if len(self.macros) != EXPECTED_MACROS or n_micro != EXPECTED_MICROS:
            raise ValueError(f"expected {EXPECTED_MACROS} macro and {EXPECTED_MICROS} micro "
                             f"categories, found {len(self.macros)} and {n_micro}")
        return self

    # Lookups ----------------------------------------------------------------------------------
    @functools.cached_property
    def _micro_index(self) -> dict[str, tuple[Macro, Micro]]:
        return {u.code: (m, u) for m in self.macros for u in m.micros}

    @property
    def micro_codes(self) -> list[str]:
        return list(self._micro_index)

    @property
    def macro_codes(self) -> list[str]:
        return [m.code for m in self.macros]

    def micro(self, code: str) -> Micro:
        try:
            return self._micro_index[code][1]
        except KeyError:
            raise TaxonomyError(f"unknown micro category {code!r} "
                                f"(known: {', '.join(self.micro_codes)})") from None

    def macro(self, code: str) -> Macro:
        """The macro category ``code`` (``"B"``), or the macro of a micro code (``"B3"``)."""
        for m in self.macros:
            if m.code == code:
                return m
        if code in self._micro_index:
            return self._micro_index[code][0]
        raise TaxonomyError(f"unknown category {code!r} (macros: {', '.join(self.macro_codes)})")

    def macro_of(self, micro_code: str) -> str:
        self.micro(micro_code)
        return self._micro_index[micro_code][0].code

    def seed_keywords(self, micro_code: str) -> tuple[Keyword, ...]:
        return self.micro(micro_code).keywords

    def hash_payload(self) -> str:
        """What a stage holding the taxonomy hashes of it: :func:`taxonomy_digest` (codes and names; the
        keyword pool hashes the seed keywords it reads itself)."""
        return taxonomy_digest(self)


def taxonomy_digest(taxonomy: Taxonomy) -> str:
    """What a prompt or a report can render of the taxonomy, as a 16-hex digest for stage hashes:
    sha256 over every macro and micro category's code, Chinese and English name, in file order.

    The seed keywords are left out: only the keyword pool reads them (and hashes them itself), so a
    new keyword does not regenerate, say, the loop's candidates."""
    content = [[m.code, m.zh, m.en, [[u.code, u.zh, u.en] for u in m.micros]] for m in taxonomy.macros]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def categories_block(taxonomy: Taxonomy) -> str:
    """The taxonomy as prompt text: one line per macro category with its micro codes and names."""
    return "\n".join(f"{m.code} {m.zh}：" + "；".join(f"{c.code} {c.zh}" for c in m.micros)
                     for m in taxonomy.macros)


def _format(exc: ValidationError, path: Path) -> str:
    lines = [f"invalid taxonomy {path}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=8)
def load_taxonomy(path: str | Path = DEFAULT_TAXONOMY) -> Taxonomy:
    """Read and validate a taxonomy file (cached per path)."""
    path = Path(path)
    data = read_yaml_file(path, "taxonomy file", TaxonomyError)
    try:
        return Taxonomy.model_validate(data)
    except ValidationError as exc:
        raise TaxonomyError(_format(exc, path)) from None
