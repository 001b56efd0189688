"""Calibration rows: the token sequences whose activations steer measurement and GPTQ.

Sources, in the order a user reaches for them: a local file (.txt, .jsonl with
a "text" field, .parquet with a text column), a Hub dataset file, or, offline
and with nothing given, text the model writes itself from a fixed set of varied
prompts. Self-generated text matches the model's own distribution (what it will
see in chat) and needs no download; it is generated once per model (the
conversion job keeps it in the cache as well as in the work dir).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..cache import KVCache
from ..graph_decode import GraphDecoder, graphs_wanted
from ..model import CausalLM
from ..sampling import SamplingSettings, sample_tokens

# Varied on purpose: prose, dialogue, code, numbers, lists, markup, other languages.
# Never the evaluation text (the quality bench scores Shakespeare).
CALIBRATION_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a high-school student.",
    "Write a Python function that parses a CSV file and returns the average of each numeric column, with comments.",
    "What are the main differences between TCP and UDP? Answer with a table.",
    "Solve step by step: a train leaves at 9:40 and travels 210 km at 84 km/h. When does it arrive?",
    "Write a polite email asking a landlord to fix a broken heater.",
    "Describe the water cycle in five numbered steps.",
    "Write a SQL query that finds the top three customers by total order value, and explain it.",
    "Give me a recipe for a vegetarian lasagna with a shopping list.",
    "Summarize the causes of the First World War in two paragraphs.",
    "Écris un court paragraphe sur la ville de Lyon et sa cuisine.",
    "Escribe una breve descripción de las montañas de los Andes.",
    "Schreibe eine kurze Anleitung, wie man ein Fahrrad repariert.",
    "用简单的中文介绍一下太阳系的行星。",
    "Write a JSON object describing a fictional book with title, author, year, genres and a short summary.",
    "Write a dialogue between a customer and a barista about choosing a coffee.",
    "Explain what a hash table is and how collisions are handled, with a small C example.",
    "List ten tips for improving sleep quality.",
    "Write a haiku sequence about autumn in the city.",
    "Explain the Pythagorean theorem and prove it.",
    "Write a bash script that backs up a folder to a dated tar.gz archive and deletes backups older than a week.",
    "Describe how a bill becomes a law in a parliamentary democracy.",
    "Write a product review of a pair of running shoes, with pros and cons.",
    "Explain gradient descent with an analogy and then with the equations.",
    "Write a news report about a new species of frog discovered in a rainforest.",
    "Translate into English and explain the grammar: 'Je me suis levé tôt ce matin.'",
    "Write a JavaScript function that debounces another function, and show how to use it.",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Write a formal letter of recommendation for a former colleague.",
    "Explain the difference between weather and climate, with examples.",
    "Write an HTML page with a form that asks for a name and an email address.",
    "Describe the plot of a mystery novel set on a train, in the style of a book blurb.",
)


class CalibrationError(ValueError):
    """The calibration source cannot give the rows asked for."""


HUB_FILE_PREFIX = "hf:"


def calibration_text(source: str, allowed_roots: Sequence[str | Path] | None = None, token: str | None = None) -> str:
    """The text of a calibration source: a local file, or "hf:<dataset id>:<file>" from the Hub.

    With `allowed_roots` (a public server's upload folders), a local file must lie
    inside one of them, symlinks resolved. Anything else is refused with one
    sentence that never says whether the path exists, so the server's files
    cannot be probed through this field.
    """
    if source.startswith(HUB_FILE_PREFIX):
        repo_id, _, filename = source[len(HUB_FILE_PREFIX):].partition(":")
        if not repo_id or not filename:
            raise CalibrationError(f"{source!r} is not a Hub dataset file; write hf:<dataset id>:<file>")
        return read_text_file(hub_dataset_file(repo_id, filename, token))
    refuse_outside_roots(source, allowed_roots)
    return read_text_file(source)


def refuse_outside_roots(source: str, allowed_roots: Sequence[str | Path] | None) -> None:
    """One sentence for a local calibration file outside `allowed_roots` (None: anywhere is fine)."""
    if allowed_roots is None or source.startswith(HUB_FILE_PREFIX) or _inside_any(Path(source), allowed_roots):
        return
    raise CalibrationError(
        f"calibration file {source} is not available here: upload a text file, "
        "or name a Hub dataset file as hf:<dataset id>:<file>"
    )


def _inside_any(path: Path, roots: Sequence[str | Path]) -> bool:
    # realpath, not resolve(strict=True): the answer must not depend on whether the path exists.
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(root)) for root in roots)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise CalibrationError(f"{path}:{number} has no string field 'text'")
                    texts.append(record["text"])
            return "\n\n".join(texts)
        if suffix == ".parquet":
            return "\n\n".join(_parquet_texts(path))
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibrationError(f"cannot read calibration file {path}: {error}") from None


def _parquet_texts(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq  # an optional dependency, needed for .parquet files alone
    except ImportError:
        raise CalibrationError("reading .parquet calibration files needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    column = "text" if "text" in table.column_names else next(
        (name for name in table.column_names if str(table.schema.field(name).type) in ("string", "large_string")), None
    )
    if column is None:
        raise CalibrationError(f"{path} has no text column")
    return [t for t in table.column(column).to_pylist() if t]


def hub_dataset_file(repo_id: str, filename: str, token: str | None = None) -> Path:
    """Download one file of a Hub dataset repo (a .txt, .jsonl or .parquet)."""
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", token=token))
    except ValueError as error:  # a malformed id, or ".." in the file name
        raise CalibrationError(f"cannot fetch {filename} from dataset {repo_id}: {error}") from None
    except LocalEntryNotFoundError:
        raise CalibrationError(f"dataset {repo_id} file {filename} is not cached and the Hub cannot be reached") from None
    except HfHubHTTPError as error:
        raise CalibrationError(f"cannot download {filename} from dataset {repo_id}: {error}") from None


def rows_from_tokens(token_ids: list[int], rows: int, length: int) -> torch.Tensor:
    """`rows` windows of `length` tokens spread evenly over the text."""
    if len(token_ids) < length:
        raise CalibrationError(f"the calibration text has {len(token_ids)} tokens, fewer than one row of {length}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    starts = torch.linspace(0, len(token_ids) - length, rows).long()
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


@torch.inference_mode()
def generate_texts(
    model: CausalLM, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], seed: int,
    temperature: float = 0.8, top_k: int = 50, progress=None, budget: int | None = None,
) -> list[list[int]]:
    """Sample continuations of a batch of prompts at once (left-padded), returning prompt+answer ids.

    Sampling stops early once prompts and answers hold `budget` tokens.
    `progress(tokens)` is called after each step with the answer tokens so far.
    On the CPU rows that finish leave the batch (answers differ in length by
    10x, so most of the compute would otherwise go to rows already done). On a
    GPU a step costs its kernel launches, not its rows: the whole batch steps
    on as one replayed CUDA graph, finished rows with it, their tokens ignored.
    """
    batch, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    prompt_tokens = sum(len(p) for p in prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    key_mask = torch.zeros(batch, total, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        key_mask[row, longest - len(prompt) :] = True
    device = model.device
    ids, key_mask = ids.to(device), key_mask.to(device)
    rng = torch.Generator(device=device).manual_seed(seed)
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=1.0)
    cache = KVCache(model.config, total, batch_size=batch, device=device, dtype=model.dtype)
    logits = model(ids, cache, 0, last_only=True, key_mask=key_mask[:, :longest])[:, -1]
    graphs = None
    if graphs_wanted(device):
        graphs = GraphDecoder(model, cache)
        graphs.set_key_mask(key_mask)
    answers = [[] for _ in range(batch)]
    rows = list(range(batch))  # the prompt each batch row answers
    live = list(range(batch))  # the batch rows still answering
    written = 0
    for step in range(max_new_tokens):
        tokens = sample_tokens(logits, settings, rng)
        values = tokens.tolist()
        live = [row for row in live if values[row] not in stop_ids]
        for row in live:
            answers[rows[row]].append(values[row])
        written += len(live)
        if progress:
            progress(written)
        if not live or step == max_new_tokens - 1:
            break
        if budget is not None and prompt_tokens + written >= budget:
            break
        if graphs is not None:
            logits = graphs.step_rows(tokens, longest + step)
            continue
        if len(live) < len(rows):
            index = torch.tensor(live, device=device)
            cache.keep_rows(index)
            key_mask, tokens = key_mask[index], tokens[index]
            rows = [rows[row] for row in live]
            live = list(range(len(live)))
        logits = model(tokens[:, None], cache, longest + step, key_mask=key_mask[:, : longest + step + 1])[:, -1]
    return [prompt + answer for prompt, answer in zip(prompts, answers)]


# Sampling is one decode step per token for the whole batch, and on a GPU a
# step costs about the same for 8 rows as for 128: the wider the batch, the
# fewer steps. Its KV cache is what limits the width.
SAMPLING_CACHE_BYTES = 2 << 30
MAX_SAMPLING_ROWS = 128


def sampling_rows(model: CausalLM, sequence_length: int, limit: int = MAX_SAMPLING_ROWS) -> int:
    """How many answers to sample side by side within SAMPLING_CACHE_BYTES of KV cache."""
    config = model.config
    per_row = 2 * config.num_layers * config.num_kv_heads * config.head_dim * sequence_length
    per_row *= torch.empty((), dtype=model.dtype).element_size()
    return max(1, min(limit, SAMPLING_CACHE_BYTES // per_row))


def self_generated_rows(
    model: CausalLM, tokenizer, rows: int, length: int, stop_ids: set[int], seed: int = 0,
    batch: int | None = None, progress=None,
) -> torch.Tensor:
    """Rows of text the model writes from CALIBRATION_PROMPTS, answers joined by EOS into one stream.

    Each prompt is answered several times over (different samples) in one wide
    batch that stops as soon as the rows are full, so a long answer may end
    mid-sentence; the next round, if one is needed, samples with a new seed.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in CALIBRATION_PROMPTS
    ]
    needed = rows * length
    new_tokens = max(64, length)
    width = batch or sampling_rows(model, max(len(p) for p in prompts) + new_tokens)
    # No wider than the text needs with answers about half their room on average:
    # wider would cut every answer short and fill the rows with beginnings.
    width = max(1, min(width, 2 * needed // new_tokens + 1))
    stream: list[int] = []
    round_index = 0
    while len(stream) < needed:
        chunk = [prompts[(round_index * width + i) % len(prompts)] for i in range(width)]
        before = len(stream) + sum(map(len, chunk))  # the prompts are part of the text
        report = (lambda written: progress(min(before + written, needed), needed)) if progress else None
        budget = needed - len(stream) + len(separator) * width
        for text in generate_texts(model, chunk, new_tokens, stop_ids, seed + 1000 * round_index, progress=report,
                                   budget=budget):
            stream += text + separator
        round_index += 1
    return torch.tensor(stream[:needed], dtype=torch.long).view(rows, length)


def load_or_make_rows(cache_file: Path, signature: dict, make) -> torch.Tensor:
    """Rows cached in the work dir as safetensors, keyed by what produced them."""
    key = json.dumps(signature, sort_keys=True)
    if cache_file.is_file():
        try:
            with safe_open(str(cache_file), framework="pt") as handle:
                if (handle.metadata() or {}).get("signature") == key:
                    return handle.get_tensor("rows")
        except (SafetensorError, OSError):
            pass  # a damaged cache is simply made again
    rows = make()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_suffix(f".{os.getpid()}.tmp")
    save_file({"rows": rows.contiguous()}, str(temporary), metadata={"signature": key})
    temporary.replace(cache_file)
    return rows
