"""An Ollama Modelfile beside an exported GGUF: chat template, default system prompt, stop tokens.

Ollama templates are Go templates, not Jinja. A Jinja template cannot be translated in general,
but most chat templates put each message as HEAD(role) + content + TAIL(role) (ChatML, Llama 3,
Qwen2, SmolLM). We find those pieces by rendering conversations with sentinel contents, then
re-render a few conversations from the pieces and compare with Jinja: only if they agree
exactly is a TEMPLATE written. Otherwise the Modelfile says so and leaves the template to Ollama,
which reads `tokenizer.chat_template` from the GGUF and matches it against the ones it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from tunesmith.data.tokenize import adds_bos, render, turn_end_token

_S, _U, _A, _V = "\x00SYS\x00", "\x00USER\x00", "\x00ASSISTANT\x00", "\x00NEXT\x00"


@dataclass
class ChatPieces:
    """The literal text around each message, as the chat template writes it."""

    prefix: str  # before the first message (e.g. BOS)
    heads: dict[str, str]  # role -> text before the content
    tails: dict[str, str]  # role -> text after the content
    default_system: str | None  # the system prompt the template inserts when there is none

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        """What the Go template below produces for ``messages`` (with Ollama's SYSTEM default)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.prefix + "".join(self.heads[m["role"]] + m["content"] + self.tails[m["role"]] for m in messages)
        return text + (self.heads["assistant"] if generation_prompt else "")

    def go_template(self) -> str:
        branches = "".join(
            f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{self.heads[role]}{{{{ .Content }}}}{self.tails[role]}"
            for index, role in enumerate(("system", "user", "assistant")))
        return f"{self.prefix}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{self.heads['assistant']}"


def _between(text: str, *markers: str) -> list[str] | None:
    """``text`` cut at each marker in order: len(markers) + 1 pieces, or None if one is missing."""
    pieces, rest = [], text
    for marker in markers:
        if marker not in rest:
            return None
        before, rest = rest.split(marker, 1)
        pieces.append(before)
    return [*pieces, rest]


def chat_pieces(tokenizer: PreTrainedTokenizerBase) -> ChatPieces | None:
    """The template's pieces, or None if it does not have the HEAD + content + TAIL shape."""
    try:
        full = render(tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U},
                                  {"role": "assistant", "content": _A}, {"role": "user", "content": _V}], True)
        closed = render(tokenizer, [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}], False)
    except Exception:  # a template that refuses these conversations
        return None
    parts, closing = _between(full, _S, _U, _A, _V), _between(closed, _U, _A)
    if parts is None or closing is None:
        return None
    before_system, system_to_user, user_to_assistant, assistant_to_user, generation = parts
    assistant_tail = closing[2]
    if generation != user_to_assistant or not assistant_to_user.startswith(assistant_tail):
        return None
    user_head = assistant_to_user[len(assistant_tail):]
    if "user" not in user_head:
        return None
    heads = {role: user_head.replace("user", role) for role in ("system", "user", "assistant")}
    if not (user_to_assistant.endswith(heads["assistant"]) and system_to_user.endswith(user_head)
            and before_system.endswith(heads["system"])):
        return None
    tails = {"system": system_to_user[:len(system_to_user) - len(user_head)],
             "user": user_to_assistant[:len(user_to_assistant) - len(heads["assistant"])],
             "assistant": assistant_tail}
    prefix = before_system[:len(before_system) - len(heads["system"])]
    default_system = None
    lead = closing[0]
    if lead != prefix + user_head:
        start, end = prefix + heads["system"], tails["system"] + user_head
        if not (lead.startswith(start) and lead.endswith(end)):
            return None
        default_system = lead[len(start):len(lead) - len(end)]
    pieces = ChatPieces(prefix, heads, tails, default_system)
    return pieces if _agrees(pieces, tokenizer) else None


def _agrees(pieces: ChatPieces, tokenizer: PreTrainedTokenizerBase) -> bool:
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
    ]
    return all(pieces.render(c) == render(tokenizer, c, generation_prompt=True) for c in conversations)


def _quoted(text: str) -> str:
    return f'"""{text}"""'


def modelfile(tokenizer: PreTrainedTokenizerBase, gguf_name: str, source: str) -> str:
    """The Modelfile text for ``gguf_name`` (a file in the same folder)."""
    lines = [f"# Written by tunesmith from {source}.", "# Create the model: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    pieces = chat_pieces(tokenizer)
    bos = tokenizer.bos_token
    if pieces is not None and bos and pieces.prefix.startswith(bos) and adds_bos(tokenizer):
        # The GGUF says add_bos_token, so Ollama adds BOS itself: a second one from the template would
        # be a double BOS (a known cause of degraded output).
        pieces.prefix = pieces.prefix[len(bos):]
    literal = "" if pieces is None else pieces.prefix + "".join(pieces.heads.values()) + "".join(pieces.tails.values())
    if pieces is None or '"""' in literal or "{{" in literal:  # would end the quotes or open a Go action
        lines.append("# The chat template could not be written as a Go template; Ollama reads it from the GGUF.")
    else:
        lines.append(f"TEMPLATE {_quoted(pieces.go_template())}")
        if pieces.default_system and '"""' not in pieces.default_system:
            lines.append(f"SYSTEM {_quoted(pieces.default_system)}")
    stops = []
    for token in (turn_end_token(tokenizer), tokenizer.eos_token):
        if token and token not in stops:
            stops.append(token)
    lines += [f'PARAMETER stop "{token}"' for token in stops]
    return "\n".join(lines) + "\n"
