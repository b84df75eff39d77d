"""The token loop against transformers, sampling, conversations with branches, save/load, dense models."""

from __future__ import annotations

import copy

import pytest
import torch

from app.core.chat import (
    ChatModel,
    ChatSession,
    Conversation,
    LoadRequest,
    PromptProcessed,
    SamplingSettings,
    TokenGenerated,
    load_chat_model,
)
from app.core.chat.model import IncrementalDecoder, _Sampler
from app.core.problems import FrankenMoEError
from app.core.progress import run_job
from tests.chat_models import make_tiny_moe


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = make_tiny_moe(tmp_path_factory.mktemp("session") / "qwen3", "qwen3_moe", seed=11)
    model = run_job(load_chat_model(LoadRequest(str(folder), device="cpu")))
    yield model
    model.unload()


def answer(model: ChatModel, text: str, settings: SamplingSettings, **kwargs):
    ids = model.prompt_ids([{"role": "user", "content": text}])
    return ids, run_job(model.generate(ids, settings, **kwargs))


def test_greedy_decoding_matches_transformers_generate(chat):
    settings = SamplingSettings(temperature=0, repetition_penalty=1.3, max_new_tokens=12)
    ids, ours = answer(chat, "Compute 7 times 8", settings, stop_token_ids=())
    config = copy.deepcopy(chat.model.generation_config)
    config.eos_token_id = None
    reference = chat.model.generate(
        torch.tensor([ids]), generation_config=config, max_new_tokens=12, do_sample=False, repetition_penalty=1.3
    )
    assert [t.token_id for t in ours.generated] == reference[0, len(ids) :].tolist()
    assert ours.text == chat.tokenizer.decode(reference[0, len(ids) :])


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1),
        SamplingSettings(temperature=1.3, top_k=5, top_p=1.0, repetition_penalty=1.0),
        SamplingSettings(temperature=0.5, top_k=0, top_p=0.5, repetition_penalty=0.8),
    ],
)
def test_sampling_filters_match_transformers_logits_processors(settings):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=generator) * 3
    history = torch.tensor([[5, 17, 17, 230, 99]])
    seen = torch.zeros(300, dtype=torch.bool)
    seen[history[0]] = True
    ours = _Sampler(settings, generator, seen).scores(logits)

    reference = logits[None].clone()
    if settings.repetition_penalty != 1.0:
        reference = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(history, reference)
    reference = TemperatureLogitsWarper(settings.temperature)(history, reference)
    if settings.top_k:
        reference = TopKLogitsWarper(settings.top_k)(history, reference)
    if settings.top_p < 1:
        reference = TopPLogitsWarper(settings.top_p)(history, reference)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference[0]))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], reference[0][kept])


def test_a_seed_repeats_an_answer_and_an_unseeded_answer_reports_its_seed(chat):
    settings = SamplingSettings(temperature=1.0, max_new_tokens=10)
    _, first = answer(chat, "Write a poem", settings, stop_token_ids=())
    _, again = answer(chat, "Write a poem", SamplingSettings(temperature=1.0, max_new_tokens=10, seed=first.seed))
    _, other = answer(chat, "Write a poem", SamplingSettings(temperature=1.0, max_new_tokens=10, seed=first.seed + 1))
    assert [t.token_id for t in again.generated] == [t.token_id for t in first.generated][: len(again.generated)]
    assert [t.token_id for t in other.generated] != [t.token_id for t in first.generated]


def test_events_stream_the_prompt_then_each_token_with_its_timing(chat):
    job = chat.generate(
        chat.prompt_ids([{"role": "user", "content": "hi"}]), SamplingSettings(seed=3, max_new_tokens=6)
    )
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as finished:
            result = finished.value
            break
    assert isinstance(events[0], PromptProcessed) and events[0].tokens == result.prompt
    tokens = events[1:]
    assert all(isinstance(e, TokenGenerated) for e in tokens)
    assert [e.count for e in tokens] == list(range(1, len(result.generated) + 1))
    assert "".join(e.text for e in tokens) == result.text
    assert result.time_to_first_token > 0
    assert result.stop_reason in ("eos", "length")
    if len(tokens) > 1:
        assert tokens[-1].tokens_per_second == pytest.approx(result.tokens_per_second)


def test_the_token_that_ends_an_answer_is_not_part_of_its_text(chat):
    # With plain sampling, seed 34 ends this tiny model's answer with its end-of-text token, "</s>".
    settings = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=40, seed=34)
    session = ChatSession(chat, settings=settings)
    events: list = []
    reply = run_job(session.send("What is 2 plus 2?"), events.append)
    generation = reply.generation
    assert generation.stop_reason == "eos" and generation.generated[-1].token == "</s>"  # kept in the trace
    streamed = [e.text for e in events if isinstance(e, TokenGenerated)]
    assert streamed[-1] == "" and "".join(streamed) == reply.content
    assert reply.content.strip() and "</s>" not in reply.content
    assert "</s>" not in session.conversation.to_markdown()
    # A conversation saved before, with the end token in the answer's text, opens without it.
    saved = session.conversation.to_json()
    saved["messages"][-1]["content"] += "</s>"
    assert Conversation.from_json(saved).messages[reply.id].content == reply.content


def test_incremental_text_equals_decoding_the_whole_answer(chat):
    text = "héllo wörld ✓ 12 plus 30"
    ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(chat.tokenizer)
    assert "".join(decoder.add(i) for i in ids) == chat.tokenizer.decode(ids) == text


