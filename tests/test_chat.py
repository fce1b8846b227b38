"""Chat templates rendered as transformers renders them, and chat generation on a real model."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tokentrail
from tokentrail.chat import ChatTemplate, ChatTemplateError, end_of_turn_ids
from conftest import CHATML, chatml_demo, popen_taking_ctrl_c, press_ctrl_c, require

TEMPLATES = Path(__file__).parent / "chat_templates"
TEMPLATE_FILES = sorted(p.name for p in TEMPLATES.glob("*.jinja"))
DEMO = Path(tokentrail.__file__).parent / "models" / "demo"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "the city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}

CONVERSATIONS = {
    "one user turn": dict(messages=[{"role": "user", "content": "Hello <b>there</b> & \"you\""}],
                          add_generation_prompt=True),
    "system and turns": dict(messages=[
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Café ünïcode ✓"}], add_generation_prompt=True),
    "no generation prompt": dict(messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False),
    "tools": dict(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "abc123def", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "abc123def", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "Thanks. And Rome?"}], tools=[WEATHER_TOOL], add_generation_prompt=True),
    "documents": dict(messages=[{"role": "user", "content": "What does the note say?"}],
                      documents=[{"title": "Note", "text": "The storm is near the farm."},
                                 {"title": "Other", "text": "Nothing <here>."}], add_generation_prompt=True),
    "continue final message": dict(messages=[
        {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}],
        continue_final_message=True),
    "roles that do not alternate": dict(messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}], add_generation_prompt=True),
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    require("transformers")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(DEMO / "tokenizer.json"), **SPECIAL)


def _reference(hf_tokenizer, template: str, conv: dict) -> tuple[str | None, str | None]:
    """transformers' rendering, or the error message it raised."""
    try:
        conv = dict(conv)
        messages = conv.pop("messages")
        return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **conv), None
    except Exception as e:  # noqa: BLE001 - whatever transformers raised, tokentrail must refuse too
        return None, str(e)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("file", TEMPLATE_FILES)
def test_template_renders_as_transformers_does(hf_tokenizer, file, conversation):
    source = (TEMPLATES / file).read_text(encoding="utf-8")
    conv = CONVERSATIONS[conversation]
    expected, error = _reference(hf_tokenizer, source, conv)
    template = ChatTemplate(source, SPECIAL)
    if error is not None:
        with pytest.raises(ValueError) as info:
            template.render(**conv)
        assert error in str(info.value)
    else:
        assert template.render(**conv) == expected


def test_generation_block_and_globals_render_as_transformers_does(hf_tokenizer):
    # A template of our own reaching every global, filter and extension transformers provides.
    source = ("{%- set ns = namespace(n=0) -%}{%- set d = dict(a=1, b=[1, 2]) -%}"
              "{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}"
              "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
              "{%- else %}{{ m | tojson }}{%- endif %}\n"
              "{%- if loop.index > 5 %}{% break %}{% endif -%}{%- endfor -%}"
              "{{ d | tojson(indent=2, sort_keys=True) }}|{{ ns.n }}|{{ strftime_now('%Y') }}"
              "{%- if add_generation_prompt %}<gen>{% endif %}")
    conv = dict(messages=[{"role": "user", "content": "<é & ü>"}, {"role": "assistant", "content": "ok"}],
                add_generation_prompt=True)
    expected, _ = _reference(hf_tokenizer, source, conv)
    assert ChatTemplate(source, SPECIAL).render(**conv) == expected


def test_template_sandbox_refuses_what_transformers_refuses():
    import jinja2

    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises((ChatTemplateError, jinja2.exceptions.SecurityError)):
        template.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}").render([{"role": "user", "content": "x"}])


def test_named_templates_are_chosen_as_transformers_chooses():
    t = ChatTemplate({"default": "D", "tool_use": "T", "rag": "R"})
    msgs = [{"role": "user", "content": "x"}]
    assert t.render(msgs) == "D"
    assert t.render(msgs, tools=[WEATHER_TOOL]) == "T"
    assert t.render(msgs, template_name="rag") == "R"
    with pytest.raises(ChatTemplateError, match="no chat template named 'x'"):
        t.render(msgs, template_name="x")


