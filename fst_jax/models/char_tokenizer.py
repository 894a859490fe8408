"""A character-level tokenizer in HF format, with Qwen3's chat markup, for small models the project makes.

`transformers.AutoTokenizer` loads what `make_char_tokenizer(...).save_pretrained(dir)` writes, exactly as it
loads Qwen3's own tokenizer, so every code path that renders chats or decodes completions is the same for the
embedded tiny model and for Qwen3-8B.
"""

from __future__ import annotations

import string

IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK, THINK_OPEN, THINK_CLOSE)
DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"

# Qwen3's turn markup; with enable_thinking=False the assistant turn opens with an empty think block, as
# Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def make_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, chat_template: str = CHAT_TEMPLATE):
    """A `PreTrainedTokenizerFast`: one token per character of `alphabet`, plus the chat special tokens.

    Ids: the special tokens first (pad = 0), then the alphabet in the given order; characters outside it map
    to `<unk>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch in vocab:
            raise ValueError(f"alphabet character {ch!r} collides with a special token")
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)
