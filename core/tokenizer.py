"""Text to token ids and back for a Hugging Face model folder, the way transformers' AutoTokenizer does it.

`tokenizer.json` is run by the Rust `tokenizers` library. A folder with only `tokenizer.model` is run by
`sentencepiece`, wrapped the way transformers (v5) wraps a Llama SentencePiece model: no normalizer, one "▁"
put before the text, special tokens cut out of the text before SentencePiece sees it.

transformers quirks reproduced here, each checked against transformers 5 by tests/test_tokenizer.py:
- With a tokenizer.json, its post-processor alone decides BOS/EOS; add_bos_token/add_eos_token in
  tokenizer_config.json are ignored (transformers drops them when it finds tokenizer.json).
- With only tokenizer.model, BOS/EOS come from add_bos_token/add_eos_token, both False when absent.
- tokenizer_class LlamaTokenizer[Fast] with a non-byte-level tokenizer.json gets the Llama pipeline rebuilt
  (Metaspace pre-tokenizer instead of the file's normalizer), as LlamaTokenizer.__init__ does.
- "▁" is put before the first piece of text only (legacy=False, the default) and only if it does not already
  start with a space; legacy=True puts it before every piece between special tokens.
- clean_up_tokenization_spaces is honoured only for non-BPE models (transformers skips it for BPE).
"""

import json
import re
from pathlib import Path
from typing import NamedTuple

import sentencepiece
import tokenizers
from tokenizers import decoders, pre_tokenizers

from core.chat_template import load_chat_template, render_chat_template, resolve_template

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPACE_MARK = "▁"  # SentencePiece's visible space
REPLACEMENT_CHAR = "\ufffd"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """One model's tokenizer, its special tokens and its chat template."""

    def __init__(self, backend, config: dict, chat_template: str | None):
        self._backend = backend
        self.special_tokens = dict(backend.special_token_text)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._token_id(self.bos_token)
        self.eos_token_id = self._token_id(self.eos_token)
        self.pad_token_id = self._token_id(self.special_tokens.get("pad_token"))
        self.vocab_size = backend.vocab_size
        self.special_ids = frozenset(backend.special_ids)
        self.chat_template = chat_template
        clean_up_asked = bool(config.get("clean_up_tokenization_spaces", False))
        self.clean_up_tokenization_spaces = clean_up_asked and not backend.is_bpe

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        if (folder / "tokenizer.json").is_file():
            backend = _RustBackend(folder / "tokenizer.json", config)
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(folder / "tokenizer.model", config)
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor tokenizer.model")
        return cls(backend, config, load_chat_template(folder))

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry or added token, e.g. a stop token such as "<|eot_id|>"."""
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._backend.decode([int(token_id) for token_id in ids], skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(
            lambda ids: self._backend.decode(ids, skip_special_tokens),
            self._backend.byte_token_ids,
            self.clean_up_tokenization_spaces,
        )

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None, **extra
    ) -> str:
        """The conversation as prompt text: the model's template by default, else a builtin (see resolve_template)."""
        source = resolve_template(template, self.chat_template, self._backend.added_token_ids)
        return render_chat_template(
            source, messages, add_generation_prompt, special_tokens=self.special_tokens, **extra
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None, **extra
    ) -> list[int]:
        # The template writes BOS and friends itself, so the tokenizer must not add them again.
        text = self.render_chat(messages, add_generation_prompt, template, **extra)
        return self.encode(text, add_special_tokens=False)


