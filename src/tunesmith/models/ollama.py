"""An Ollama model directory: the GGUF plus a Modelfile (`ollama create NAME -f DIR/Modelfile`).

Ollama does not run the model's Jinja chat template: its Modelfile carries a TEMPLATE in Go's text/template
syntax, executed with `.Messages` (each with `.Role` and `.Content`). Rather than translating Jinja source,
the template's shape is read off what it renders for probe conversations: text before the first message,
each message as OPEN + role + CLOSE + content + END, and the assistant's opening when a reply is wanted
(ChatML, Llama 3 and most chat templates have this shape). The shape is then checked against the Jinja
template on several conversations, and a template it does not reproduce is refused, never approximated.

A default system prompt the template adds when a conversation has none (SmolLM2's "You are a helpful AI
assistant named SmolLM ...") becomes the Modelfile's SYSTEM, which Ollama sends as the first message
whenever the request has no system message of its own: the same behaviour. The run's data.system_prompt,
when set, takes that place, as it did in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

MODELFILE_NAME = "Modelfile"
# Probe contents: plain words no template adds, trims or escapes.
_SYSTEM, _USER, _ASSISTANT, _USER_AGAIN = "probesystemtext", "probeusertext", "probeassistanttext", "probeuserturn"


@dataclass(frozen=True)
class ChatShape:
    """A chat template that wraps every message alike."""

    begin: str  # before the first message (e.g. a BOS written by the template)
    open: str  # before the role name
    close: str  # between the role name and the content
    end: str  # after the content
    generation: str  # the assistant's opening, when a reply is wanted
    default_system: str | None  # the system message the template adds to a conversation without one

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """What the template renders, by this shape (the reference the Go template must equal)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.begin + "".join(self.open + m["role"] + self.close + m["content"] + self.end for m in messages)
        return text + (self.generation if generation_prompt else "")


def read_chat_shape(tokenizer: Any) -> ChatShape:
    """The shape of `tokenizer`'s chat template, checked against it; a UserError when it has another."""
    if not tokenizer.chat_template:
        raise _untranslatable("the tokenizer has no chat template")
    try:
        return _checked(
            _probe_shape(
                lambda messages, generation: tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation
                )
            )
        )
    except UserError:
        raise
    except Exception as error:  # a template that raises for a probe (e.g. one that refuses system messages)
        raise _untranslatable(f"rendering a probe conversation failed: {error}") from error


def _probe_shape(render: Any) -> ChatShape:
    turns = [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _ASSISTANT},
        {"role": "user", "content": _USER_AGAIN},
    ]
    full = render(turns, False)
    with_reply = render(turns, True)
    if not with_reply.startswith(full):
        raise _untranslatable("the generation prompt is not added at the end")
    pieces = _split_on(full, [_SYSTEM, _USER, _ASSISTANT, _USER_AGAIN])
    if pieces is None:
        raise _untranslatable("a probe message's content does not appear once, unchanged, in order")
    before_system, system_to_user, _, _, end = pieces
    role_and_after = system_to_user[len(end) :] if system_to_user.startswith(end) else None
    if not end or role_and_after is None or role_and_after.count("user") != 1:
        raise _untranslatable("messages are not each wrapped as OPEN + role + CLOSE + content + END")
    open_marker, close_marker = role_and_after.split("user")
    system_header = open_marker + "system" + close_marker
    if not before_system.endswith(system_header):
        raise _untranslatable("the system message is wrapped unlike the others")
    shape = ChatShape(
        before_system[: len(before_system) - len(system_header)],
        open_marker,
        close_marker,
        end,
        with_reply[len(full) :],
        None,
    )
    # A conversation without a system message: either nothing is added, or one fixed default system message.
    alone = render([{"role": "user", "content": _USER}], False)
    if alone == shape.render([{"role": "user", "content": _USER}], False):
        return shape
    start = shape.begin + system_header
    user_part = shape.open + "user" + shape.close + _USER + shape.end
    if alone.startswith(start) and alone.endswith(shape.end + user_part):
        default = alone[len(start) : len(alone) - len(shape.end + user_part)]
        return ChatShape(shape.begin, shape.open, shape.close, shape.end, shape.generation, default)
    raise _untranslatable("a conversation without a system message is rendered in a way Ollama cannot reproduce")


