"""Chat: conversations rendered by the model's own chat template, and replies generated from them.

    reply = model.chat([{"role": "user", "content": "Hello"}], temperature=0)
    reply.text                      # the assistant's message
    for step in model.chat(messages, stream=True):
        print(step.text, end="")

A chat template is the Jinja program a model ships (``chat_template`` in
``tokenizer_config.json``, a ``chat_template.jinja`` file, or the GGUF key
``tokenizer.chat_template``) that turns a list of messages into the text the
model was trained on. It is rendered as Hugging Face transformers'
``apply_chat_template`` renders it, so a prompt is the same token for token:
a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the
loop-control extension, the ``{% generation %}`` block, the globals
``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``, a ``tojson``
filter that does not escape HTML, the special-token strings (``bos_token``,
``eos_token``, ...) and ``tools`` / ``documents`` / ``add_generation_prompt``
as variables. The rendered text already holds the template's special tokens,
so it is encoded without adding a BOS of the tokenizer's own.

Generation stops at the end of the assistant's turn: the end-of-sequence ids
plus the end-of-turn markers the template writes (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``, ...).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ChatTemplateError, CheckpointError, InvalidArgumentError

# Tokens that templates write to close a turn; each one that the template
# uses and the vocabulary holds as a single token ends generation.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                       "</s>", "<|END_OF_TURN_TOKEN|>", "<|return|>", "<|call|>", "<|end_of_text|>")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older and newer names of a message's reasoning text, filled in from each other as transformers does.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# The largest `str * n` or `list * n` a template may build, and the bits of the largest `a ** b`.
MAX_TEMPLATE_ITEMS = 1_000_000
MAX_TEMPLATE_POWER_BITS = 100_000
# A field width in a format string ('%10000000000s', '{:>10000000000}'): seven digits or more.
_HUGE_WIDTH = re.compile(r"%[-+ #0]*(\*|\d{7,})|\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def _refuse_huge_sizes(args: tuple, kwargs: dict) -> None:
    """Refuse a call or filter given an integer beyond MAX_TEMPLATE_ITEMS (a width, a count)."""
    import jinja2

    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_ITEMS:
            raise jinja2.exceptions.SecurityError(f"a size of more than {MAX_TEMPLATE_ITEMS} is refused")


def _refuse_huge_widths(fmt: str) -> None:
    import jinja2

    if _HUGE_WIDTH.search(fmt):
        raise jinja2.exceptions.SecurityError("a field width of a million or more is refused")


# ---------------------------------------------------------------- the Jinja environment

def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


_ENVIRONMENT = None


def _environment():
    """The one sandboxed environment every template is compiled in (built on first use)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text; rendering keeps the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeDict:
        """``dict(...)`` and ``dict.fromkeys`` for templates, without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class SafeNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            # The one place state crosses loop iterations: `ns.s = ns.s ~ ns.s` must not double forever.
            if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_ITEMS:
                raise jinja2.exceptions.SecurityError(
                    f"a value of more than {MAX_TEMPLATE_ITEMS} items is refused")
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"templates cannot set the attribute {name!r} on a namespace")

    def bounded_filter(name, f):
        """A filter whose parameters (after the value) may not ask for a huge size: `center(10**10)`;
        `format`'s value is a format string, whose field widths are bounded too."""
        skip = 2 if getattr(f, "jinja_pass_arg", None) else 1  # the context or environment, then the value

        @functools.wraps(f)
        def bounded(*args, **kwargs):
            _refuse_huge_sizes(args[skip:], kwargs)
            if name == "format" and len(args) >= skip and isinstance(args[skip - 1], str):
                _refuse_huge_widths(args[skip - 1])
            return f(*args, **kwargs)
        return bounded

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, refusing operations whose result would be huge: a template comes from the
        checkpoint, and ``'a' * 10**10`` (or ``'x'.ljust(10**10)``, ``'%10000000000s' % 1``) in it must not
        exhaust the memory of whoever renders it."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _refuse_huge_sizes(args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                _refuse_huge_widths(owner)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value):
            # Since jinja2 3.1.5 `'...'.format` is wrapped at attribute access, before `call` sees it.
            owner = getattr(value, "__self__", None)
            if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
                _refuse_huge_widths(owner)
            return super().wrap_str_format(value)

        def call_binop(self, context, operator, left, right):
            if operator == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                        and len(left) + len(right) > MAX_TEMPLATE_ITEMS:
                    raise jinja2.exceptions.SecurityError(
                        f"a value of more than {MAX_TEMPLATE_ITEMS} items is refused")
            elif operator == "%":
                if isinstance(left, str):
                    _refuse_huge_widths(left)
            elif operator == "*":
                for items, count in ((left, right), (right, left)):
                    if isinstance(items, (str, list, tuple)) and isinstance(count, int) \
                            and len(items) * count > MAX_TEMPLATE_ITEMS:
                        raise jinja2.exceptions.SecurityError(
                            f"a repetition of more than {MAX_TEMPLATE_ITEMS} items is refused")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > MAX_TEMPLATE_POWER_BITS:
                raise jinja2.exceptions.SecurityError("a power this large is refused")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters = {name: bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = SafeDict()
    env.globals["namespace"] = SafeNamespace
    _ENVIRONMENT = env
    return env


def _plain(value: Any) -> Any:
    """Rebuild template input from plain JSON types: the sandbox sees no methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _messages(messages: Any) -> list[dict]:
    """Check and normalise a conversation: dicts, keys whose value is None dropped, reasoning aliased."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgumentError(f"messages: must be a list of {{'role': ..., 'content': ...}} dicts, "
                                   f"got {messages!r}")
    if not messages:
        raise InvalidArgumentError("messages: the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if dataclasses.is_dataclass(m) and not isinstance(m, type):
            m = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        elif callable(getattr(m, "model_dump", None)):
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}]: must be a dict with 'role' and 'content', got {m!r}")
        if not isinstance(m.get("role"), str):
            raise InvalidArgumentError(f"messages[{i}].role: must be a string, got {m.get('role')!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ---------------------------------------------------------------- templates

class ChatTemplate:
    """A model's chat template(s) and the special-token strings they may refer to.

    `source` is one template, or named templates ({"default": ..., "tool_use": ...})
    as tokenizer_config.json may list them. `special_tokens` maps names such as
    "bos_token" to their text.
    """

    def __init__(self, source: str | Mapping[str, str], special_tokens: Mapping[str, str] | None = None):
        if isinstance(source, str):
            self.templates = {"default": source}
            self.named = False
        elif isinstance(source, Mapping) and source and all(isinstance(k, str) and isinstance(v, str)
                                                              for k, v in source.items()):
            self.templates = dict(source)
            self.named = True
        else:
            raise ChatTemplateError(f"a chat template must be a string or a mapping of names to strings, "
                                    f"got {source!r}")
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self._compiled: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ChatTemplate({sorted(self.templates)})"

    @property
    def text(self) -> str:
        """Every template's source joined (to look for the markers they write)."""
        return "\n".join(self.templates.values())

    def select(self, name: str | None = None, tools=None) -> str:
        """The template to use: `name`, else "tool_use" when tools are given and one exists, else "default"."""
        if name is not None:
            if name not in self.templates:
                raise ChatTemplateError(f"no chat template named {name!r}; this model has {sorted(self.templates)}")
            return name
        if not self.named:
            return "default"
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ChatTemplateError(f"this model has several chat templates {sorted(self.templates)} and none is "
                                f"named 'default'; choose one with template_name=")

    def _compiled_template(self, name: str):
        if name not in self._compiled:
            import jinja2

            try:
                self._compiled[name] = _environment().from_string(self.templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template {name!r} does not compile: {e.message} "
                                        f"(line {e.lineno})") from None
            except (RecursionError, MemoryError, ValueError, OverflowError) as e:  # e.g. nested too deeply
                raise ChatTemplateError(f"chat template {name!r} does not compile ({type(e).__name__})") from None
        return self._compiled[name]

    def render(self, messages, tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = False, continue_final_message: bool | str = False,
               template_name: str | None = None, **variables: Any) -> str:
        """The conversation as the model's prompt text.

        `tools` are JSON schemas, `documents` dicts (e.g. with "title" and
        "text"); both are passed through to templates that use them.
        `continue_final_message` leaves the last message open for the model
        to continue (the name of the field to continue, or True for
        "content"). Further keywords become template variables and override
        the special-token strings.
        """
        import jinja2

        chat = _messages(messages)
        if continue_final_message and add_generation_prompt:
            raise InvalidArgumentError("continue_final_message and add_generation_prompt cannot both be set")
        if tools is not None:
            if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
                raise InvalidArgumentError(f"tools: must be a list of JSON schemas (dicts), got {tools!r}")
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):
                    raise InvalidArgumentError(f"tools[{i}]: must be a JSON schema (a dict), got {t!r}")
        if documents is not None:
            if isinstance(documents, (str, Mapping)) or not isinstance(documents, Sequence):
                raise InvalidArgumentError(f"documents: must be a list of dicts, got {documents!r}")
            for i, d in enumerate(documents):
                if not isinstance(d, Mapping):
                    raise InvalidArgumentError(f"documents[{i}]: must be a dict (e.g. with 'title' and 'text'), "
                                               f"got {d!r}")
        name = self.select(template_name, tools)
        template = self._compiled_template(name)
        final = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = chat[-1].get(field)
            if not isinstance(final, str):
                raise InvalidArgumentError(f"continue_final_message: the last message has no text {field!r} "
                                           f"to continue")
            chat[-1][field] = final + _CONTINUE_TAG
        context = {**self.special_tokens, **_plain(variables)}
        try:
            text = template.render(messages=chat, tools=_plain(list(tools) if tools is not None else None),
                                   documents=_plain(list(documents) if documents is not None else None),
                                   add_generation_prompt=bool(add_generation_prompt), **context)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {name!r}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RecursionError, MemoryError) as e:
            # Python errors raised while the template ran on this input (e.g. iterating absent tools).
            raise ChatTemplateError(f"chat template {name!r} failed on this conversation: "
                                    f"{type(e).__name__}: {e}") from None
        if final is not None:
            at = text.rfind(_CONTINUE_TAG.strip())
            if at < 0:
                raise InvalidArgumentError("continue_final_message: the template does not render the final message")
            # Templates that keep spacing leave the tag whole; others trimmed the text after it.
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_from_ids(tokenizer) -> dict[str, str]:
    out = {}
    if tokenizer is not None and tokenizer.bos_id is not None:
        out["bos_token"] = tokenizer.piece(tokenizer.bos_id)
    if tokenizer is not None and tokenizer.eos_ids:
        out["eos_token"] = tokenizer.piece(tokenizer.eos_ids[0])
    return out


