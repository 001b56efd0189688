"""Chat templates: find a model's Jinja template and render it the way transformers' apply_chat_template does.

A chat template is untrusted code from the Hub, so it runs in Jinja's immutable sandbox, with the same
environment transformers builds (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`,
a `tojson` that keeps non-ASCII text). Only the rendering lives here; turning the text into token ids is the
tokenizer's job.
"""

import functools
import json
from collections.abc import Container
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (its own `raise_exception`) or could not be compiled/rendered."""


# Builtins, for models without a template of their own or for trying another format on purpose.
# Each is written on single lines because trim_blocks/lstrip_blocks would otherwise reshape the whitespace.
BUILTIN_TEMPLATES = {
    # Base models: the conversation is one running text, each message's content exactly as given.
    # No BOS here: a base model's prompt gets the tokenizer's own special tokens through Tokenizer.encode.
    "raw": "{% for message in messages %}{{ message['content'] }}{% endfor %}",
    # Llama-2 chat: the system prompt lives inside the first [INST] block; every exchange is its own <s>...</s>.
    "llama": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system_prompt = messages[0]['content'] %}{% set turns = messages[1:] %}"
        "{% else %}{% set system_prompt = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token }}[INST] "
        "{% if loop.first and system_prompt %}<<SYS>>\n{{ system_prompt }}\n<</SYS>>\n\n{% endif %}"
        "{{ message['content'] | trim }} [/INST]"
        "{% elif message['role'] == 'assistant' %}"
        " {{ message['content'] | trim }} {{ eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def load_chat_template(folder) -> str | None:
    """The model's own chat template, or None.

    Same precedence as transformers: a `chat_template.jinja` file beats a template inside
    `tokenizer_config.json`; `chat_template.json` (the older processor format) comes in between.
    tokenizer_config.json may hold a list of named templates: "default" wins, else the first one.
    """
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for json_name in ("chat_template.json", "tokenizer_config.json"):
        json_file = folder / json_name
        if json_file.is_file():
            template = _template_from_config_value(
                json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
            )
            if template is not None:
                return template
    return None


def _template_from_config_value(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    named = {entry["name"]: entry["template"] for entry in value}
    if "default" in named:
        return named["default"]
    return next(iter(named.values()), None)


def resolve_template(name_or_none: str | None, model_template: str | None, vocabulary: Container[str] = ()) -> str:
    """The Jinja source to render with.

    None means the model's own template. A model without one falls back on a builtin guessed from the tokens it
    knows (`vocabulary`: its added/special tokens): "chatml" if it has <|im_start|>, "llama" if it has [INST],
    else "raw". A builtin's name picks that builtin; any other string containing Jinja tags is taken as a template.
    """
    if name_or_none is None:
        if model_template is not None:
            return model_template
        if "<|im_start|>" in vocabulary:
            return BUILTIN_TEMPLATES["chatml"]
        if "[INST]" in vocabulary:
            return BUILTIN_TEMPLATES["llama"]
        return BUILTIN_TEMPLATES["raw"]
    if name_or_none in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_none]
    if "{{" in name_or_none or "{%" in name_or_none:
        return name_or_none
    raise ValueError(f"unknown chat template {name_or_none!r}; builtins are {sorted(BUILTIN_TEMPLATES)}")


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **extra,
) -> str:
    """Render `messages` as transformers' apply_chat_template(tokenize=False) would.

    `special_tokens` (bos_token, eos_token, ...) and `extra` become template variables, `extra` winning.
    As in transformers, keys whose value is None are dropped from each message, because templates test for a
    key's presence and would otherwise print "None".
    """
    context = {"tools": None, "documents": None, **(special_tokens or {}), **extra}
    context["messages"] = [{key: value for key, value in message.items() if value is not None} for message in messages]
    context["add_generation_prompt"] = add_generation_prompt
    try:
        return _compile(template).render(**context)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(str(error)) from error


class _GenerationBlock(jinja2.ext.Extension):
    # Some templates wrap assistant text in {% generation %} so trainers can mask it; rendering keeps the text.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without underscore names: the sandbox already hides them from reads, this stops the writes."""

    def __init__(self, /, *args, **kwargs):
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _refuse_private_name(name)
        super().__init__(attributes)

    def __setitem__(self, name, value):
        _refuse_private_name(name)
        super().__setitem__(name, value)


def _refuse_private_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore names ({name!r}) on a namespace")


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters and forces ASCII; templates written for transformers expect neither.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _Namespace
    try:
        return environment.from_string(template)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"chat template does not compile: {error}") from error
