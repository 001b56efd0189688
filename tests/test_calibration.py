"""Calibration rows: from the files a user gives, and from text the model writes itself."""

import json

import pytest
import torch

from core.convert import calibration
from core.convert.calibration import CalibrationError, calibration_text, generate_texts, read_text_file, rows_from_tokens
from core.loader import load
from tests.tiny_models import sample_text, save_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration") / "model"
    save_tiny_chat_model("llama-gqa", folder)
    return load(str(folder), device="cpu")


def test_batched_generation_gives_each_prompt_what_it_gets_alone(tiny):
    # top_k=1 makes sampling greedy, so a row's text must not depend on its batch:
    # not on the left padding of shorter prompts, nor on rows that stop early and leave.
    encode = tiny.tokenizer.encode
    prompts = [encode("The river carries"), encode("My neighbour explains the weights with great care and"),
               encode("Every student")]
    first_alone = generate_texts(tiny.model, prompts[:1], 12, set(), seed=0, top_k=1)[0]
    stop = {first_alone[len(prompts[0]) + 2]}  # the first row stops early
    alone = [generate_texts(tiny.model, [prompt], 12, stop, seed=0, top_k=1)[0] for prompt in prompts]
    together = generate_texts(tiny.model, prompts, 12, stop, seed=0, top_k=1)
    assert together == alone
    assert len(alone[0]) < len(prompts[0]) + 12  # the early stop did happen


def test_self_generated_rows_fill_the_shape_and_repeat_with_the_seed(tiny):
    stop = set(tiny.stop_token_ids)
    reports = []
    make = lambda seed: calibration.self_generated_rows(tiny.model, tiny.tokenizer, 3, 32, stop, seed=seed, batch=8,
                                                        progress=lambda done, total: reports.append((done, total)))
    rows = make(0)
    assert rows.shape == (3, 32) and rows.dtype == torch.long
    assert torch.equal(rows, make(0))
    assert not torch.equal(rows, make(1))
    assert reports and reports[-1][1] == 96 and all(done <= total for done, total in reports)


@pytest.mark.parametrize("recipe", calibration.CALIBRATION_RECIPES)
def test_every_recipe_fills_the_shape_and_repeats_with_the_seed(tiny, recipe):
    stop = set(tiny.stop_token_ids)
    make = lambda seed: calibration.self_generated_rows(tiny.model, tiny.tokenizer, 20, 32, stop, seed=seed, batch=8,
                                                        recipe=recipe)
    rows = make(0)
    assert rows.shape == (20, 32) and rows.dtype == torch.long
    assert torch.equal(rows, make(0))  # the cached calibration and byte-identical resume rely on it
    assert not torch.equal(rows, make(1))


def test_recipes_write_different_text(tiny):
    stop = set(tiny.stop_token_ids)
    made = {recipe: calibration.self_generated_rows(tiny.model, tiny.tokenizer, 20, 32, stop, batch=8, recipe=recipe)
            for recipe in calibration.CALIBRATION_RECIPES}
    chat_start = tiny.tokenizer.encode_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)[0]
    assert made["chat"][0, 0] == chat_start and made["wide-chat"][0, 0] == chat_start
    # Unprompted rows carry no chat template at all.
    assert chat_start not in made["free"][:, :2].flatten().tolist()
    assert not torch.equal(made["chat"], made["wide-chat"])
    # mixed: one random-token row in 20 (5%), and rows of both kinds among the first ones (the measurement rows).
    firsts = made["mixed"][:8, 0].tolist()
    assert chat_start in firsts and any(token != chat_start for token in firsts)


def test_an_unknown_recipe_is_refused_with_the_known_ones(tiny):
    with pytest.raises(CalibrationError, match=r"recipe must be one of chat, wide-chat, free, mixed, got 'wiki'"):
        calibration.self_generated_rows(tiny.model, tiny.tokenizer, 2, 32, set(), recipe="wiki")


def test_rows_are_cached_and_made_again_when_the_source_changes(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return torch.arange(12).view(3, 4)

    cache = tmp_path / "calibration.safetensors"
    first = calibration.load_or_make_rows(cache, {"source": "a"}, make)
    again = calibration.load_or_make_rows(cache, {"source": "a"}, make)
    assert torch.equal(first, again) and len(calls) == 1
    calibration.load_or_make_rows(cache, {"source": "b"}, make)
    assert len(calls) == 2
    cache.write_bytes(b"not safetensors")
    calibration.load_or_make_rows(cache, {"source": "b"}, make)
    assert len(calls) == 3


def test_text_jsonl_and_parquet_files_give_their_text(tmp_path):
    texts = [sample_text(5, seed=1), sample_text(5, seed=2)]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    assert read_text_file(tmp_path / "a.txt") == texts[0]
    assert read_text_file(tmp_path / "a.jsonl") == "\n\n".join(texts)
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"id": [0, 1], "content": texts}), tmp_path / "a.parquet")
    assert read_text_file(tmp_path / "a.parquet") == "\n\n".join(texts)


def test_bad_calibration_files_are_named_in_the_error(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(CalibrationError, match=r"b\.jsonl:2 has no string field 'text'"):
        read_text_file(tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\x00broken")
    with pytest.raises(CalibrationError, match="cannot read"):
        read_text_file(tmp_path / "c.txt")
    with pytest.raises(CalibrationError, match="fewer than one row of 64"):
        rows_from_tokens(list(range(10)), 4, 64)


def test_rows_spread_over_the_whole_text():
    rows = rows_from_tokens(list(range(1000)), 4, 100)
    assert rows[:, 0].tolist() == [0, 300, 600, 900]
    assert torch.equal(rows[1], torch.arange(300, 400))


@pytest.mark.parametrize("outside", ["/etc/passwd", "/proc/self/environ", "/no/such/file.txt", "UPLOADS/../secret.txt",
                                     "UPLOADS/link.txt"])
def test_files_outside_the_allowed_roots_get_one_sentence_whether_they_exist_or_not(tmp_path, outside):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    (uploads / "link.txt").symlink_to(tmp_path / "secret.txt")
    source = outside.replace("UPLOADS", str(uploads))
    with pytest.raises(CalibrationError) as refusal:
        calibration_text(source, allowed_roots=[uploads])
    assert str(refusal.value) == (f"calibration file {source} is not available here: upload a text file, "
                                  "or name a Hub dataset file as hf:<dataset id>:<file>")


def test_uploads_inside_the_allowed_roots_are_read(tmp_path):
    (tmp_path / "upload.txt").write_text("calibration words")
    assert calibration_text(str(tmp_path / "upload.txt"), allowed_roots=[tmp_path]) == "calibration words"
    # Local use (no roots) reads any file, and says which problem a path has.
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_text(str(tmp_path / "missing.txt"))


def test_hub_dataset_files_pass_the_roots_and_bad_names_are_refused(tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("from the hub")
    monkeypatch.setattr(calibration, "hub_dataset_file", lambda repo_id, filename, token=None: tmp_path / filename)
    assert calibration_text("hf:someone/texts:data.txt", allowed_roots=[tmp_path / "uploads"]) == "from the hub"
    with pytest.raises(CalibrationError, match="'hf:someone/texts' is not a Hub dataset file; write hf:<dataset id>:<file>"):
        calibration_text("hf:someone/texts", allowed_roots=[])


def test_dotdot_in_a_hub_dataset_file_name_is_refused():
    with pytest.raises(CalibrationError, match="cannot contain a '..' path segment"):
        calibration.hub_dataset_file("someone/texts", "../../../../etc/passwd")
