"""core.chat_template and Tokenizer.render_chat/encode_chat against transformers' apply_chat_template."""

import json
from pathlib import Path

import jinja2
import pytest
from transformers import AutoTokenizer

from core.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    load_chat_template,
    render_chat_template,
    resolve_template,
)
from core.tokenizer import Tokenizer
from tests.test_tokenizer import (
    SENTENCEPIECE_CONFIG,
    needs_protobuf,
    save_demo_tokenizer,
    train_byte_level_bpe,
    train_sentencepiece,
)

# Written for these tests in the style of the Llama-3 and Mistral templates on the Hub.
LLAMA3_STYLE_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Turns must go user, assistant, user, ... starting with the user') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

CONVERSATIONS = {
    "single_user_turn": [{"role": "user", "content": "Hello!"}],
    "system_and_user": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ],
    "non_ascii": [
        {"role": "user", "content": "Grüße aus Köln, 你好 😀"},
        {"role": "assistant", "content": "Ça va très bien ✓"},
        {"role": "user", "content": "¿Y tú?"},
    ],
}
# Mistral-style templates have no system role.
ALTERNATING = ["single_user_turn", "non_ascii"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    llama3 = train_byte_level_bpe(base / "chat_llama3", {"chat_template": LLAMA3_STYLE_TEMPLATE})
    # A list of named templates, as some tokenizer_config.json files have: "default" is the one used.
    mistral = train_sentencepiece(base / "chat_mistral", {**SENTENCEPIECE_CONFIG, "chat_template": [
        {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        {"name": "default", "template": MISTRAL_STYLE_TEMPLATE},
    ]})
    return {"demo": save_demo_tokenizer(base / "demo"), "llama3": llama3, "mistral": mistral}


@pytest.fixture(scope="module")
def pairs(folders):
    """(ours, transformers') by model name, each loaded on first use."""
    loaded = {}

    def pair(name: str) -> tuple[Tokenizer, object]:
        if name not in loaded:
            loaded[name] = (Tokenizer.from_folder(folders[name]), AutoTokenizer.from_pretrained(folders[name]))
        return loaded[name]

    return pair


CASES = [
    pytest.param(model, conversation, add_generation_prompt, marks=[needs_protobuf] if model == "mistral" else [])
    for model in ("demo", "llama3", "mistral")
    for conversation in (ALTERNATING if model == "mistral" else CONVERSATIONS)
    for add_generation_prompt in (True, False)
]


@pytest.mark.parametrize("model, conversation, add_generation_prompt", CASES)
def test_render_and_encode_chat_match_transformers(pairs, model, conversation, add_generation_prompt):
    ours, reference = pairs(model)
    messages = CONVERSATIONS[conversation]
    expected_text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = reference.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected_text
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


@needs_protobuf
def test_template_refusal_surfaces_as_chat_template_error_with_its_message(pairs):
    ours, reference = pairs("mistral")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError) as reference_error:
        reference.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError) as our_error:
        ours.render_chat(messages)
    expected_message = "Turns must go user, assistant, user, ... starting with the user"
    assert str(our_error.value) == str(reference_error.value) == expected_message


def test_template_features_match_transformers(pairs):
    # tojson keeps non-ASCII and takes json.dumps' arguments; loop controls work; extra variables reach the template.
    template = (
        "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}|"
        "{{ {'a': 1, 'b': [1, 2]} | tojson(separators=(',', ':')) }}|"
        "{% for message in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ message['role'] }}{% endfor %}|"
        "{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ message['role'] }},{% endfor %}|"
        "{{ custom_flag }}|{{ bos_token }}|{{ tools is none }}|{{ messages[1].keys() | list }}"
    )
    ours, reference = pairs("demo")
    messages = [
        {"role": "user", "content": "Grüße 你好 \"quoted\" <tag>"},
        {"role": "system", "content": "x", "tool_calls": None},
        {"role": "assistant", "content": "ok"},
    ]
    expected = reference.apply_chat_template(messages, chat_template=template, tokenize=False, custom_flag="yes")
    assert ours.render_chat(messages, template=template, custom_flag="yes") == expected
    assert "Grüße 你好" in expected and "'tool_calls'" not in expected