def test_editing_and_regenerating_branch_instead_of_erasing(chat):
    session = ChatSession(chat, Conversation(system_prompt="You are terse."), SamplingSettings(max_new_tokens=4))
    first_answer = run_job(session.send("What is 2 plus 2?"))
    question = session.conversation.messages[first_answer.parent]
    run_job(session.send("And 3 plus 3?"))
    assert [m.role for m in session.conversation.path()] == ["user", "assistant", "user", "assistant"]

    regenerated = run_job(session.regenerate())
    previous, newest = session.conversation.siblings(regenerated.id)
    assert newest.id == regenerated.id and previous.role == "assistant" and previous.parent == regenerated.parent

    edited_answer = run_job(session.edit(question.id, "What is 5 plus 5?"))
    path = session.conversation.path()
    assert path[0].content == "What is 5 plus 5?" and path[-1] is edited_answer
    # The old branch is still there, whole, and can be shown again.
    session.conversation.select(question.id)
    old = session.conversation.path()
    assert old[0].content == "What is 2 plus 2?" and len(old) == 4
    assert old[-1].id == regenerated.id  # the most recent answer of that branch
    assert len(session.conversation.messages) == 7

    # The system prompt reached the model through the chat template.
    prompt_text = "".join(t.token for t in first_answer.generation.prompt)
    assert prompt_text.startswith("<|system|>\nYou are terse.")


def test_conversations_save_and_load_with_their_routing(chat, tmp_path):
    session = ChatSession(chat, Conversation(system_prompt="Be brief."), SamplingSettings(seed=4, max_new_tokens=5))
    run_job(session.send("Tell me about the sea"))
    run_job(session.regenerate())
    path = tmp_path / "chat.json"
    session.conversation.save(path)
    loaded = Conversation.load(path)
    assert loaded.to_json() == session.conversation.to_json()
    answer_message = loaded.path()[-1]
    assert answer_message.generation is not None
    assert len(answer_message.generation.generated) == 5
    assert (
        answer_message.generation.generated[0].experts
        == session.conversation.path()[-1].generation.generated[0].experts
    )
    markdown = loaded.to_markdown()
    assert markdown.startswith(f"# Chat with {chat.name}\n")
    assert "**System**\n\nBe brief.\n" in markdown
    assert "**User**\n\nTell me about the sea\n" in markdown
    assert f"**Assistant**\n\n{answer_message.content}\n" in markdown
    assert "seed 4" in markdown

    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(FrankenMoEError, match="not a FrankenMoE Studio conversation"):
        Conversation.load(tmp_path / "other.json")


def test_a_conversation_is_autosaved_per_model_and_restored(chat, tmp_path, monkeypatch):
    from app.core.chat.autosave import autosave_conversation, autosave_path, restore_conversation

    folder = tmp_path / "autosave"
    model = tmp_path / "models" / "moe"
    model.mkdir(parents=True)
    session = ChatSession(chat, Conversation(system_prompt="Be brief."), SamplingSettings(seed=4, max_new_tokens=3))
    run_job(session.send("Remember me"))
    assert restore_conversation(folder, str(model)) is None
    autosave_conversation(session.conversation, folder, str(model))
    monkeypatch.chdir(tmp_path)
    for spelling in ("models/moe", "models/moe/", str(model)):  # one model, however its folder is written
        assert restore_conversation(folder, spelling).to_json() == session.conversation.to_json()
    assert restore_conversation(folder, "org/another-model") is None
    assert [p.name for p in folder.iterdir()] == [autosave_path(folder, str(model)).name]  # no partial file left

    autosave_conversation(Conversation(), folder, str(model))  # an emptied conversation leaves nothing
    assert restore_conversation(folder, str(model)) is None
    autosave_path(folder, "org/broken").write_text("{", encoding="utf-8")
    with pytest.raises(FrankenMoEError, match="cannot read the conversation"):
        restore_conversation(folder, "org/broken")


def test_a_dense_model_chats_without_a_panel_and_says_why(llama_donors):
    dense = run_job(load_chat_model(LoadRequest(str(llama_donors["base"]), device="cpu")))
    try:
        assert not dense.is_moe
        assert "dense model (LlamaForCausalLM)" in dense.panel_unavailable_reason
        assert "no layer has a router" in dense.panel_unavailable_reason
        # A fixed seed: a random one could sample the end-of-text token first and generate nothing.
        reply = run_job(ChatSession(dense, settings=SamplingSettings(max_new_tokens=4, seed=1)).send("hello"))
        assert reply.generation is not None and reply.generation.generated
        assert all(t.experts == () for t in reply.generation.trace)
    finally:
        dense.unload()


def test_prompts_without_a_template_or_with_one_that_refuses_system_messages(chat):
    turns = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    template = chat.tokenizer.chat_template
    try:
        chat.tokenizer.chat_template = None
        plain = chat.tokenizer.decode(chat.prompt_ids(turns))
        assert plain == "<s>System: Be kind.\n\nUser: Hi\n\nAssistant:"
        chat.tokenizer.chat_template = (
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        )
        assert chat.tokenizer.decode(chat.prompt_ids(turns)) == "[user] Be kind.\n\nHi\n"
    finally:
        chat.tokenizer.chat_template = template


def test_bad_sampling_settings_are_refused_with_a_fix(chat):
    with pytest.raises(FrankenMoEError, match="top-p"):
        answer(chat, "hi", SamplingSettings(top_p=0))
    with pytest.raises(FrankenMoEError, match="temperature"):
        answer(chat, "hi", SamplingSettings(temperature=-1))