def template_from_hf_directory(directory, tokenizer=None) -> ChatTemplate | None:
    """The chat template of a Hugging Face model directory, or None.

    ``chat_template.jinja`` wins over ``tokenizer_config.json``'s
    ``chat_template`` (as transformers decides); named templates
    (``[{"name": ..., "template": ...}]`` or ``chat_template.json``) are kept by name.
    """
    from .loading.fields import MAX_JSON_BYTES, open_regular, read_json

    directory = Path(directory)
    config: dict = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.exists():
        config = read_json(cfg_path, "tokenizer_config.json")
    source: Any = None
    where = cfg_path
    if (directory / "chat_template.jinja").exists():
        where = directory / "chat_template.jinja"
        with open_regular(where, "chat_template.jinja") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
        try:
            if len(data) > MAX_JSON_BYTES:
                raise InvalidArgumentError("too large")
            source = data.decode("utf-8")
        except ValueError:
            raise CheckpointError(f"chat_template.jinja is not UTF-8 text of at most {MAX_JSON_BYTES} bytes",
                                  path=where) from None
    elif (directory / "chat_template.json").exists():
        where = directory / "chat_template.json"
        source = read_json(where, "chat_template.json").get("chat_template")
    else:
        source = config.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):
        try:
            source = {item["name"]: item["template"] for item in source}
        except (TypeError, KeyError):
            raise CheckpointError("chat_template must be a string or a list of {'name', 'template'} entries",
                                  path=where, field="chat_template") from None
    if not (isinstance(source, str) or (isinstance(source, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in source.items()))):
        raise CheckpointError(f"chat_template must be text or named texts, not {type(source).__name__}",
                              path=where, field="chat_template")
    special = _special_tokens_from_ids(tokenizer)
    for key in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(key))
        if text is not None:
            special[key] = text
    return ChatTemplate(source, special)


