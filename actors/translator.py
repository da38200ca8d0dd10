"""Machine translation: a seq2seq model in a Ray Data actor pool (MarianMT
``Helsinki-NLP/opus-mt-en-zh`` at paper scale; any ``AutoModelForSeq2SeqLM`` folder works, e.g. the
tiny random Marian of the test kit), or the answers of an LLM endpoint (:func:`llm_translation_batch`).

Rows whose ``lang`` is one of ``source_langs`` are translated; their original text is kept as
``original_text`` and ``lang`` becomes ``target_lang``. Other rows pass through unchanged. A seq2seq
batch that fails is retried row by row; rows that still fail become ``error`` rows
(``translation_error``). An LLM answer that failed, is empty or opens as a refusal is an ``error``
row with that reason (``inference_error``, ``empty_answer``, ``refused``) and the answer in ``detail``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

from pipelines.core.parsing import classify_llm_error, parse_translation
from pipelines.core.rows import ERROR, OK, error_detail

if TYPE_CHECKING:  # the stage module that owns the config imports this one
    from pipelines.data.preprocess import TranslateConfig

log = logging.getLogger(__name__)


class Translator:
    def __init__(self, config: TranslateConfig, device: str):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if device == "cpu":
            torch.set_num_threads(config.torch_threads or max(1, int(config.num_cpus)))
        self.config = config
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(config.model).to(device).eval()

    def translate(self, texts: list[str]) -> list[str]:
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.config.max_input_tokens).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.config.max_new_tokens,
                                      num_beams=self.config.num_beams, do_sample=False)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def _translate_rows(self, texts: list[str]) -> tuple[list[str], list[str]]:
        try:
            return self.translate(texts), [""] * len(texts)
        except Exception as exc:
            log.warning("translation batch of %d failed (%s); retrying row by row", len(texts), exc)
        out, errors = [], []
        for text in texts:
            try:
                out.append(self.translate([text])[0])
                errors.append("")
            except Exception as exc:
                out.append(text)
                errors.append(f"{type(exc).__name__}: {exc}")
        return out, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts, langs = batch.column("text").to_pylist(), batch.column("lang").to_pylist()
        todo = [i for i, lang in enumerate(langs) if lang in self.config.source_langs]
        original = [""] * len(texts)
        status, reason, detail = [OK] * len(texts), [""] * len(texts), [""] * len(texts)
        if todo:
            translated, errors = self._translate_rows([texts[i] for i in todo])
            for i, new, err in zip(todo, translated, errors):
                if err or not new:
                    status[i], reason[i] = ERROR, "translation_error"
                    detail[i] = error_detail(err or "empty translation")
                    continue
                original[i], texts[i], langs[i] = texts[i], new, self.config.target_lang
        return with_translation(batch, texts, langs, original, status, reason, detail)


#: columns every translated batch ends with, in this order (the two halves of an LLM translation
#: are unioned, so their schemas must agree)
TRANSLATION_COLUMNS = ("text", "lang", "original_text", "status", "reason", "detail")
_LLM_ONLY = ("llm_output", "llm_error", "llm_prompt_tokens", "llm_output_tokens")


def with_translation(batch: pa.Table, *columns: list[str]) -> pa.Table:
    """``batch`` with :data:`TRANSLATION_COLUMNS` replaced by ``columns`` (and the LLM's dropped)."""
    out = batch.select([c for c in batch.column_names if c not in TRANSLATION_COLUMNS + _LLM_ONLY])
    for name, values in zip(TRANSLATION_COLUMNS, columns):
        out = out.append_column(name, pa.array(values, pa.string()))
    return out


def untranslated_batch(batch: pa.Table) -> pa.Table:
    """Rows in no source language: unchanged, ``ok``, no ``original_text``."""
    n = batch.num_rows
    return with_translation(batch, batch.column("text").to_pylist(), batch.column("lang").to_pylist(),
                            [""] * n, [OK] * n, [""] * n, [""] * n)


def llm_translation_batch(batch: pa.Table, *, target_lang: str) -> pa.Table:
    """Rows with an LLM's translation answer (``chat`` output) -> translated rows or error rows."""
    texts, langs, original, status, reason, detail = [], [], [], [], [], []
    for row in batch.to_pylist():
        translation, why = (None, classify_llm_error(row["llm_error"])) if row["llm_error"] else \
            parse_translation(row["llm_output"], row["text"])
        if translation is None:
            texts.append(row["text"]), langs.append(row["lang"]), original.append("")
            status.append(ERROR), reason.append(why)
            detail.append(error_detail(row["llm_error"] or f"answer: {row['llm_output']!r}"))
        else:
            texts.append(translation), langs.append(target_lang), original.append(row["text"])
            status.append(OK), reason.append(""), detail.append("")
    return with_translation(batch, texts, langs, original, status, reason, detail)
