"""Ready-made ingestion mappings for public safety datasets (local JSONL / Parquet / CSV copies).

A preset fills ``columns``, ``label_map`` / ``label``, ``macro_map`` and ``keep`` of an ingestion
config; anything the recipe sets itself wins. Formats as listed in the project's reference notes:

- ``do_not_answer``: ``id, risk_area, types_of_harm, specific_harms, question`` - every question is a
  prompt a model should refuse, so ``label: unsafe``; the 5 risk areas map onto our macro categories;
  the 12 ``types_of_harm`` are kept as ``harm_category``.
- ``linguasafe``: ``id, prompt, lang, type, subtype, level, source`` - harmful prompts (``unsafe``);
  ``type`` kept as ``harm_category``, ``level`` as ``harm_level``.
- ``polyguardmix``: ``prompt, response, prompt_harm_label, ..., metadata{language, source}``;
  ``polyguardmix_zh`` keeps only its Chinese rows.
- ``wildguardmix``: ``prompt, adversarial, response, prompt_harm_label, ..., subcategory``.
- ``chinesesafe``: ``text, label`` (违规 / 不违规), ``subject``.
"""

from __future__ import annotations

from typing import Any

_HARM_LABELS = {"harmful": "unsafe", "unharmful": "safe"}

PRESETS: dict[str, dict[str, Any]] = {
    "do_not_answer": {
        "columns": {"text": "question", "id": "id", "macro": "risk_area", "category": "types_of_harm"},
        "label": "unsafe",
        "macro_map": {
            "Malicious Uses": "A",
            "Misinformation Harms": "E",
            "Discrimination, Exclusion, Toxicity, Hateful, Offensive": "B",
            "Information Hazards": "D",
            "Human-Chatbot Interaction Harms": "D",
        },
        "source": "external",
    },
    "linguasafe": {
        "columns": {"text": "prompt", "id": "id", "lang": "lang", "category": "type", "level": "level"},
        "label": "unsafe",
        "source": "external",
    },
    "polyguardmix": {
        "columns": {"text": "prompt", "label": "prompt_harm_label", "lang": "metadata.language",
                    "response": "response"},
        "label_map": _HARM_LABELS,
        "source": "external",
    },
    "polyguardmix_zh": {
        "columns": {"text": "prompt", "label": "prompt_harm_label", "lang": "metadata.language",
                    "response": "response"},
        "label_map": _HARM_LABELS,
        "keep": {"metadata.language": ["zh", "Chinese", "chinese", "zh-CN", "zh-cn"]},
        "source": "external",
    },
    "wildguardmix": {
        "columns": {"text": "prompt", "label": "prompt_harm_label", "response": "response"},
        "label_map": _HARM_LABELS,
        "source": "external",
    },
    "chinesesafe": {
        "columns": {"text": "text", "label": "label"},
        "label_map": {"违规": "unsafe", "不违规": "safe"},
        "lang": "zh",
        "source": "external",
    },
}