def template_from_gguf(metadata: Mapping[str, Any], tokenizer=None) -> ChatTemplate | None:
    """``tokenizer.chat_template`` of a GGUF file, with named ones (``tokenizer.chat_template.NAME``)."""
    source: dict[str, str] = {}
    default = metadata.get("tokenizer.chat_template")
    if isinstance(default, str):
        source["default"] = default
    names = metadata.get("tokenizer.chat_templates")
    for name in names if isinstance(names, (list, tuple)) else ():
        text = metadata.get(f"tokenizer.chat_template.{name}")
        if isinstance(name, str) and isinstance(text, str):
            source[name] = text
    if not source:
        return None
    return ChatTemplate(source["default"] if list(source) == ["default"] else source,
                        _special_tokens_from_ids(tokenizer))


def end_of_turn_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Ids that end the assistant's turn: end-of-sequence ids and the turn-closing markers the template writes."""
    ids = list(tokenizer.eos_ids)
    markers = list(END_OF_TURN_MARKERS)
    eos_text = template.special_tokens.get("eos_token")
    if eos_text:
        markers.append(eos_text)
    text = template.text
    for marker in markers:
        if marker in text or marker == eos_text:
            tid = tokenizer.inner.token_to_id(marker)
            if tid is not None and tid not in ids:
                ids.append(int(tid))
    return ids


