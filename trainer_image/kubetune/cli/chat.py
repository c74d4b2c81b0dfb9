"""`kubetune chat URL|MODEL-URI`: talk to a served model, or serve a model location for the session."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from .serving import LocalServer, ServerError, chat_stream, served_model

PROMPT = "you> "


def chat_command(args) -> int:
    token = args.token or os.environ.get("KUBETUNE_SERVE_TOKEN") or None
    interactive = sys.stdin.isatty()
    with ExitStack() as stack:
        url = args.target
        if not url.startswith(("http://", "https://")):
            if interactive:
                print(f"loading {args.target} ...", file=sys.stderr)
            try:
                url = stack.enter_context(LocalServer(args.target, base_model=args.base_model)).url
            except ServerError as err:
                print(f"kubetune chat: {err}", file=sys.stderr)
                return 1
        try:
            model = served_model(url, token)
        except ServerError as err:
            print(f"kubetune chat: {err}", file=sys.stderr)
            return 1
        if interactive:
            print(f"chatting with {model} at {url} (Ctrl-D or /exit to leave, /reset to forget the conversation)", file=sys.stderr)
        history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        turns = list(history)
        while True:
            try:
                question = input(PROMPT if interactive else "")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not question.strip():
                continue
            if question.strip() in ("/exit", "/quit"):
                return 0
            if question.strip() == "/reset":
                turns = list(history)
                continue
            messages = (history if args.no_history else turns) + [{"role": "user", "content": question}]
            pieces = []
            try:
                for piece in chat_stream(url, model, messages, token=token, max_tokens=args.max_tokens, temperature=args.temperature):
                    pieces.append(piece)
                    print(piece, end="", flush=True)
            except ServerError as err:
                print(f"\nkubetune chat: {err}", file=sys.stderr)
                continue
            print()
            if not args.no_history:
                turns = messages + [{"role": "assistant", "content": "".join(pieces)}]
