"""Calibration rows: the token sequences whose activations steer measurement and GPTQ.

Sources, in the order a user reaches for them: a local file (.txt, .jsonl with
a "text" field, .parquet with a text column), a Hub dataset file, or, offline
and with nothing given, text the model writes itself from a fixed set of varied
prompts (or unprompted, by the recipes of `self_generated_rows`). Self-generated
text matches the model's own distribution and needs no download; it is
generated once per model and recipe (the conversion job keeps it in the cache
as well as in the work dir).
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

# The "wide-chat" recipe: CALIBRATION_PROMPTS and many more, so that the text
# covers what users feed a model (code in many languages, technical and
# formal prose, dialogue, lists, tables, numbers, math, structured data, other
# languages, instructions). Never prompts that imitate the held-out domains
# of bench/heldout.py: no Shakespeare or verse drama, no software licenses,
# nothing about Python's grammar or its standard library.
WIDE_PROMPTS = CALIBRATION_PROMPTS + (
    # code, many languages
    "Write a Rust function that reads a file line by line and counts the words, handling errors with Result.",
    "Write a Go HTTP server with two routes, one returning JSON, and explain the handler signature.",
    "Implement binary search in Java with unit tests in JUnit.",
    "Write a C++ class for a fixed-size ring buffer with push, pop and a template parameter.",
    "Write a TypeScript interface for a user profile and a function that validates an object against it.",
    "Write a Kotlin data class for an invoice and a function that totals a list of invoices.",
    "Write a Haskell function that computes the prime factors of a number, with type signatures.",
    "Write a Ruby script that renames every .jpeg file in a folder to .jpg.",
    "Write a PHP function that sanitizes a form input and stores it in a MySQL table with PDO.",
    "Write a Swift struct for a 2D vector with operator overloading for addition and scaling.",
    "Write a Dockerfile for a Node.js web app and a docker-compose file that adds a Postgres database.",
    "Write a Makefile that builds a C project from src/ into build/ with separate object files.",
    "Write a regular expression that matches ISO 8601 dates and explain each part.",
    "Write a GitHub Actions workflow that runs tests on three operating systems.",
    "Write a Lua function that deep-copies a table, including nested tables and metatables.",
    "Write an R script that loads a CSV of temperatures, computes monthly means and plots them.",
    "Write a CUDA kernel that adds two vectors, with the host code that launches it.",
    "Write a React component that shows a list of todos with a checkbox for each.",
    "Write CSS for a responsive three-column layout that becomes one column on phones.",
    "Explain this error and how to fix it: 'NullPointerException at Main.java:42'.",
    "Review this code and suggest improvements: for (int i = 0; i <= n; i++) sum += a[i];",
    "Write a Python class for a bank account with deposit and withdraw methods that refuse overdrafts.",
    "Write a shell one-liner that finds the ten largest files under the current directory.",
    "Write a YAML configuration for a web service with a database section, logging levels and feature flags.",
    "Write a Git commit message for a change that fixes a race condition in a cache.",
    "Write a Scala function that merges two sorted lists.",
    "Write assembly for x86-64 that returns the maximum of two integers, with comments.",
    # technical and formal prose
    "Explain how public-key cryptography lets two strangers agree on a secret.",
    "Write the installation section of a README for a command-line tool, with commands for Linux, macOS and Windows.",
    "Describe how a CPU cache works, including cache lines, associativity and eviction.",
    "Explain how DNS resolves a domain name, step by step.",
    "Write an incident report for a two-hour website outage caused by an expired certificate.",
    "Explain the difference between a process and a thread to a new programmer.",
    "Write the abstract of a research paper on reducing energy use in data centers.",
    "Describe the architecture of a message queue such as Kafka and when to use one.",
    "Write a technical specification for a REST API endpoint that creates an order.",
    "Explain how a refrigerator moves heat from inside to outside.",
    "Summarize the key ideas of double-entry bookkeeping.",
    "Write the terms for returning a product bought from an online furniture store.",
    "Draft a privacy notice for a small dental clinic's appointment website.",
    "Write a clause for a house rental agreement about pets and damages.",
    "Explain what an API rate limit is and how clients should handle it.",
    "Write the meeting minutes of a school board discussing a new bus schedule.",
    "Explain how a transformer language model turns text into predictions.",
    # dialogue and conversation
    "Write a dialogue between a doctor and a patient who has had headaches for a week.",
    "Write a conversation in which two friends plan a weekend trip and disagree about the budget.",
    "Role-play a customer support agent helping someone reset a router.",
    "Write an interview with a retired astronaut about her first spaceflight.",
    "Write a job interview for a junior accountant position, questions and answers.",
    "Write a text-message exchange between roommates about doing the dishes.",
    # lists, tables, numbers, math
    "Make a markdown table comparing five programming languages by typing, speed and typical use.",
    "Give a weekly meal plan as a table with breakfast, lunch and dinner for each day.",
    "List the planets of the solar system with their distance from the sun in AU and their number of moons.",
    "Make a budget for a family of four with monthly income of 4,200 dollars, as a table with percentages.",
    "Convert these temperatures from Celsius to Fahrenheit and show the work: -40, 0, 37, 100.",
    "Compute the compound interest on 5,000 euros at 3.5% per year for 12 years, year by year.",
    "Solve the system of equations 3x + 2y = 16 and x - y = 2, showing each step.",
    "Find the derivative of f(x) = x^3 sin(x) and explain the product rule.",
    "Explain Bayes' theorem with a medical test example and the numbers worked out.",
    "Prove that the square root of 2 is irrational.",
    "Write the multiplication table of 7 up to 7 x 12 and point out patterns.",
    "What is the probability of rolling at least one six in four throws of a die? Show the calculation.",
    "Give the quarterly sales figures of a fictional company for three years and describe the trend.",
    "Explain matrix multiplication with a 2x3 and a 3x2 example, computing every entry.",
    "List twelve countries with their capitals, populations and currencies in a table.",
    "Write a train timetable for a small line with six stations and departures every 40 minutes.",
    "Write a step-by-step LaTeX derivation of the quadratic formula.",
    "Estimate how many piano tuners work in a city of one million people, showing the assumptions.",
    # structured data
    "Write a CSV file with 15 rows of fictional employees: id, name, department, salary, start date.",
    "Write an XML document describing a library with three books and their loans.",
    "Write a JSON schema for a blog post with title, tags, author and comments.",
    "Write a log file excerpt from a web server with timestamps, status codes and response times.",
    "Write an OpenAPI description in YAML for a small pet store API with two endpoints.",
    "Write a GraphQL schema for a movie database and one query with its response.",
    "Write a TOML configuration file for a game with graphics, audio and controls sections.",
    # instructions and everyday writing
    "Give step-by-step instructions for changing a flat tire.",
    "Write a cover letter for a nurse applying to a children's hospital.",
    "Write a product description for a stainless steel water bottle for an online shop.",
    "Write a blog post about learning to cook as an adult, with practical tips.",
    "Write a eulogy for a beloved grandfather who was a carpenter.",
    "Write a motivational speech for a high-school basketball team before the final.",
    "Write a travel guide entry for Kyoto covering temples, food and transport.",
    "Write a letter to a city council asking for a safer bicycle lane.",
    "Write a short science-fiction story about the first colony on Mars running out of water.",
    "Write a fairy tale for children about a fox who learns to share.",
    "Write a limerick about a cat who learns to type.",
    "Write song lyrics about leaving a small town, with a chorus.",
    "Write a news article about a local marathon, with quotes from runners.",
    "Write a restaurant review of a small ramen shop.",
    "Write the rules of a simple card game for three players.",
    "Explain the rules of chess to a beginner, piece by piece.",
    "Summarize the history of the printing press in three paragraphs.",
    "Describe the life cycle of a star, from nebula to remnant.",
    "Explain how photosynthesis works and write its chemical equation.",
    "Explain inflation and interest rates to a teenager.",
    "Give advice to someone preparing for their first marathon, week by week.",
    "Write a FAQ for a community garden with ten questions and answers.",
    # other languages
    "Schreibe einen kurzen Zeitungsartikel über ein neues Museum in Hamburg.",
    "Écris une lettre formelle pour demander un remboursement à une compagnie aérienne.",
    "Escribe un diálogo entre un turista y un camarero en un restaurante de Madrid.",
    "Scrivi una ricetta per il risotto ai funghi con i passaggi numerati.",
    "Escreva um pequeno texto sobre a história de Lisboa.",
    "Schrijf een korte uitleg over hoe windmolens werken.",
    "Напиши короткий рассказ о зимнем вечере в деревне.",
    "日本の四季について短い文章を書いてください。",
    "한국의 전통 음식에 대해 간단히 설명해 주세요.",
    "اكتب فقرة قصيرة عن أهمية القراءة.",
    "हिंदी में स्वस्थ जीवन के लिए पाँच सुझाव लिखिए।",
    "Napisz krótki opis swojego ulubionego miasta.",
    "Türkçe olarak İstanbul'un tarihini kısaca anlat.",
    "Viết một đoạn văn ngắn về mùa mưa ở Việt Nam.",
    "用中文写一封感谢老师的信。",
    "Translate into Spanish and German: 'The meeting has been moved to Thursday at three o'clock.'",
)

CALIBRATION_RECIPES = ("chat", "wide-chat", "free", "mixed")
# Share of uniformly random tokens in "mixed" rows (ExLlamaV3 mixes about 8%
# random-token rows into its calibration set, for the rare tokens and the
# embeddings no natural text reaches).
RANDOM_ROW_SHARE = 0.05


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
    batch: int | None = None, progress=None, recipe: str = "chat",
) -> torch.Tensor:
    """Rows of text the model writes itself, by one of CALIBRATION_RECIPES:

    - chat: answers to CALIBRATION_PROMPTS through the chat template;
    - wide-chat: the same with WIDE_PROMPTS, many more domains and styles;
    - free: no template, no prompt: each row starts where a document starts
      (what the tokenizer puts first, BOS for most models) and one random
      ordinary token (as LLM-QAT does), and the model writes from its
      pretraining prior;
    - mixed: half wide-chat and half free rows, with RANDOM_ROW_SHARE rows of
      uniformly random tokens, shuffled so the measurement rows (the first
      ones) hold every kind.

    The same arguments give the same rows (the cached calibration and
    byte-identical resume rely on it).
    """
    if recipe not in CALIBRATION_RECIPES:
        raise CalibrationError(f"the calibration recipe must be one of {', '.join(CALIBRATION_RECIPES)}, "
                               f"got {recipe!r}")
    if recipe == "chat":
        return _answer_rows(model, tokenizer, _chat_prompts(tokenizer, CALIBRATION_PROMPTS), rows, length, stop_ids,
                            seed, batch, progress)
    if recipe == "wide-chat":
        return _answer_rows(model, tokenizer, _wide_prompts(tokenizer, seed), rows, length, stop_ids,
                            seed, batch, progress)
    if recipe == "free":
        return _answer_rows(model, tokenizer, _free_prompts(tokenizer, model, stop_ids, seed), rows, length, stop_ids,
                            seed, batch, progress)
    random_count = round(rows * RANDOM_ROW_SHARE)
    wide_count = (rows - random_count + 1) // 2
    free_count = rows - random_count - wide_count
    total = rows * length
    parts = []
    if wide_count:
        parts.append(_answer_rows(model, tokenizer, _wide_prompts(tokenizer, seed), wide_count, length,
                                  stop_ids, seed, batch, _offset(progress, 0, total)))
    if free_count:
        # Another seed than the chat part's, so the two never share a sampling stream.
        parts.append(_answer_rows(model, tokenizer, _free_prompts(tokenizer, model, stop_ids, seed), free_count, length,
                                  stop_ids, seed + 500_000, batch, _offset(progress, wide_count * length, total)))
    generator = torch.Generator().manual_seed(seed)
    if random_count:
        ordinary = _ordinary_token_ids(tokenizer, model, stop_ids)
        picks = torch.randint(len(ordinary), (random_count, length), generator=generator)
        parts.append(ordinary[picks])
        if progress:
            progress(total, total)
    mixed = torch.cat(parts)
    return mixed[torch.randperm(rows, generator=generator)]


def _offset(progress, before: int, total: int):
    return (lambda done, _part_total: progress(before + done, total)) if progress else None


def _chat_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]


def _wide_prompts(tokenizer, seed: int) -> list[list[int]]:
    # Shuffled: a conversion of 32 x 512 tokens answers only about 65 prompts
    # (one batch), and those must not all come from the head of the list.
    order = torch.randperm(len(WIDE_PROMPTS), generator=torch.Generator().manual_seed(seed)).tolist()
    return _chat_prompts(tokenizer, [WIDE_PROMPTS[i] for i in order])


def _ordinary_token_ids(tokenizer, model: CausalLM, stop_ids: set[int]) -> torch.Tensor:
    """Every token id but the tokenizer's special tokens and the stop tokens."""
    special = {tokenizer.token_to_id(token) for token in tokenizer.special_tokens.values()} | set(stop_ids)
    return torch.tensor([i for i in range(model.config.vocab_size) if i not in special], dtype=torch.long)


FREE_PROMPTS = 512  # distinct starts; more rows than that reuse them with other samples


def _free_prompts(tokenizer, model: CausalLM, stop_ids: set[int], seed: int) -> list[list[int]]:
    start = tokenizer.encode("", add_special_tokens=True)  # where a document starts: BOS, or nothing
    ordinary = _ordinary_token_ids(tokenizer, model, stop_ids)
    picks = torch.randint(len(ordinary), (FREE_PROMPTS,), generator=torch.Generator().manual_seed(seed))
    return [start + [int(ordinary[pick])] for pick in picks]


def _answer_rows(
    model: CausalLM, tokenizer, prompts: list[list[int]], rows: int, length: int, stop_ids: set[int], seed: int,
    batch: int | None, progress,
) -> torch.Tensor:
    """Prompts and their answers joined by EOS into one stream, cut into rows.

    Each prompt is answered several times over (different samples) in one wide
    batch that stops as soon as the rows are full, so a long answer may end
    mid-sentence; the next round, if one is needed, samples with a new seed.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
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
