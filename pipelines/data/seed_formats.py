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

Human-labelled Chinese sets (``../shared/data/``; their micro maps are the proposals in each folder's
``micro_map.json``, written out here):

- ``toxicn`` (ToxiCN): ``content, toxic`` (0 / 1), ``target`` (6 flags: LGBTQ, region, sexism,
  racism, others, non-hate). ``toxic`` is the label; the micro code is the first flagged target among
  the first five (LGBTQ B9, region B4, sexism B5, racism B1, others B9; a post with several targets
  gets the first's, where the proposal gives every one); untargeted toxic posts and safe ones get none.
  The files hold no split column: read ``train.jsonl`` and ``test.jsonl`` as two sets.
- ``chineseharm_bench`` (ChineseHarm-Bench): ``文本, 标签`` (不违规 safe; 低俗色情 A6, 博彩 A8, 欺诈 A8,
  谩骂引战 D3, 黑产广告 C5 unsafe).

Evaluation sets (a ``*_response`` preset is the response-level twin of a prompt-level one: the label
comes from the response's column, and a row without a response is an error, ``missing_response``):

- ``beavertails`` (response level): ``prompt, response, category, is_safe``; ``category`` is a record
  of 14 boolean flags (``animal_abuse``, ``child_abuse``, ``controversial_topics,politics``, ...,
  ``privacy_violation``, ``self_harm``, ``violence,aiding_and_abetting,incitement``), kept as
  ``harm_category``: the true flags' names joined by ``"; "`` (the names hold commas), ``""`` for a
  safe row; ``is_safe`` true -> ``safe``, false -> ``unsafe``.
- ``safetyprompts`` (thu-coai Safety-Prompts, Chinese): ``prompt, response, type``; ``type`` is the
  scenario (``Insult``, ``Unfairness_And_Discinimination`` (sic), ``Crimes_And_Illegal_Activities``,
  ``Physical_Harm``, ``Mental_Health``, ``Privacy_And_Property``, ``Ethics_And_Morality``, and the
  instruction attacks ``Goal_Hijacking``, ``Prompt_Leaking``, ``Role_Play_Instruction``,
  ``Unsafe_Instruction_Topic``, ``Inquiry_With_Unsafe_Opinion``, ``Reverse_Exposure``), kept as
  ``harm_category``. Every prompt is a risky test prompt (``unsafe``); the response is a model's
  answer, kept as lineage. The topical scenarios map onto our macros; ``Ethics_And_Morality`` and the
  attacks name a technique or no single risk, so their macro stays ``""``. The release is one JSON
  object per file, ``{scenario: [records]}``: read it with ``format: json`` (the key becomes ``type``
  where a record lacks it); JSONL / Parquet rows need nothing more.
- ``polyguardprompts`` (PolyGuardPrompts, the PolyGuardMix test set): ``prompt, response,
  prompt_harm_label, response_harm_label, response_refusal_label, prompt_safety_categories,
  response_safety_categories, language``; ``prompt_safety_categories`` kept as ``harm_category``.
  ``polyguardprompts_response``: label ``response_harm_label``, category
  ``response_safety_categories``.
- ``wildguardtest``: ``prompt, adversarial, response, prompt_harm_label, response_refusal_label,
  response_harm_label, subcategory``; ``subcategory`` kept as ``harm_category``.
  ``wildguardtest_response``: label ``response_harm_label`` (rows without one: ``missing_label``).

Labels of the Ai2 / PolyGuard sets are ``harmful`` / ``unharmful``; ``None`` is ``missing_label``.
"""

from __future__ import annotations

from typing import Any

_HARM_LABELS = {"harmful": "unsafe", "unharmful": "safe"}


def _response_level(preset: dict[str, Any], **columns: str) -> dict[str, Any]:
    """The response-level twin of a prompt-level preset: the same mapping with ``columns`` (the
    response's label and category columns) replaced, and rows without a response made errors
    instead of prompts judged without the answer they are labelled by."""
    return {**preset, "columns": {**preset["columns"], **columns}, "require_response": True}


_POLYGUARD_PROMPTS = {
    "columns": {"text": "prompt", "label": "prompt_harm_label", "lang": "language", "response": "response",
                "category": "prompt_safety_categories"},
    "label_map": _HARM_LABELS,
    "source": "external",
}
_WILDGUARD_TEST = {
    "columns": {"text": "prompt", "label": "prompt_harm_label", "response": "response",
                "category": "subcategory"},
    "label_map": _HARM_LABELS,
    "source": "external",
}

#: ToxiCN's target flags (in order) -> micro code; the sixth flag is "non-hate"
_TOXICN_TARGETS = ("B9", "B4", "B5", "B1", "B9")


def _toxicn_micro_map() -> dict[str, str]:
    """Every 6-flag ``target`` value (as ingestion writes a list: ``"0; 0; 1; 0; 0; 0"``) -> the code of
    its first flagged target, or ``""`` when none of the first five is set."""
    out = {}
    for bits in range(64):
        flags = [(bits >> (5 - i)) & 1 for i in range(6)]
        first = next((i for i, flag in enumerate(flags[:5]) if flag), None)
        out["; ".join(map(str, flags))] = "" if first is None else _TOXICN_TARGETS[first]
    return out


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
    "beavertails": {
        "columns": {"text": "prompt", "label": "is_safe", "response": "response", "category": "category"},
        "label_map": {"true": "safe", "false": "unsafe"},
        "require_response": True,
        "source": "external",
    },
    "safetyprompts": {
        "columns": {"text": "prompt", "response": "response", "macro": "type", "category": "type"},
        "label": "unsafe",
        "macro_map": {
            "Insult": "D",                           # insults infringe reputation and dignity (D3)
            "Unfairness_And_Discinimination": "B",   # the release's spelling
            "Unfairness_And_Discrimination": "B",
            "Crimes_And_Illegal_Activities": "A",    # content the law prohibits (A8)
            "Physical_Harm": "D",                    # harm to others' physical and mental health (D1)
            "Mental_Health": "D",
            "Privacy_And_Property": "D",             # privacy (D5), other lawful rights (D7)
        },
        "group_column": "type",
        "lang": "zh",
        "source": "external",
    },
    "polyguardprompts": _POLYGUARD_PROMPTS,
    "polyguardprompts_response": _response_level(
        _POLYGUARD_PROMPTS, label="response_harm_label", category="response_safety_categories"),
    "wildguardtest": _WILDGUARD_TEST,
    "wildguardtest_response": _response_level(_WILDGUARD_TEST, label="response_harm_label"),
    "toxicn": {
        "columns": {"text": "content", "label": "toxic", "micro": "target", "category": "topic"},
        "label_map": {"0": "safe", "1": "unsafe"},
        "micro_map": _toxicn_micro_map(),
        "lang": "zh",
        "source": "external",
    },
    "chineseharm_bench": {
        "columns": {"text": "文本", "label": "标签", "micro": "标签", "category": "标签"},
        "label_map": {"不违规": "safe", "低俗色情": "unsafe", "博彩": "unsafe", "欺诈": "unsafe", "谩骂引战": "unsafe",
                      "黑产广告": "unsafe"},
        "micro_map": {"不违规": "", "低俗色情": "A6", "博彩": "A8", "欺诈": "A8", "谩骂引战": "D3", "黑产广告": "C5"},
        "lang": "zh",
        "source": "external",
    },
}
