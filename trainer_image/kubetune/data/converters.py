"""One converter per input format: a raw record becomes one message list, once, at the edge.

A message list is `[{"role": "system"|"user"|"assistant", "content": str}, ...]`: at most one
system message first, then user and assistant turns alternating, ending with an assistant turn.
Nothing downstream knows which format the user wrote. Plain text (format `text`, continued
pre-training) becomes a single assistant message that is tokenized without a chat template.

Column names come from `spec.dataset.columns`; unset columns take the format's defaults.
Errors raise `RecordError(field, message)`; the loader adds the file and line.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..api.spec import ColumnMapping

Message = dict[str, str]

# Default column names per format. A tuple lists accepted alternatives, tried in order,
# for formats whose files commonly use either name.
DEFAULT_COLUMNS: dict[str, dict[str, Any]] = {
    "prompt_response": {"prompt": "prompt", "query": None, "response": "response", "history": "history", "system": "system"},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"},
    "conversation": {"messages": "conversation"},
    "openai": {"messages": ("messages", "conversations")},
    "sharegpt": {"messages": ("conversations", "messages")},
    "text": {"text": ("text", "content")},
}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """A record does not fit its format. `field` is the path inside the record (e.g. conversations[2].from)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def resolve_columns(fmt: str, columns: ColumnMapping) -> dict[str, Any]:
    """The format's column names with the user's overrides applied."""
    resolved = dict(DEFAULT_COLUMNS[fmt])
    for key, value in columns.model_dump().items():
        if value is not None:
            if key not in resolved:
                raise ValueError(
                    f"spec.dataset.columns.{key} does not apply to format {fmt!r}; "
                    f"columns for {fmt!r}: {', '.join(sorted(DEFAULT_COLUMNS[fmt]))}"
                )
            resolved[key] = value
    return resolved


def _column(record: dict, names: Any, required: bool) -> tuple[Optional[str], Any]:
    """(column name found, value) for a column that may have alternative names."""
    candidates = names if isinstance(names, tuple) else (names,)
    for name in candidates:
        if name is not None and name in record and record[name] is not None:
            return name, record[name]
    if required:
        shown = " or ".join(repr(n) for n in candidates)
        raise RecordError(candidates[0], f"missing (expected column {shown}; set spec.dataset.columns to rename)")
    return None, None


def _text(value: Any, field: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordError(field, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RecordError(field, f"contains an unpaired surrogate ({value[err.start]!r} escape) that no tokenizer can encode") from None
    if not allow_empty and not value.strip():
        raise RecordError(field, "is empty")
    return value


def _prompt_response(record: dict, cols: dict[str, Any]) -> list[Message]:
    messages: list[Message] = []
    name, system = _column(record, cols["system"], required=False)
    if system is not None and _text(system, name):
        messages.append({"role": "system", "content": system})
    name, history = _column(record, cols["history"], required=False)
    if history is not None:
        if not isinstance(history, list):
            raise RecordError(name, f"expected a list of [question, answer] pairs, got {type(history).__name__}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise RecordError(f"{name}[{i}]", "expected a [question, answer] pair")
            messages.append({"role": "user", "content": _text(pair[0], f"{name}[{i}][0]")})
            messages.append({"role": "assistant", "content": _text(pair[1], f"{name}[{i}][1]")})
    pname, prompt = _column(record, cols["prompt"], required=True)
    prompt = _text(prompt, pname, allow_empty=False)
    qname, query = _column(record, cols["query"], required=False)
    if query is not None and _text(query, qname).strip():
        prompt = f"{prompt}\n{query}"
    rname, response = _column(record, cols["response"], required=True)
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(response, rname, allow_empty=False)})
    return messages


def _turn_list(record: dict, cols: dict[str, Any]) -> tuple[str, list]:
    name, turns = _column(record, cols["messages"], required=True)
    if not isinstance(turns, list) or not turns:
        raise RecordError(name, "expected a non-empty list of turns")
    return name, turns


def _conversation(record: dict, cols: dict[str, Any]) -> list[Message]:
    """{"conversation": [{"system"?: .., "input": .., "output": ..}, ...]} (Firefly/ChatGLM style)."""
    name, turns = _turn_list(record, cols)
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with input and output, got {type(turn).__name__}")
        if turn.get("system") is not None:
            if i != 0:
                raise RecordError(f"{where}.system", "only the first turn may carry a system prompt")
            if _text(turn["system"], f"{where}.system"):
                messages.append({"role": "system", "content": turn["system"]})
        for key, role in (("input", "user"), ("output", "assistant")):
            if key not in turn:
                raise RecordError(f"{where}.{key}", "missing")
            messages.append({"role": role, "content": _text(turn[key], f"{where}.{key}", allow_empty=False)})
    return messages


def _role_content_list(record: dict, cols: dict[str, Any], role_key: str, content_key: str, roles: dict[str, str]) -> list[Message]:
    name, turns = _turn_list(record, cols)
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with {role_key} and {content_key}, got {type(turn).__name__}")
        for key in (role_key, content_key):
            if key not in turn:
                raise RecordError(f"{where}.{key}", "missing")
        role = turn[role_key]
        if role not in roles:
            raise RecordError(f"{where}.{role_key}", f"expected one of {', '.join(roles)}, got {role!r}")
        messages.append({"role": roles[role], "content": _text(turn[content_key], f"{where}.{content_key}")})
    _check_order(messages, name, role_key)
    return messages


def _check_order(messages: list[Message], name: str, role_key: str) -> None:
    """System first (optional), then user/assistant alternating, ending with the assistant."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    expected = "user"
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role != expected:
            hint = "a system turn is allowed only first" if role == "system" else "user and assistant turns must alternate, starting with user"
            raise RecordError(f"{name}[{i}].{role_key}", f"expected a {expected} turn, got {role} ({hint})")
        expected = "assistant" if role == "user" else "user"
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise RecordError(name, "must end with an assistant turn (nothing to train on otherwise)")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise RecordError(name, "every assistant turn is empty")


def _openai(record: dict, cols: dict[str, Any]) -> list[Message]:
    roles = {"system": "system", "user": "user", "assistant": "assistant"}
    return _role_content_list(record, cols, "role", "content", roles)


def _sharegpt(record: dict, cols: dict[str, Any]) -> list[Message]:
    return _role_content_list(record, cols, "from", "value", SHAREGPT_ROLES)


def _text_record(record: dict, cols: dict[str, Any]) -> list[Message]:
    name, text = _column(record, cols["text"], required=True)
    return [{"role": "assistant", "content": _text(text, name, allow_empty=False)}]


CONVERTERS: dict[str, Callable[[dict, dict[str, Any]], list[Message]]] = {
    "prompt_response": _prompt_response,
    "alpaca": _prompt_response,
    "conversation": _conversation,
    "openai": _openai,
    "sharegpt": _sharegpt,
    "text": _text_record,
}


def to_messages(record: Any, fmt: str, cols: dict[str, Any]) -> list[Message]:
    """Convert one raw record of format `fmt` (columns from `resolve_columns`) to messages."""
    if not isinstance(record, dict):
        raise RecordError("record", f"expected a JSON object, got {type(record).__name__}")
    return CONVERTERS[fmt](record, cols)
