"""A real Hugging Face tokenizer folder with a BOS, built offline in a blink: byte-level BPE with no
merges (one token per byte), a Llama-2-like post-processor that adds `<s>` when asked for special
tokens, and a chat template that starts with `<s>` itself — so tokenising the rendered template with
special tokens gives two BOS, the bug the vLLM backends must avoid."""

from __future__ import annotations

from pathlib import Path

BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def bos_tokenizer(folder: str | Path, max_position_embeddings: int | None = None) -> Path:
    """Write the tokenizer (and, if given, a config.json declaring the context length) to `folder`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    if max_position_embeddings is not None:
        (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                        "max_position_embeddings": max_position_embeddings}))
    return folder