@pytest.mark.parametrize("bad, field", [
    ("hello", "messages"), ([], "messages"), ([{"content": "x"}], "messages[0].role"), (["x"], "messages[0]")])
def test_bad_conversations_are_refused(bad, field):
    with pytest.raises(ValueError) as info:
        ChatTemplate("x").render(bad)
    assert str(info.value).startswith(field + ":")


# ---------------------------------------------------------------- a model with a ChatML template



@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> Path:
    return chatml_demo(tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def chatml_model(chatml_dir):
    return tokentrail.load(chatml_dir)


def test_template_is_read_from_tokenizer_config_and_jinja_file(chatml_model, chatml_dir, tmp_path):
    tok = chatml_model.tokenizer
    assert tok.chat_template is not None and tok.chat_template.templates["default"] == CHATML
    assert tok.chat_template.special_tokens["eos_token"] == "</s>"
    assert end_of_turn_ids(tok, tok.chat_template) == [2, 3]  # </s> and <|im_end|>
    other = tmp_path / "m"
    shutil.copytree(chatml_dir, other)
    (other / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert tokentrail.load(other).tokenizer.chat_template.render([{"role": "user", "content": "a"}]) == "a!"


def test_gguf_carries_the_chat_template(chatml_model, tmp_path):
    gguf = pytest.importorskip("gguf")
    from tokentrail.loading import read_checkpoint
    from tokentrail.loading.gguf_writer import write_gguf

    path = write_gguf(read_checkpoint(chatml_model.source), tmp_path / "m.gguf", dtype="f32")
    # The key as the gguf package reads it, and as tokentrail reads it back.
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    assert field.contents() == CHATML
    model = tokentrail.load(path)
    assert model.tokenizer.chat_template.templates["default"] == CHATML
    msgs = [{"role": "user", "content": "The storm is"}]
    assert model.chat(msgs, temperature=0, max_new_tokens=8).text == \
        chatml_model.chat(msgs, temperature=0, max_new_tokens=8).text


def test_chat_prompt_ids_equal_transformers_tokenization(chatml_model, chatml_dir):
    require("transformers")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(chatml_dir / "tokenizer.json"), **SPECIAL)
    conv = CONVERSATIONS["tools"]
    conv = dict(conv)
    messages = conv.pop("messages")
    expected = hf.apply_chat_template(messages, chat_template=CHATML, tokenize=True, return_dict=False, **conv)
    from tokentrail.chat import prepare

    text, ids, _ = prepare(chatml_model, messages, tools=conv["tools"])
    assert ids == list(expected)
    assert text == hf.apply_chat_template(messages, chat_template=CHATML, tokenize=False, **conv)


def test_chat_stops_at_the_end_of_turn_token(chatml_model, chatml_dir):
    require("transformers")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(chatml_dir / "tokenizer.json"), **SPECIAL)
    msgs = [{"role": "user", "content": "The storm is"}]
    ids = list(hf.apply_chat_template(msgs, chat_template=CHATML, add_generation_prompt=True, return_dict=False))
    # A bias toward <|im_end|> (id 3) makes the model end its turn part way; the same seed
    # and options without any stop show where it falls.
    opts = dict(temperature=1.0, seed=3, logit_bias={3: 16.0})
    free = chatml_model.generate(ids, max_new_tokens=40, ignore_eos=True, **opts)
    assert 3 in free.token_ids
    end = free.token_ids.index(3)
    assert 2 not in free.token_ids[:end]
    reply = chatml_model.chat(msgs, max_new_tokens=40, **opts)
    assert reply.generation.token_ids == free.token_ids[:end + 1]
    assert reply.finish_reason == "eos"
    assert reply.text == chatml_model.tokenizer.decode(free.token_ids[:end])
    assert reply.message == {"role": "assistant", "content": reply.text}
    streamed = list(chatml_model.chat(msgs, max_new_tokens=40, stream=True, **opts))
    assert "".join(s.text for s in streamed) == reply.text


