"""The free-form chat task and the two prompt styles (trained, protocol) chosen per model."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.backends.base import render_chat
from shared.backends.scripted import ScriptedBackend
from shared.tasks import get_task
from shared.tasks.base import Mode
from shared.tasks.chat import MAX_CHARS, ChatTask
from shared.tasks.prompts import PromptStyle, ProtocolPrompted, for_model, plain_chat


def test_payload_forms_and_limits() -> None:
    task = ChatTask()
    short = task.problem_from_payload({"prompt": "hi", "system": "be brief"})
    assert short.payload == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    again = task.problem_from_payload({"messages": short.payload["messages"]})
    assert again.id == short.id  # the id is the conversation's content
    for bad, says in [
        ({}, "prompt"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "user"),
        ({"prompt": "x" * (MAX_CHARS + 1)}, "characters"),
        ({"prompt": "hi", "temperature": 1}, "unknown"),
    ]:
        with pytest.raises(ValueError, match=says):
            task.problem_from_payload(bad)  # type: ignore[arg-type]


def test_no_grader_and_a_vote_for_parallel() -> None:
    task = get_task("chat")
    problem = task.problem_from_payload({"prompt": "hi"})
    assert task.score(problem, "anything") is None
    assert task.aggregate(["b", " a ", "a", None, ""]) == "a"
    assert task.aggregate(["x", "y"]) == "x"  # a tie goes to the first
    assert task.aggregate([None]) is None
    with pytest.raises(ValueError, match="--split PATH.jsonl"):
        task.problems("test", 3)


def test_trained_prompt_is_the_conversation_as_lines() -> None:
    task = ChatTask()
    problem = task.problem_from_payload({"prompt": "What is 2+2?", "system": "Be brief."})
    assert task.organizer_prompt(problem, Mode.ASYNCTHINK) == (
        "System: Be brief.\nUser: What is 2+2?\nYou may fork workers.\n"
    )
    assert task.organizer_prompt(problem, Mode.SEQUENTIAL).endswith("User: What is 2+2?\n")


def test_protocol_prompts_teach_the_protocol_in_the_chat_format() -> None:
    backend = ScriptedBackend({"organizer": ""})
    assert for_model(ChatTask(), backend, 3).name == "chat"  # trained style: the task itself
    assert not isinstance(for_model(ChatTask(), backend, 3), ProtocolPrompted)
    backend.prompt_style = PromptStyle.PROTOCOL
    prompted = for_model(get_task("countdown"), backend, 3)
    assert isinstance(prompted, ProtocolPrompted) and prompted.default_capacity == 2
    problem = prompted.problem_from_payload({"numbers": [3, 7, 25, 50], "target": 75})
    text = prompted.organizer_prompt(problem, Mode.ASYNCTHINK)
    assert text.startswith("System: You are the organizer") and text.endswith("Assistant: ")
    assert "At most 2 worker(s)" in text and "<JOIN-1>" in text and "separated by ';'" in text
    assert "User: Countdown. Numbers: 3 7 25 50. Target: 75." in text
    assert "You may fork workers" not in text  # the trained hint is not what a prompted model reads
    sequential = prompted.organizer_prompt(problem, Mode.SEQUENTIAL)
    assert "<FORK" not in sequential and "<ANSWER>" in sequential
    worker = prompted.worker_prompt("What is 17*20?")
    assert "You are a worker" in worker and "<RETURN>" in worker and "User: What is 17*20?" in worker
    chat = for_model(ChatTask(), backend, 2).organizer_prompt(
        ChatTask().problem_from_payload({"prompt": "hi", "system": "Be brief."}), Mode.ASYNCTHINK
    )
    assert "You are the organizer" in chat and "Be brief." in chat and chat.count("System:") == 1
    assert prompted.score(problem, "25*3+0") is not None  # scoring is the task's own


def test_render_chat_uses_the_tokenizer_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.fakes.tokenizer import build_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(build_tokenizer_dir(tmp_path / "tok")), local_files_only=True)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(tok, messages) == plain_chat(messages)  # no template: plain lines
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert render_chat(tok, messages) == "<|system|>S\n<|user|>U\n<|assistant|>"


def test_the_model_spec_chooses_the_prompt_style(tiny_model_dir: Path, tmp_path: Path) -> None:
    from shared.backends.registry import open_backend
    from tests.fakes.tokenizer import build_tokenizer_dir

    tok = build_tokenizer_dir(tmp_path / "tok")
    assert open_backend(f"sglang:http://h:30000?tokenizer={tok}").prompt_style is PromptStyle.PROTOCOL
    assert open_backend(f"sglang:http://h:30000?tokenizer={tok}&prompt=trained").prompt_style is PromptStyle.TRAINED
    assert open_backend(f"openai:http://h:8000/v1#m?tokenizer={tok}").prompt_style is PromptStyle.PROTOCOL
    assert open_backend(str(tiny_model_dir)).prompt_style is PromptStyle.TRAINED
    assert open_backend(f"{tiny_model_dir}?prompt=protocol").prompt_style is PromptStyle.PROTOCOL
    with pytest.raises(ValueError, match="prompt must be one of trained, protocol"):
        open_backend(f"sglang:http://h:30000?tokenizer={tok}&prompt=fancy")
