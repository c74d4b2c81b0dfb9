"""Message lists -> token ids and labels with the model tokenizer's own chat template.

Labels: only assistant tokens are trained (every assistant turn, including the template's
end-of-turn marker that follows the content); everything else is -100. The assistant spans
are found by rendering the conversation prefix by prefix as text: the characters added by
rendering turn i after `add_generation_prompt` of turns < i are that turn's answer. Tokens
are then mapped to characters with the tokenizer's offsets, so this works for any template
(ChatML, Llama 3, ChatGLM, ...) without knowing its markup; a token that straddles the edge
of an answer (a space merged with the first word) counts as part of the answer.

Length limits (documented truncation; a "turn" is the prompt part before an answer plus
that answer):
  1. an answer longer than maxTargetLength is cut from the right;
  2. a prompt part longer than maxSourceLength is cut from the left (it keeps its end:
     the newest text and the assistant header);
  3. while the sample is longer than maxLength and has several turns, the last turn is
     dropped;
  4. a single turn still longer than maxLength keeps at most max(maxLength // 2, maxLength
     - answer) prompt tokens from its end and cuts the answer from the right to fit.
Plain text (format text) is the text's tokens + EOS, cut from the right at maxLength.
The first token of every sample has label -100 (nothing predicts it), so packed samples
never train one sample's last token to predict the next sample's first.
A sample left without trained tokens is dropped (counted in the returned statistics).

Data is text (the rule and mechanism are in encoding.py): message content and plain text
that spell a special token (`<|im_end|>`, `</s>`, `<|endoftext|>`) are tokenized as ordinary
text in every role, so a sample cannot forge turns, system prompts, EOS or label boundaries;
only the chat template's own markup produces special tokens. Text without such strings is
tokenized exactly as one call on the rendered conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .converters import Message
from .encoding import TemplateError, encode_chat, encode_plain, render_chat, special_tokens

IGNORE = -100

# ChatML (Qwen, SmolLM2 and others): what `chatTemplate: chatml` names, and the tiny test model's template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Named templates a user may set in spec.model.chatTemplate instead of Jinja text, for
# tokenizers that ship none. Explicit only: a missing template is never guessed.
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}


@dataclass(frozen=True)
class BaseTargets:
    """The base model's next-token distributions at the tokens of an answer it wrote
    (spec.retention.replay.loss kl; train/loss.py): row j is the distribution its token j was
    drawn from, kept to the k most likely tokens, `ids` [n, k], and their log-probabilities,
    `logp` [n, k+1], whose last column is the rest of the vocabulary together."""

    ids: Any  # torch.LongTensor [n, k]
    logp: Any  # torch.FloatTensor [n, k+1]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def head(self, n: int) -> "BaseTargets":
        return BaseTargets(self.ids[:n], self.logp[:n])

    def copy(self) -> "BaseTargets":
        """With storage of its own: a slice of a batch's tensors keeps, and pickles, the whole batch."""
        return BaseTargets(self.ids.clone(), self.logp.clone())


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    distill: Optional[BaseTargets] = None  # its last len(distill) tokens learn these distributions, not their labels

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class LengthLimits:
    max_length: int
    max_source_length: Optional[int] = None
    max_target_length: Optional[int] = None


@dataclass
class TokenizeStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)
    # Samples whose text spells a special token (tokenized as text; worth a warning: data
    # pre-rendered with a chat template's markers no longer acts as markup).
    special_text: int = 0
    special_text_sources: list[str] = field(default_factory=list)


def install_chat_template(tokenizer, chat_template: Optional[str], model_name: str) -> None:
    """Use spec.model.chatTemplate when set (Jinja text or a name from NAMED_TEMPLATES);
    otherwise the tokenizer must bring its own."""
    if chat_template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(chat_template.strip().lower(), chat_template)
    elif not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer of {model_name} has no chat template; set spec.model.chatTemplate to the "
            f"model's Jinja chat template (or to 'chatml' to use ChatML explicitly), or use "
            f"spec.dataset.format text for plain-text training"
        )