def test_chat_with_an_explicit_template_on_the_demo_model():
    model = tokentrail.load()
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    reply = model.chat([{"role": "user", "content": "The storm is"}], chat_template=template, temperature=0,
                       max_new_tokens=12)
    assert reply.prompt == "<s>The storm is"
    alone = model.generate("The storm is", temperature=0, max_new_tokens=12)
    assert reply.generation.token_ids == alone.token_ids
    with pytest.raises(ChatTemplateError, match="no chat template"):
        model.chat([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------- the interactive command

def _chat_cli(model_dir, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokentrail.cli", "chat", "--model", str(model_dir),
                           "--temperature", "0", "--max-new-tokens", "16", *extra],
                          input=stdin, capture_output=True, text=True, timeout=180)


def test_chat_command_keeps_history_and_handles_commands(chatml_model, chatml_dir):
    out = _chat_cli(chatml_dir, "The storm is\nAnd then\n/system Be brief.\n/reset\nThe storm is\n/journey\n")
    assert out.returncode == 0, out.stderr
    # Reference: the same conversation through model.chat.
    first = chatml_model.chat([{"role": "user", "content": "The storm is"}], temperature=0, max_new_tokens=16)
    history = [{"role": "user", "content": "The storm is"}, first.message, {"role": "user", "content": "And then"}]
    second = chatml_model.chat(history, temperature=0, max_new_tokens=16)
    with_system = chatml_model.chat([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "The storm is"}], temperature=0, max_new_tokens=16)
    text = out.stdout
    assert first.text.strip() in text and second.text.strip() in text and with_system.text.strip() in text
    assert text.index(first.text.strip()) < text.index(second.text.strip()) < text.index(with_system.text.strip())
    assert "the journey of" in text and "logit lens" in text


def test_chat_command_reuses_the_earlier_turns_through_its_prompt_cache(chatml_model, chatml_dir):
    turns = "The storm is\nAnd then\n"
    cached = _chat_cli(chatml_dir, turns)
    plain = _chat_cli(chatml_dir, turns, "--prompt-cache", "0")
    assert cached.returncode == 0 and plain.returncode == 0, cached.stderr + plain.stderr
    assert cached.stdout == plain.stdout  # the same replies
    # After each reply: its speed line; the second turn's prompt starts from the first turn's cache.
    lines = [line for line in cached.stderr.splitlines() if line.startswith("(prompt:")]
    assert len(lines) == 2 and "cached" not in lines[0] and "cached)" in lines[1]
    first = chatml_model.chat([{"role": "user", "content": "The storm is"}], temperature=0, max_new_tokens=16)
    reused = int(lines[1].split("(")[2].split()[0])
    assert len(first.generation.prompt_ids) <= reused
    assert not any("cached" in line for line in plain.stderr.splitlines())


def test_chat_command_ends_cleanly_on_end_of_input(chatml_dir):
    out = _chat_cli(chatml_dir, "")
    assert out.returncode == 0 and "Traceback" not in out.stderr


def test_chat_command_reports_a_model_without_template():
    out = subprocess.run([sys.executable, "-m", "tokentrail.cli", "chat"], input="hi\n", capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no chat template" in out.stderr and "Traceback" not in out.stderr


def test_chat_command_leaves_cleanly_on_ctrl_c(chatml_dir):
    proc = popen_taking_ctrl_c([sys.executable, "-m", "tokentrail.cli", "chat", "--model", str(chatml_dir)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.read(2) == "> "  # waiting for the first message
        ended_by_ctrl_c = press_ctrl_c(proc, tries=12)  # stdin stays open: only Ctrl-C can end it
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert ended_by_ctrl_c and proc.returncode == 0 and "Traceback" not in err
