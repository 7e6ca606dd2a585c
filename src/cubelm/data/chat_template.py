"""Chat templates: Jinja rendering in a sandbox, with the environment and variables transformers gives a template.

Chat templates ship with model directories and are untrusted code, so they run in Jinja's
``ImmutableSandboxedEnvironment``. The environment matches ``transformers.apply_chat_template`` so that a model's
template renders the same text here: ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension
(``{% break %}``), a ``{% generation %}`` block (rendered as its body), a ``tojson`` filter without HTML escaping
(with ``indent``/``separators``/``sort_keys``), and the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace`` (which refuses underscore names). A template sees ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's special tokens as strings (``bos_token``, ``eos_token``, ...) and any
extra keyword arguments. Messages are copied to plain JSON data first, keys whose value is None are dropped (many
templates print "None" otherwise), and reasoning given as ``thinking``/``reasoning`` is also passed as
``reasoning_content``, as transformers does.

Template errors, including a template's own ``raise_exception(...)``, are ``CubelmError`` carrying the template's
message; the server answers them with HTTP 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cubelm.errors import CubelmError

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read


def select_template(templates: str | Mapping[str, str] | None, *, name: str | None = None, tools=None,
                    where: str = "this tokenizer") -> str:
    """The template to render: the only one, or from named templates ``name``, else ``tool_use`` when tools are
    given, else ``default``."""
    if templates is None:
        raise CubelmError(f"{where} has no chat template (no chat_template.jinja and no chat_template in "
                          "tokenizer_config.json); send a plain prompt to /v1/completions instead, or add a template")
    if isinstance(templates, str):
        return templates if name is None else _named({"default": templates}, name, where)
    if name is not None:
        return _named(templates, name, where)
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise CubelmError(f"{where} has several chat templates ({', '.join(sorted(templates))}) and none is named "
                      "'default'; choose one by name")


def _named(templates: Mapping[str, str], name: str, where: str) -> str:
    if name not in templates:
        raise CubelmError(f"{where} has no chat template named {name!r}; it has {', '.join(sorted(templates))}")
    return templates[name]


def render(template: str, messages: Sequence[Mapping], *, add_generation_prompt: bool = False,
           special_tokens: Mapping[str, str] | None = None, tools: list | None = None,
           documents: list | None = None, **kwargs) -> str:
    """Render one conversation. ``special_tokens`` maps ``bos_token`` & co. to their strings; ``kwargs`` override
    them and reach the template as extra variables (e.g. ``enable_thinking``, ``date_string``)."""
    if not messages:
        raise CubelmError("a chat needs at least one message")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise CubelmError(f"a chat message must be an object with 'role' and 'content', got {message!r}")
        chat.append(_with_reasoning(_plain({k: v for k, v in message.items() if v is not None})))
    variables = _plain({**(special_tokens or {}), **kwargs})
    compiled = _compile(template)
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:  # raise_exception, sandbox violations, calling an undefined name
        raise CubelmError(f"chat template error: {e.message or type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise CubelmError(f"chat template error: {type(e).__name__}: {e}") from None


def _plain(value):
    """Only JSON-like data reaches a template: rich objects have methods the sandbox does not know are unsafe."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) may carry extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _with_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CubelmError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts need the JSON as it is
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the ``dict`` type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore attributes (a path to Python internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 - Jinja's signature trick, so that namespace(self=1) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks the assistant's tokens for training masks; rendering only
    needs its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals.update(raise_exception=_raise, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace)
