"""Chat templates: rendered as transformers renders them, but a hostile one is stopped with a reason."""

from __future__ import annotations

import threading

import pytest
from transformers import AutoTokenizer

from app.core.chat import ChatSession, LoadRequest, SamplingSettings, load_chat_model
from app.core.chat.template import MAX_RENDERED_CHARS, TemplateLimitError, render_chat_template
from app.core.progress import Cancelled, run_job
from tests.models import CHAT_TEMPLATE, write_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": 'What is 2 + 2? <b>"quoted"</b> ünïcode'},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]

# Real templates' habits: bos_token, namespace, loop controls, tojson, the generation tag, raise_exception.
REALISTIC_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "<|{{ m['role'] }}|>{% if loop.first and ns.system %}{{ ns.system ~ '\\n' }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}\n"
    "{% endfor %}{{ {'n': messages | length, 'x': '<&>'} | tojson }}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, REALISTIC_TEMPLATE])
def test_templates_render_exactly_as_transformers_renders_them(tmp_path, template):
    write_tokenizer(tmp_path, chat_template=template)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ours = render_chat_template(tokenizer.get_chat_template(), CONVERSATION, tokenizer.special_tokens_map)
    assert ours == expected
    assert "<s>" in ours or template == CHAT_TEMPLATE


NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
DOUBLING = "{{% set ns = namespace(s='x') %}}{{% for i in range(40) %}}{{% set ns.s = {} %}}{{% endfor %}}"
HOSTILE_SIZES = {
    "repetition": "{{ 'x' * 3000000000 }}",
    "doubling with ~": DOUBLING.format("ns.s ~ ns.s"),
    "doubling with +": DOUBLING.format("ns.s + ns.s"),
    "doubling with %": DOUBLING.format("'%s%s' % (ns.s, ns.s)"),
    "replace method": (
        "{% set ns = namespace(s='xx') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s.replace('x', 'xxxxxxxx') %}{% endfor %}"
    ),
    "replace filter": (
        "{% set ns = namespace(s='xx') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s | replace('x', 'xxxxxxxx') %}{% endfor %}"
    ),
    "join": "{{ (['x' * 1000000] * 100) | join }}",
    "output in a loop": "{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}",
    "padding": "{{ 'x'.center(10000000000) }}",
    "printf width": "{{ '%10000000000s' % 'x' }}",
    "printf width filter": "{{ '%10000000000s' | format('x') }}",
    "format width": "{{ '{:>10000000000}'.format('x') }}",
}


def test_a_template_that_never_ends_stops_at_the_time_limit():
    with pytest.raises(TemplateLimitError) as caught:
        render_chat_template(NESTED_LOOPS, CONVERSATION, time_limit_s=0.2)
    assert "ran past the 0.2 s limit" in caught.value.message
    assert "chat template" in caught.value.hint
    # A loop over a long string, not a range, is stopped too.
    looping = "{% set s = 'a' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimitError, match="limit"):
        render_chat_template(looping, CONVERSATION, time_limit_s=0.2)


@pytest.mark.parametrize("case", list(HOSTILE_SIZES))
def test_a_template_building_a_huge_string_stops_at_the_size_limit(case):
    with pytest.raises(TemplateLimitError) as caught:
        render_chat_template(HOSTILE_SIZES[case], CONVERSATION)
    assert f"{MAX_RENDERED_CHARS:,}" in caught.value.message


def test_huge_powers_are_refused():
    with pytest.raises(TemplateLimitError, match="power 100000000"):
        render_chat_template("{{ 2 ** 100000000 }}", CONVERSATION)


def test_a_running_render_stops_when_cancelled():
    cancel = threading.Event()
    outcome: list[BaseException] = []
    started = threading.Event()

    def render() -> None:
        try:
            render_chat_template(
                "{% for i in range(99999) %}{% if i == 1 %}{{ started() }}{% endif %}"
                "{% for j in range(99999) %}{% endfor %}{% endfor %}",
                CONVERSATION,
                {"started": started.set},
                time_limit_s=3600,
                cancel=cancel,
            )
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    assert started.wait(60)
    cancel.set()
    worker.join(60)
    assert not worker.is_alive()
    [error] = outcome
    assert isinstance(error, Cancelled)


@pytest.fixture(scope="module")
def chat(llama_donors):
    model = run_job(load_chat_model(LoadRequest(str(llama_donors["base"]), device="cpu")))
    yield model
    model.unload()


def test_a_hostile_template_in_a_model_gives_one_message(chat):
    template = chat.tokenizer.chat_template
    try:
        chat.tokenizer.chat_template = HOSTILE_SIZES["repetition"]
        with pytest.raises(TemplateLimitError, match="characters"):
            chat.prompt_ids([{"role": "user", "content": "hi"}])
    finally:
        chat.tokenizer.chat_template = template


def test_the_chat_stop_flag_cancels_a_template_that_never_ends(chat):
    template = chat.tokenizer.chat_template
    stop = threading.Event()
    outcome: list[BaseException] = []

    def send() -> None:
        try:
            run_job(ChatSession(chat, settings=SamplingSettings(max_new_tokens=2, seed=1)).send("hi", stop))
        except BaseException as exc:
            outcome.append(exc)

    try:
        chat.tokenizer.chat_template = NESTED_LOOPS
        worker = threading.Thread(target=send, daemon=True)
        worker.start()
        stop.set()  # what the chat page's Stop button does
        worker.join(60)
        assert not worker.is_alive()
        [error] = outcome
        assert isinstance(error, Cancelled)
    finally:
        chat.tokenizer.chat_template = template