class StreamDecoder:
    """Text for generated tokens as they arrive; everything it returns, joined, equals decode(all ids).

    Each step decodes a short window (the previously emitted token(s) as context, then the new ones) and emits
    what the window adds beyond its context. The context keeps the space SentencePiece writes before a word,
    which decoding a token alone would strip. Text is held back while it ends in an incomplete UTF-8 character
    (U+FFFD), while a run of <0xXX> byte tokens is still open (a later byte can turn the whole run into U+FFFD),
    and, with clean-up on, while a trailing " ", " '" or " n'" could still be cleaned up by what follows.
    """

    def __init__(self, decode, byte_token_ids: frozenset, clean_up: bool):
        self._decode = decode
        self._byte_token_ids = byte_token_ids
        self._clean_up = clean_up
        self._ids: list[int] = []
        self._context_start = 0
        self._emitted_end = 0
        self._unclean_tail = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if token_id in self._byte_token_ids:
            return ""
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        context_text = self._decode(self._ids[self._context_start:self._emitted_end])
        window_text = self._decode(self._ids[self._context_start:])
        new_text = ""
        if len(window_text) > len(context_text) and (final or not window_text.endswith(REPLACEMENT_CHAR)):
            new_text = window_text[len(context_text):]
            self._context_start, self._emitted_end = self._emitted_end, len(self._ids)
        if not self._clean_up:
            return new_text
        text = self._unclean_tail + new_text
        cut = len(text) if final else _clean_up_safe_cut(text)
        self._unclean_tail = text[cut:]
        return clean_up_tokenization(text[:cut])


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization_spaces: undo the spaces a word-piece tokenizer puts before punctuation."""
    for spaced, joined in _CLEAN_UPS:
        text = text.replace(spaced, joined)
    return text


_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def _clean_up_safe_cut(text: str) -> int:
    # Every clean-up pattern starts with a space and is at most 4 characters long, so text can be released up to
    # a point with no space in the 3 characters before it: no pattern can then straddle the cut.
    cut = len(text)
    while (space := text.find(" ", max(cut - 3, 0), cut)) >= 0:
        cut = space
    return cut


def read_tokenizer_config(folder) -> dict:
    """tokenizer_config.json, with special_tokens_map.json merged in where transformers still reads it."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        # Older folders keep their special tokens in special_tokens_map.json; transformers reads it only then.
        config.update(_read_json(folder / "special_tokens_map.json"))
    return config


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    # Special tokens are written either as plain strings or as serialized AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _extra_special_tokens(config: dict) -> list[str]:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # model-specific named tokens, e.g. {"image_token": "<image>"}
        extra = list(extra.values())
    return [_token_text(token) for token in extra]


def _config_added_tokens(config: dict) -> list[tuple[int | None, dict]]:
    """(id or None, AddedToken fields) for every token tokenizer_config.json asks to be matched as a whole."""
    entries = [
        (int(token_id), {"content": _token_text(token), **(token if isinstance(token, dict) else {})})
        for token_id, token in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0]))
    ]
    for name in NAMED_SPECIAL_TOKENS:
        if _token_text(config.get(name)) is not None:
            entries.append((None, {"content": _token_text(config[name]), "special": True, "normalized": False}))
    entries += [
        (None, {"content": token, "special": True, "normalized": False}) for token in _extra_special_tokens(config)
    ]
    return entries


class _RustBackend:
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path, config: dict):
        tokenizer_text = path.read_text(encoding="utf-8")
        tokenizer_json = json.loads(tokenizer_text)
        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_text)
        # tokenizer.json may carry a training-time truncation or padding; transformers' encode() turns both off.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        has_byte_fallback = "ByteFallback" in json.dumps(tokenizer_json.get("decoder"))
        # transformers checks the same way, by searching the file, before trusting a LlamaTokenizer class name.
        is_byte_level = '"ByteLevel"' in tokenizer_text
        if str(config.get("tokenizer_class", "")).removesuffix("Fast") == "LlamaTokenizer" and not is_byte_level:
            _use_llama_pipeline(self._tokenizer, config)
            has_byte_fallback = True
        self._add_config_tokens(config)
        self._tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))

        added = self._tokenizer.get_added_tokens_decoder()
        self.added_token_ids = {token.content: token_id for token_id, token in added.items()}
        self.special_token_text = {
            name: _token_text(config[name])
            for name in NAMED_SPECIAL_TOKENS
            if _token_text(config.get(name)) is not None
        }
        self.special_ids = {token_id for token_id, token in added.items() if token.special}
        self.special_ids |= {self.token_to_id(text) for text in self.special_token_text.values()} - {None}
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.is_bpe = tokenizer_json["model"].get("type") == "BPE"
        self.byte_token_ids = frozenset()
        if has_byte_fallback:
            vocab = self._tokenizer.get_vocab(with_added_tokens=False)
            self.byte_token_ids = frozenset(
                token_id for token, token_id in vocab.items() if BYTE_PIECE.fullmatch(token)
            )

    def _add_config_tokens(self, config: dict):
        # transformers adds every special token named in the config that tokenizer.json does not list yet.
        present = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        for _, fields in _config_added_tokens(config):
            if fields["content"] in present:
                continue
            token = tokenizers.AddedToken(
                fields["content"],
                single_word=fields.get("single_word", False),
                lstrip=fields.get("lstrip", False),
                rstrip=fields.get("rstrip", False),
                normalized=fields.get("normalized", not fields.get("special", False)),
                special=fields.get("special", False),
            )
            if token.special:
                self._tokenizer.add_special_tokens([token])
            else:
                self._tokenizer.add_tokens([token])
            present.add(fields["content"])

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _use_llama_pipeline(tokenizer: tokenizers.Tokenizer, config: dict):
    # transformers' LlamaTokenizer.__init__ keeps only vocab and merges from tokenizer.json and builds its own
    # pipeline, so Llama-2-style files (Prepend + Replace normalizer) tokenize the way LlamaTokenizer says.
    prepend_scheme = _prepend_scheme(config)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE_MARK, prepend_scheme=prepend_scheme, split=False
    )
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":  # the space put before the text is taken off again
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)


