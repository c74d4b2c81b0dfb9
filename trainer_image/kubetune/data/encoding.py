"""Text -> token ids where data is always text: a dataset (or a client) can never forge a special token.

The rule, for every path that turns user-supplied text into token ids (training chats,
plain-text pre-training, and serving chat requests through `encode_chat`):

  * Message content is text. Characters of a message's content that spell a special token
    (`<|im_end|>`, `<|im_start|>system`, `</s>`, `<|endoftext|>`, ...) become the ordinary
    tokens of that text, exactly as `tokenizer(..., split_special_tokens=True)` spells them.
    A sample therefore cannot open or close turns, inject a system prompt, end a packed
    sample early with a forged EOS, or hide text from the labels mask. This holds for every
    role: system prompts, user prompts, history and assistant answers alike.
  * The chat template's own markup stays markup: the special tokens the template writes
    around the content (turn markers, headers, EOS) are the real special-token ids.
  * Plain text (format `text`) is content as a whole: a document containing `<|endoftext|>`
    trains on that text, and its only EOS is the one appended after it.
  * Only *special* added tokens are split (what `split_special_tokens` splits); added tokens
    that are ordinary vocabulary (e.g. `<think>` in some tokenizers) keep their ids.
  * Text without special-token strings is tokenized exactly as before (the whole rendered
    conversation in one call): only the tokens of content that spells a special token change.

How: the conversation is rendered and tokenized in one call, as the template intends. When
some content spells a special token, the characters of every message's content are located
in the rendered text (the template is rendered once more with placeholders in place of the
contents), and the tokens overlapping a content that holds a special token are tokenized
again from their characters with special tokens split. A template that rewrites content in
a way that cannot be located (beyond trimming whitespace) is refused for such content with a
TemplateError rather than guessed. Tokenizing the affected content again on its own is exact
for byte-level BPE (Qwen, Llama 3, SmolLM2, GPT-style); a SentencePiece-style tokenizer that
prepends a space to every text it encodes may start such a run with one extra space token.

Serving's chat endpoint is meant to call the same function (`encode_chat(tokenizer, messages,
add_generation_prompt=True).ids`), so a prompt is tokenized at inference exactly as the same
conversation was in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .converters import Message


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Encoding:
    """A rendered conversation and its tokens; offsets are (start, end) characters of `text`."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def special_tokens(tokenizer) -> dict[int, str]:
    """id -> text of every special added token (the tokens `split_special_tokens` spells as text)."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content}


def encode_plain(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text` taken as text: special-token strings in it become ordinary tokens.
    Tokens the tokenizer itself adds (add_special_tokens, e.g. BOS) are still the real ones."""
    return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]


def _encode_markup(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def encode_chat(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> Encoding:
    """The conversation rendered with the tokenizer's chat template and tokenized: the template's
    markup as special tokens, every message's content as text (module docstring)."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    ids, offsets = _encode_markup(tokenizer, text)
    specials = special_tokens(tokenizer)
    spellings = set(specials.values())
    if not any(s in m["content"] for m in messages for s in spellings):
        return Encoding(text, ids, offsets)  # nothing to respell: the common case, unchanged
    spans = content_spans(tokenizer, messages, text, add_generation_prompt)
    runs = []  # token index ranges [first, last] overlapping a content that holds a special token
    for lo, hi in spans:
        inside = [k for k, (s, e) in enumerate(offsets) if s < hi and e > lo]
        if inside and any(ids[k] in specials for k in inside):
            first, last = inside[0], inside[-1]
            # Tokens sharing a character with the run (bytes of one character) go with it.
            while first and offsets[first - 1][1] > offsets[first][0]:
                first -= 1
            while last + 1 < len(ids) and offsets[last + 1][0] < offsets[last][1]:
                last += 1
            runs.append([first, last])
    if not runs:
        return Encoding(text, ids, offsets)
    runs.sort()
    merged = [runs[0]]
    for first, last in runs[1:]:
        if first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    out_ids, out_offsets, k = [], [], 0
    for first, last in merged:
        out_ids += ids[k:first]
        out_offsets += offsets[k:first]
        # From the end of the previous token: characters no token covers (offsets trimmed of
        # a leading space) belong to the first token of the run.
        start = offsets[first - 1][1] if first else 0
        end = offsets[last][1]
        enc = tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        out_ids += enc["input_ids"]
        out_offsets += [(start + s, start + e) for s, e in enc["offset_mapping"]]
        k = last + 1
    out_ids += ids[k:]
    out_offsets += offsets[k:]
    return Encoding(text, out_ids, out_offsets)


def _placeholder_char(text: str, messages: list[Message]) -> str:
    """A private-use character found neither in the rendered text nor in any content."""
    for code in range(0xE000, 0xF900):
        mark = chr(code)
        if mark not in text and not any(mark in m["content"] for m in messages):
            return mark
    raise TemplateError("the conversation uses every private-use character; cannot locate message contents")


def content_spans(tokenizer, messages: list[Message], text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """(start, end) characters of each message's content in `text` (the rendered conversation),
    in the order the template writes them; a message the template leaves out has none.

    The template is rendered with numbered placeholders as contents; the text between
    placeholders is the template's own. A content may appear verbatim or trimmed of
    whitespace (templates that `| trim`); anything else raises TemplateError.
    """
    mark = _placeholder_char(text, messages)
    skeleton = render_chat(tokenizer, [{**m, "content": f"{mark}{i}{mark}"} for i, m in enumerate(messages)], add_generation_prompt)
    pieces = re.split(f"{mark}([0-9]+){mark}", skeleton)
    spans = []
    pos = len(pieces[0])
    ok = text.startswith(pieces[0])
    for k in range(1, len(pieces), 2):
        if not ok:
            break
        content, after = messages[int(pieces[k])]["content"], pieces[k + 1]
        for shown in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(shown, pos) and text.startswith(after, pos + len(shown)):
                spans.append((pos, pos + len(shown)))
                pos += len(shown) + len(after)
                break
        else:
            ok = False
    if not ok or pos != len(text):
        raise TemplateError(
            "a message spells a special token of the tokenizer and the chat template changes message text when "
            "rendering it, so the content cannot be told apart from the template's markup; remove the special-token "
            "text from the data or set spec.model.chatTemplate to a template that writes message content as is"
        )
    return spans