def _checked(shape: ChatShape) -> ChatShape:
    for text in (shape.begin, shape.open, shape.close, shape.end, shape.generation, shape.default_system or ""):
        if "{{" in text or '"""' in text:
            raise _untranslatable(f"its markup {text!r} contains '{{{{' or '\"\"\"', which a Modelfile cannot quote")
    return shape


def _split_on(text: str, contents: list[str]) -> list[str] | None:
    """`text` cut at each of `contents` (each occurring exactly once, in order): the len(contents)+1 pieces between."""
    pieces = []
    for content in contents:
        if text.count(content) != 1:
            return None
        before, text = text.split(content)
        pieces.append(before)
    return pieces + [text]


def verify_chat_shape(shape: ChatShape, tokenizer: Any) -> None:
    """The shape renders what the Jinja template renders, on conversations unlike the probes."""
    conversations = [
        [{"role": "user", "content": "Hello there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
        [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "3"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            if jinja != shape.render(messages, generation):
                raise _untranslatable(f"it renders {messages} unlike the shape read from it")


def go_template(shape: ChatShape, runtime_adds_bos: str | None = None) -> str:
    """The Ollama TEMPLATE: Go text/template over .Messages, with the assistant's opening after the last
    message unless that message is the assistant's own (a reply being continued).

    `runtime_adds_bos`: the BOS text llama.cpp itself puts first (the GGUF's add_bos_token); a template that
    writes it too would give two, so the TEMPLATE leaves it out.
    """
    begin = shape.begin
    if runtime_adds_bos and begin.startswith(runtime_adds_bos):
        begin = begin[len(runtime_adds_bos) :]
    return (
        f"{begin}{{{{ range $index, $message := .Messages }}}}{shape.open}{{{{ $message.Role }}}}{shape.close}"
        f"{{{{ $message.Content }}}}{shape.end}{{{{ if and (eq (len (slice $.Messages $index)) 1) "
        f'(ne $message.Role "assistant") }}}}{shape.generation}{{{{ end }}}}{{{{ end }}}}'
    )


def stop_sequences(shape: ChatShape, eos_token: str | None) -> list[str]:
    """Where a reply ends: the end-of-message marker, the tokenizer's EOS, and the start of a next message."""
    candidates = [shape.end.strip(), eos_token or "", shape.open.strip()]
    stops = []
    for stop in candidates:
        if stop and stop not in stops and '"' not in stop and "\n" not in stop:
            stops.append(stop)
    return stops


def write_modelfile(directory: Path, gguf_name: str, tokenizer: Any, system_prompt: str | None) -> Path:
    """DIR/Modelfile for the GGUF DIR/`gguf_name`, whose chat template is `tokenizer`'s."""
    shape = read_chat_shape(tokenizer)
    verify_chat_shape(shape, tokenizer)
    system = system_prompt if system_prompt is not None else shape.default_system
    if system is not None and '"""' in system:
        raise UserError(
            f'data.system_prompt {system!r} contains \'"""\', which a Modelfile cannot quote; '
            f"fix: remove the triple quote from data.system_prompt, or export --to gguf"
        )
    adds_bos = tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] else None
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(shape, adds_bos)}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_sequences(shape, tokenizer.eos_token)]
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    modelfile = Path(directory) / MODELFILE_NAME
    modelfile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return modelfile


def _untranslatable(reason: str) -> UserError:
    return UserError(
        f"cannot write an Ollama TEMPLATE for this model's chat template: {reason}; fix: export "
        f"--to gguf (llama.cpp and LM Studio use the template stored in the file) and write the "
        f"Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)"
    )