def _prepend_scheme(config: dict) -> str:
    """Where "▁" goes before text: "first" piece only, "always" after each special token too, or "never"."""
    if config.get("add_prefix_space") is False:
        return "never"
    return "always" if config.get("legacy", False) else "first"


class _SentencePieceBackend:
    """tokenizer.model through `sentencepiece`, with the pre- and post-processing of transformers' LlamaTokenizer."""

    def __init__(self, path: Path, config: dict):
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=_without_normalizer(path.read_bytes()))
        piece_count = self._sp.get_piece_size()
        pieces = [self._sp.id_to_piece(piece_id) for piece_id in range(piece_count)]
        self._piece_ids = {piece: piece_id for piece_id, piece in enumerate(pieces)}
        self._prepend_scheme = _prepend_scheme(config)
        self._strip_leading_space = self._prepend_scheme != "never"
        self._add_bos = bool(config.get("add_bos_token", False))
        self._add_eos = bool(config.get("add_eos_token", False))

        self.special_token_text = self._named_special_tokens(config)
        self._added = self._added_tokens(pieces, config)
        self._added_pattern = _added_token_pattern(self._added)
        self._id_to_text = dict(enumerate(pieces)) | {token.id: content for content, token in self._added.items()}

        self.added_token_ids = {content: token.id for content, token in self._added.items()}
        self.special_ids = {token.id for token in self._added.values() if token.special}
        self.vocab_size = max(self._id_to_text) + 1
        self.is_bpe = True  # transformers turns a Llama SentencePiece model into a `tokenizers` BPE
        self.byte_token_ids = frozenset(i for i in range(piece_count) if self._sp.is_byte(i))

    def _added_tokens(self, pieces: list[str], config: dict) -> dict[str, "_AddedToken"]:
        """Tokens matched as a whole in the text before SentencePiece sees it: control pieces and config tokens."""
        added = {pieces[i]: _AddedToken(i, True) for i in range(len(pieces)) if self._sp.is_control(i)}
        named = [(None, {"content": text, "special": True}) for text in self.special_token_text.values()]
        for token_id, fields in _config_added_tokens(config) + named:
            content = fields["content"]
            if content in added:
                continue
            if token_id is None:
                # A token the model does not know gets the next free id, as transformers' add_tokens does.
                next_free_id = max([len(pieces)] + [token.id + 1 for token in added.values()])
                token_id = self._piece_ids.get(content, next_free_id)
            added[content] = _AddedToken(
                token_id, fields.get("special", False), fields.get("lstrip", False), fields.get("rstrip", False)
            )
        return added

    def _named_special_tokens(self, config: dict) -> dict[str, str]:
        # LlamaTokenizer's defaults are <unk>, <s>, </s>: the pieces a Llama model declares for these ids.
        defaults = {"unk_token": self._sp.unk_id(), "bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id()}
        named = {name: self._sp.id_to_piece(piece_id) for name, piece_id in defaults.items() if piece_id >= 0}
        for name in NAMED_SPECIAL_TOKENS:
            if _token_text(config.get(name)) is not None:
                named[name] = _token_text(config[name])
        return named

    def token_to_id(self, token: str) -> int | None:
        added = self._added.get(token)
        return added.id if added else self._piece_ids.get(token)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = []
        for start, segment, is_added_token in _split_on_added_tokens(text, self._added_pattern):
            if is_added_token:
                ids.append(self._added[segment].id)
                continue
            segment = segment.replace(" ", SPACE_MARK)
            wants_prefix = self._prepend_scheme == "always" or (self._prepend_scheme == "first" and start == 0)
            if wants_prefix and not segment.startswith(SPACE_MARK):
                segment = SPACE_MARK + segment
            ids.extend(self._sp.encode(segment))
        if add_special_tokens:
            ids = [self.token_to_id(self.special_token_text["bos_token"])] * self._add_bos + ids
            ids = ids + [self.token_to_id(self.special_token_text["eos_token"])] * self._add_eos
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # The decoder chain of transformers' LlamaTokenizer: "▁" -> " ", <0xXX> runs -> bytes, join, strip one space.
        texts = [
            self._id_to_text[i].replace(SPACE_MARK, " ")
            for i in ids
            if i in self._id_to_text and not (skip_special_tokens and i in self.special_ids)
        ]
        text = _join_byte_fallback(texts)
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text


class _AddedToken(NamedTuple):
    id: int
    special: bool
    lstrip: bool = False  # swallows the whitespace before it
    rstrip: bool = False  # swallows the whitespace after it


def _added_token_pattern(added: dict[str, _AddedToken]) -> re.Pattern | None:
    if not added:
        return None
    # Longest first, so that of two tokens starting at the same place the longer one wins, as in `tokenizers`.
    alternatives = [
        (r"\s*" if token.lstrip else "") + f"(?P<t{index}>{re.escape(content)})" + (r"\s*" if token.rstrip else "")
        for index, (content, token) in enumerate(sorted(added.items(), key=lambda item: -len(item[0])))
    ]
    return re.compile("|".join(alternatives))


def _split_on_added_tokens(text: str, pattern: re.Pattern | None):
    """(start offset, piece, is added token); whitespace an added token strips belongs to no piece."""
    position = 0
    for match in pattern.finditer(text) if pattern else ():
        if match.start() > position:
            yield position, text[position:match.start()], False
        yield match.start(match.lastgroup), match.group(match.lastgroup), True
        position = match.end()
    if position < len(text):
        yield position, text[position:], False


def _join_byte_fallback(texts: list[str]) -> str:
    # As the `tokenizers` ByteFallback decoder: a run of <0xXX> pieces becomes its UTF-8 text, or, if the run is
    # not valid UTF-8, one U+FFFD per byte (not Python's one per bad sequence).
    parts, run = [], bytearray()
    for text in texts + [None]:
        if text is not None and BYTE_PIECE.fullmatch(text):
            run.append(int(text[3:5], 16))
            continue
        if run:
            try:
                parts.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                parts.append(REPLACEMENT_CHAR * len(run))
            run = bytearray()
        if text is not None:
            parts.append(text)
    return "".join(parts)


def _without_normalizer(model_proto: bytes) -> bytes:
    """The serialized SentencePiece model with its NormalizerSpec (field 3) replaced by a do-nothing one.

    transformers ignores a Llama model's normalizer (NFKC rules, whitespace squeezing, the dummy prefix) and does
    the prefix itself, so SentencePiece must only segment. Edited at the protobuf wire level to avoid a protobuf
    dependency: only top-level fields are walked, all kept except the NormalizerSpec.
    """
    kept = bytearray()
    position = 0
    while position < len(model_proto):
        field_start = position
        tag, position = _read_varint(model_proto, position)
        wire_type = tag & 7
        if wire_type == 0:
            _, position = _read_varint(model_proto, position)
        elif wire_type == 2:
            length, position = _read_varint(model_proto, position)
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise ValueError("tokenizer.model is not a SentencePiece model")
        if tag >> 3 != 3:
            kept += model_proto[field_start:position]
    # name="identity", add_dummy_prefix=false, remove_extra_whitespaces=false, escape_whitespaces=true; no charsmap.
    normalizer_spec = b"\x0a\x08identity" + b"\x18\x00" + b"\x20\x00" + b"\x28\x01"
    kept += b"\x1a" + bytes([len(normalizer_spec)]) + normalizer_spec
    return bytes(kept)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