def test_strftime_now_renders_the_current_date():
    rendered = render_chat_template("{{ strftime_now('%Y') }}", [], special_tokens={})
    assert rendered.isdigit() and len(rendered) == 4


def test_broken_template_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for message in messages %}", [{"role": "user", "content": "x"}])


def test_builtin_raw_joins_contents_for_base_models():
    messages = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": ", there was"}]
    assert render_chat_template(BUILTIN_TEMPLATES["raw"], messages, special_tokens={"bos_token": "<s>"}) == (
        "Once upon a time, there was"
    )


def test_builtin_llama_writes_llama2_inst_blocks():
    messages = CONVERSATIONS["multi_turn"]
    rendered = render_chat_template(
        BUILTIN_TEMPLATES["llama"], messages, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}
    )
    assert rendered == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? </s>"
        "<s>[INST] Tell me a joke.\nA short one. [/INST]"
    )
    without_system = render_chat_template(
        BUILTIN_TEMPLATES["llama"], CONVERSATIONS["single_user_turn"], special_tokens={"bos_token": "<s>"}
    )
    assert without_system == "<s>[INST] Hello! [/INST]"


def test_builtin_chatml_with_and_without_generation_prompt():
    messages = CONVERSATIONS["system_and_user"]
    expected = (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n"
    )
    assert render_chat_template(BUILTIN_TEMPLATES["chatml"], messages, add_generation_prompt=False) == expected
    assert render_chat_template(BUILTIN_TEMPLATES["chatml"], messages) == expected + "<|im_start|>assistant\n"


def test_builtin_by_name_through_the_tokenizer(pairs):
    ours, _ = pairs("demo")
    messages = CONVERSATIONS["single_user_turn"]
    chatml = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    assert ours.render_chat(messages, template="chatml") == chatml
    assert ours.encode_chat(messages, template="raw") == ours.encode("Hello!", add_special_tokens=False)


def test_resolve_template_prefers_the_model_then_guesses_from_the_vocabulary():
    assert resolve_template(None, "{{ 'own' }}") == "{{ 'own' }}"
    assert resolve_template("llama", "{{ 'own' }}") == BUILTIN_TEMPLATES["llama"]
    assert resolve_template(None, None, {"<|im_start|>", "<|im_end|>"}) == BUILTIN_TEMPLATES["chatml"]
    assert resolve_template(None, None, {"[INST]", "[/INST]"}) == BUILTIN_TEMPLATES["llama"]
    assert resolve_template(None, None, {"<s>"}) == BUILTIN_TEMPLATES["raw"]
    assert resolve_template("{{ messages[0]['content'] }}", None) == "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="unknown chat template"):
        resolve_template("vicuna", None)


def test_tokenizer_without_template_falls_back_to_chatml_when_it_knows_im_start(folders, tmp_path):
    folder = tmp_path / "no_template"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folders["demo"] / name).read_bytes())
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.chat_template is None
    assert tokenizer.render_chat(CONVERSATIONS["single_user_turn"]) == (
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_chat_template_precedence(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert load_chat_template(tmp_path) == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert load_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from jinja file", encoding="utf-8")
    assert load_chat_template(tmp_path) == "from jinja file"


def test_load_chat_template_picks_default_from_a_named_list(tmp_path):
    templates = [{"name": "rag", "template": "rag"}, {"name": "default", "template": "main"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert load_chat_template(tmp_path) == "main"


def test_templates_cannot_store_underscore_names_on_a_namespace():
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_secret=1) %}{{ ns._secret }}", [])
    template = (
        "{% set ns = namespace(count=0) %}{% for m in messages %}{% set ns.count = ns.count + 1 %}{% endfor %}"
        "{{ ns.count }}"
    )
    assert render_chat_template(template, [{"role": "user", "content": "a"}] * 3) == "3"