# ---------------------------------------------------------------- chat with a model

@dataclasses.dataclass
class ChatReply:
    """The assistant's reply: its text, the rendered prompt and the underlying Generation."""

    text: str
    prompt: str
    generation: Any

    @property
    def message(self) -> dict:
        return {"role": "assistant", "content": self.text}

    @property
    def finish_reason(self) -> str:
        return self.generation.finish_reason


def template_of(model, chat_template: str | Mapping[str, str] | ChatTemplate | None = None) -> ChatTemplate:
    """The template to use: the one given, else the model's own; a clear error when there is none."""
    tok = model.tokenizer
    if tok is None:
        raise InvalidArgumentError("this model has no tokenizer, so it cannot chat")
    if chat_template is None:
        found = getattr(tok, "chat_template", None)
        if found is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json, chat_template.jinja "
                                    "or GGUF tokenizer.chat_template); pass chat_template=")
        return found
    if isinstance(chat_template, ChatTemplate):
        return chat_template
    own = getattr(tok, "chat_template", None)
    special = own.special_tokens if own is not None else _special_tokens_from_ids(tok)
    return ChatTemplate(chat_template, special)


def prepare(model, messages, *, tools=None, documents=None, chat_template=None, template_name=None,
            add_generation_prompt: bool = True, template_kwargs: Mapping[str, Any] | None = None):
    """Render a conversation: (prompt text, prompt ids, end-of-turn ids)."""
    template = template_of(model, chat_template)
    text = template.render(messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                           template_name=template_name, **dict(template_kwargs or {}))
    ids = model.tokenizer.encode(text, special=False)
    if not ids:
        raise InvalidArgumentError("messages: the chat template rendered an empty prompt")
    return text, ids, end_of_turn_ids(model.tokenizer, template)


def chat(model, messages, *, tools=None, documents=None, chat_template=None, template_name=None,
         template_kwargs: Mapping[str, Any] | None = None, max_new_tokens: int = 256, stream: bool = False,
         eos_ids=None, **options: Any) -> ChatReply | Iterator:
    """The assistant's reply to `messages` (a list of {"role", "content"} dicts).

    Sampling options are those of `generate` (temperature, top_p, seed, stop,
    logprobs, top_n, ...). Generation ends at the end of the assistant's turn.
    With stream=True, an iterator of generation Steps (their `text` joined is
    the reply).
    """
    from .generation import generate

    text, ids, end_ids = prepare(model, messages, tools=tools, documents=documents, chat_template=chat_template,
                                 template_name=template_name, template_kwargs=template_kwargs)
    gen = generate(model, ids, max_new_tokens=max_new_tokens, stream=stream,
                   eos_ids=end_ids if eos_ids is None else eos_ids, **options)
    if stream:
        return gen
    return ChatReply(gen.text, text, gen)