def assistant_char_spans(tokenizer, messages: list[Message], text: Optional[str] = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation (`text` when already rendered) and the (start, end) characters
    of every assistant answer."""
    text = render_chat(tokenizer, messages, False) if text is None else text
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True)
        upto = render_chat(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns follow, so answer "
                "tokens cannot be located; set spec.model.chatTemplate to a template without that behaviour"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def _turns(ids: list[int], trained: list[bool]) -> list[tuple[list[int], list[int]]]:
    """Split a token sequence into (prompt, answer) pairs; tokens after the last answer are dropped."""
    turns, prompt, answer = [], [], []
    for token, is_answer in zip(ids, trained):
        if is_answer:
            answer.append(token)
        else:
            if answer:
                turns.append((prompt, answer))
                prompt, answer = [], []
            prompt.append(token)
    if answer:
        turns.append((prompt, answer))
    return turns


def truncate_turns(turns: list[tuple[list[int], list[int]]], limits: LengthLimits) -> list[tuple[list[int], list[int]]]:
    """Apply the documented truncation rules 1-4 (module docstring)."""
    out = []
    for prompt, answer in turns:
        if limits.max_target_length is not None:
            answer = answer[: limits.max_target_length]
        if limits.max_source_length is not None and len(prompt) > limits.max_source_length:
            prompt = prompt[len(prompt) - limits.max_source_length :]
        out.append((prompt, answer))
    total = sum(len(p) + len(a) for p, a in out)
    while total > limits.max_length and len(out) > 1:
        prompt, answer = out.pop()
        total -= len(prompt) + len(answer)
    if total > limits.max_length:
        prompt, answer = out[0]
        keep_prompt = max(limits.max_length // 2, limits.max_length - len(answer))
        prompt = prompt[max(0, len(prompt) - keep_prompt) :]
        answer = answer[: limits.max_length - len(prompt)]
        out = [(prompt, answer)]
    return out


def tokenize_messages(tokenizer, messages: list[Message], limits: LengthLimits) -> tuple[Sample, bool]:
    """(sample, truncated) for a chat sample rendered with the tokenizer's chat template."""
    enc = encode_chat(tokenizer, messages)
    _, spans = assistant_char_spans(tokenizer, messages, enc.text)
    # A token that straddles a span edge (e.g. " a" when the template puts a space before
    # the answer) is trained: otherwise the answer's first token would never be learned.
    trained = [any(start < hi and end > lo for lo, hi in spans) for start, end in enc.offsets]
    turns = _turns(enc.ids, trained)
    kept = truncate_turns(turns, limits)
    input_ids, labels = [], []
    for prompt, answer in kept:
        input_ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    truncated = kept != turns
    return _first_label_ignored(Sample(input_ids, labels)), truncated


def tokenize_text(tokenizer, text: str, limits: LengthLimits) -> tuple[Sample, bool]:
    """(sample, truncated) for plain text: every token is trained; special-token strings in the
    text are text, so the appended EOS is the sample's only EOS."""
    ids = encode_plain(tokenizer, text, add_special_tokens=True)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    truncated = len(ids) > limits.max_length
    ids = ids[: limits.max_length]
    return _first_label_ignored(Sample(ids, list(ids))), truncated


def _first_label_ignored(sample: Sample) -> Sample:
    if sample.labels:
        sample.labels[0] = IGNORE
    return sample


def _tokenize_chat(tokenizer, example, limits: LengthLimits) -> tuple[Sample, bool]:
    """tokenize_messages with errors that name the record (templates may refuse some turns)."""
    from jinja2.exceptions import TemplateError as JinjaError

    try:
        return tokenize_messages(tokenizer, example.messages, limits)
    except TemplateError as err:
        raise TemplateError(f"{example.source}: {err}") from None
    except JinjaError as err:
        raise TemplateError(
            f"{example.source}: the chat template refused this conversation ({err}); some templates accept no "
            "system turn or need strictly alternating turns: fix the data or set spec.model.chatTemplate"
        ) from None


def tokenize_examples(tokenizer, examples, limits: LengthLimits, plain_text: bool) -> tuple[list[Sample], TokenizeStats]:
    """Tokenize every example; samples without a trained token are dropped and counted, and
    samples whose text spells a special token are counted."""
    stats = TokenizeStats()
    samples = []
    spellings = set(special_tokens(tokenizer).values())
    for example in examples:
        if any(s in m["content"] for m in example.messages for s in spellings):
            stats.special_text += 1
            stats.special_text_sources.append(example.source)
        if plain_text:
            sample, truncated = tokenize_text(tokenizer, example.messages[0]["content"], limits)
        else:
            sample, truncated = _tokenize_chat(tokenizer, example, limits)
        stats.truncated += truncated
        if sample.trained_tokens == 0:
            stats.dropped += 1
            stats.dropped_sources.append(example.source)
            continue
        samples.append(sample)
    stats.samples = len(samples)
    return samples, stats
