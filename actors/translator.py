"""Machine translation in a Ray Data actor pool (MarianMT ``Helsinki-NLP/opus-mt-en-zh`` at paper
scale; any ``AutoModelForSeq2SeqLM`` folder works, e.g. the tiny random Marian of the test kit).

Rows whose ``lang`` is one of ``source_langs`` are translated; their original text is kept as
``original_text`` and ``lang`` becomes ``target_lang``. Other rows pass through unchanged. A batch
that fails is retried row by row; rows that still fail become ``error`` rows (``translation_error``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow as pa

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
        except Exception as exc:  # noqa: BLE001 - isolate the failing rows
            log.warning("translation batch of %d failed (%s); retrying row by row", len(texts), exc)
        out, errors = [], []
        for text in texts:
            try:
                out.append(self.translate([text])[0])
                errors.append("")
            except Exception as exc:  # noqa: BLE001
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
        keep = [c for c in batch.column_names if c not in ("text", "lang", "original_text", "status",
                                                           "reason", "detail")]
        out = batch.select(keep)
        for name, values in (("text", texts), ("lang", langs), ("original_text", original),
                             ("status", status), ("reason", reason), ("detail", detail)):
            out = out.append_column(name, pa.array(values, pa.string()))
        return out
