"""Training data: every source, packing with EOS between records (and the BOS where the model uses one), the
validation split, clear refusals."""

from __future__ import annotations

import copy as copy_module
import json

import pytest
import torch
from transformers import AutoTokenizer

from app.core.problems import FrankenMoEError
from app.core.progress import run_job
from app.core.training.data import NamedRecords, pack_data, parse_hub_dataset, read_sources
from app.core.training.settings import RouterTrainingSettings, TrainingData, default_budget
from tests.chat_models import make_tiny_moe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("data") / "moe", "mixtral", seed=1, expert_names=("maths", "code"))


@pytest.fixture(scope="module")
def tokenizer(model):
    return AutoTokenizer.from_pretrained(model)


def pack(tokenizer, sources, seq_len=8, **options):
    defaults = dict(seq_len=seq_len, val_fraction=0.25, seed=0, eos_id=tokenizer.eos_token_id)
    return run_job(pack_data(tokenizer, sources, **(defaults | options)))


def test_records_are_packed_with_eos_between_them_in_fixed_length_sequences(tokenizer):
    records = ("one two three", "four five", "six seven eight nine ten", "eleven")
    packed = pack(tokenizer, [NamedRecords("t", records * 4)], seq_len=6)
    expected = []
    for text in records * 4:
        expected += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # this tokenizer adds no BOS
    count = len(expected) // 6
    rows = torch.cat([packed.train, packed.validation])
    assert rows.shape == (count, 6)
    as_rows = sorted(map(tuple, torch.tensor(expected[: count * 6]).view(count, 6).tolist()))
    assert sorted(map(tuple, rows.tolist())) == as_rows  # every sequence, once, split in two
    assert packed.validation.shape[0] == round(count * 0.25)
    again = pack(tokenizer, [NamedRecords("t", records * 4)], seq_len=6)
    assert torch.equal(again.train, packed.train)  # the split is seeded
    other = pack(tokenizer, [NamedRecords("t", records * 4)], seq_len=6, seed=1)
    assert not torch.equal(other.train, packed.train)


def with_post_processor(tokenizer, single):
    """A copy of the tokenizer that adds special tokens as ``single`` says (e.g. "<s> $A"), as Llama's does."""
    from tokenizers import processors

    copy = copy_module.deepcopy(tokenizer)
    specials = [(token, copy.convert_tokens_to_ids(token)) for token in ("<s>", "</s>") if token in single]
    copy.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return copy


def test_a_tokenizer_with_a_bos_gets_it_at_the_start_of_every_record(tokenizer):
    """The model was trained, and the Evaluate page scores, with the BOS the tokenizer adds: training text too."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    with_bos = with_post_processor(tokenizer, "<s> $A")
    assert with_bos("one two")["input_ids"][0] == bos  # the copy adds the BOS by default
    records = ("one two three", "four five", "six seven eight nine ten")
    packed = pack(with_bos, [NamedRecords("t", records)], seq_len=1, val_fraction=0.0)
    stream = torch.cat([packed.train, packed.validation]).view(-1).tolist()
    expected = []
    for text in records:
        expected += [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    assert sorted(stream) == sorted(expected)  # one-token sequences: the multiset of the whole stream
    assert stream.count(bos) == len(records) and stream.count(eos) == len(records)


def test_a_conversation_keeps_its_templates_one_bos_and_a_closing_eos_is_not_doubled(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    closing = with_post_processor(tokenizer, "<s> $A </s>")  # a tokenizer that closes every text itself
    closing.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    conversation = ({"role": "user", "content": "Hi there"},)
    packed = pack(closing, [NamedRecords("t", ("one two", conversation))], seq_len=1, val_fraction=0.0)
    stream = torch.cat([packed.train, packed.validation]).view(-1).tolist()
    assert stream.count(bos) == 2  # one per record: the template's, not doubled by the tokenizer's
    assert stream.count(eos) == 2  # the tokenizer's own EOS after the text, the packer's after the conversation
    assert len(stream) == len(closing("one two")["input_ids"]) + len(tokenizer("<s>Hi there\n")["input_ids"]) + 1


def test_every_file_format_and_the_recipe_prompts_are_read(tmp_path, model, tokenizer):
    import pyarrow
    import pyarrow.parquet

    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.")
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": conversation}))
    pyarrow.parquet.write_table(pyarrow.table({"text": ["from parquet"]}), tmp_path / "c.parquet")
    data = TrainingData(files=(tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"), recipe_prompts=True)
    sources = read_sources(data, model)
    assert [s.name for s in sources] == ["a.txt", "b.jsonl", "c.parquet", "recipe prompts"]
    assert sources[0].records == ("First paragraph.", "Second paragraph.")
    assert sources[3].records == ("maths", "code")
    packed = pack(tokenizer, sources, seq_len=2)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    texts = ["First paragraph.", "Second paragraph.", "plain", rendered, "from parquet", "maths", "code"]
    stream = []
    for text in texts:  # the conversation through the chat template, as its rendered text
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert packed.records == 7 and packed.tokens == len(stream) // 2 * 2
    rows = sorted(map(tuple, torch.cat([packed.train, packed.validation]).tolist()))
    assert rows == sorted(map(tuple, torch.tensor(stream[: packed.tokens]).view(-1, 2).tolist()))


def test_a_hub_dataset_is_read_through_the_datasets_library(tmp_path, monkeypatch, model):
    """`datasets` resolves an id to a local folder of that name first: a real load, without the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "someone" / "texts"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(5)))
    (source,) = read_sources(TrainingData(hub_datasets=("someone/texts",)), model)
    assert source.records == tuple(f"row {i}" for i in range(5))


def test_hub_dataset_names_split_into_id_config_and_split():
    assert parse_hub_dataset("org/name") == ("org/name", None, "train")
    assert parse_hub_dataset("org/name/test") == ("org/name", None, "test")
    assert parse_hub_dataset("wikitext:wikitext-2-raw-v1/validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hub_dataset("org/name:cfg") == ("org/name", "cfg", "train")
    for bad in ("", "a/b/c/d", "/x"):
        with pytest.raises(FrankenMoEError):
            parse_hub_dataset(bad)


def test_data_too_short_for_two_sequences_is_refused(tokenizer):
    with pytest.raises(FrankenMoEError) as excinfo:
        pack(tokenizer, [NamedRecords("tiny", ("a few words",))], seq_len=64)
    assert "fewer than the 128" in excinfo.value.message and "tiny" in excinfo.value.message


def test_text_with_nothing_in_it_is_refused(tokenizer):
    with pytest.raises(FrankenMoEError, match="holds no text"):
        pack(tokenizer, [NamedRecords("blank", ("   ", "\n"))])


def test_reading_stops_once_the_budget_is_packed(tokenizer):
    records = tuple(f"record number {i} with some words" for i in range(2000))
    packed = pack(tokenizer, [NamedRecords("many", records)], max_tokens=300, max_validation=2)
    assert packed.truncated and packed.records < 2000
    assert packed.validation.shape[0] == 2


def test_default_budget_aims_at_about_a_minute_and_says_so(model):
    steps, sentence = default_budget(model)
    assert 20 <= steps <= 400
    assert f"training {steps} steps" in sentence and "--steps" in sentence
    big_steps, _ = default_budget(model, RouterTrainingSettings(batch_size=64, seq_len=2048))
    assert big_steps < steps
