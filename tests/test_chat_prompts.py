"""Chat templates of custom tasks: string and TRL conversational prompts, chat_template="auto" | True | False, the
system prompt, one BOS, the end-of-turn stop token, what the reward sees, and a PPO update on a templated task."""

from __future__ import annotations

import copy
import json
import logging

import gymnasium as gym
import pytest
import torch
from conftest import save_tiny_lm

from sb3_textrl import TextGenerationEnv, TextPrompt, make_text_task_env, register_text_task
from sb3_textrl.envs import load_prompts
from sb3_textrl.envs import text_env as text_env_module
from sb3_textrl.sft import task_sft_examples

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def templated(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + "<|im_start|>assistant\n"


def constant(prompts, completions, references):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def chat_tokenizer(gpt2_tokenizer):
    """GPT-2's tokenizer with ChatML's two special tokens and a ChatML chat template."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, chat_tokenizer) -> str:
    """A tiny GPT-2 sized to the chat tokenizer, saved with it."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-chat-gpt2"), chat_tokenizer)


@pytest.fixture
def fresh_log_once(monkeypatch):
    monkeypatch.setattr(text_env_module, "_already_logged", set())


def decoded_prompts(env: TextGenerationEnv) -> list[str]:
    return [env.tokenizer.decode(ids) for ids in env.prompt_ids]


def test_string_prompts_are_templated_by_default(chat_tokenizer):
    calls = []

    def recording(prompts, completions, references):
        calls.append(list(prompts))
        return [1.0] * len(completions)

    env = make_text_task_env(["Say hi", "Describe the sea"], recording, tokenizer=chat_tokenizer, max_prompt_tokens=32)
    assert decoded_prompts(env) == [templated(("user", "Say hi")), templated(("user", "Describe the sea"))]
    obs, info = env.reset(options={"prompt_index": 0})
    valid = obs["input_ids"][obs["attention_mask"] == 1]
    assert chat_tokenizer.decode(valid) == templated(("user", "Say hi"))
    # the reward, the infos and the raters see the plain text; the LM the templated one
    assert info["prompt"] == "Say hi" and env.prompts[0].text == "Say hi"
    assert env.prompts[0].lm_text == templated(("user", "Say hi"))
    assert env.prompts[0].messages == [{"role": "user", "content": "Say hi"}]
    # the template's end of turn ends the completion
    end_of_turn = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in env.stop_token_ids
    env.step(chat_tokenizer.encode(" Hi")[0])
    _, reward, terminated, _, info = env.step(end_of_turn)
    assert terminated and reward == 1.0 and info["completion"] == " Hi" and info["prompt"] == "Say hi"
    assert calls == [["Say hi"]]


def test_chat_template_false_keeps_plain_prompts(chat_tokenizer):
    env = make_text_task_env(["Say hi"], constant, tokenizer=chat_tokenizer, chat_template=False)
    assert decoded_prompts(env) == ["Say hi"]
    assert env.prompts == [TextPrompt("Say hi")]


def test_gym_make_overrides_the_chat_template(chat_lm):
    task = "ChatOverride-v0"
    register_text_task(task, prompts=["Say hi"], reward=constant, tokenizer=chat_lm)
    assert decoded_prompts(gym.make(task).unwrapped) == [templated(("user", "Say hi"))]
    assert decoded_prompts(gym.make(task, chat_template=False).unwrapped) == ["Say hi"]


def test_a_tokenizer_without_a_chat_template(gpt2_tokenizer):
    # "auto": a base LM's string prompts stay as they are
    assert decoded_prompts(make_text_task_env(["Say hi"], constant, tokenizer=gpt2_tokenizer)) == ["Say hi"]
    with pytest.raises(ValueError, match="T: chat_template=True, but the tokenizer .* has no chat template; .*"
                                         "tokenizer.chat_template"):
        make_text_task_env(["Say hi"], constant, tokenizer=gpt2_tokenizer, chat_template=True, task_id="T")
    with pytest.raises(ValueError, match=r"prompts \[1\] are conversations, but the tokenizer .* has no chat template"):
        make_text_task_env(["a", [{"role": "user", "content": "b"}]], constant, tokenizer=gpt2_tokenizer)
    with pytest.raises(ValueError, match="system_prompt is set, but the tokenizer .* has no chat template"):
        make_text_task_env(["a"], constant, tokenizer=gpt2_tokenizer, system_prompt="Be brief.")


def test_chat_template_false_refuses_what_needs_the_template(chat_tokenizer):
    with pytest.raises(ValueError, match=r"prompts \[0\] are conversations.*chat_template=False; pass chat_template='auto'"):
        make_text_task_env([CONVERSATION], constant, tokenizer=chat_tokenizer, chat_template=False)
    with pytest.raises(ValueError, match="system_prompt is set.*chat_template=False"):
        make_text_task_env(["a"], constant, tokenizer=chat_tokenizer, chat_template=False, system_prompt="Be brief.")


def test_bad_chat_options_are_refused_when_registering(chat_lm):
    with pytest.raises(ValueError, match="ChatBad-v0: chat_template must be 'auto' .*, True .* or False .*, got 'yes'"):
        register_text_task("ChatBad-v0", prompts=["a"], reward=constant, tokenizer=chat_lm, chat_template="yes")
    with pytest.raises(ValueError, match="got 1"):
        register_text_task("ChatBad-v0", prompts=["a"], reward=constant, tokenizer=chat_lm, chat_template=1)
    with pytest.raises(TypeError, match="system_prompt must be a non-empty string or None"):
        register_text_task("ChatBad-v0", prompts=["a"], reward=constant, tokenizer=chat_lm, system_prompt="")
    assert "ChatBad-v0" not in gym.registry


def test_trl_conversational_prompts_from_a_jsonl_file(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": CONVERSATION, "completion": [{"role": "assistant", "content": "Scattering."}], "id": 7},
        {"prompt": [{"role": "user", "content": "Name a colour."}]},
        {"prompt": "A plain prompt."},
    ]
    path = tmp_path / "conversations.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    env = make_text_task_env(path, constant, tokenizer=chat_tokenizer, max_prompt_tokens=64)
    assert decoded_prompts(env) == [
        templated(("system", "Be brief."), ("user", "Why is the sky blue?")),
        templated(("user", "Name a colour.")),
        templated(("user", "A plain prompt.")),
    ]
    assert [p.text for p in env.prompts] == ["Why is the sky blue?", "Name a colour.", "A plain prompt."]
    assert [p.reference for p in env.prompts] == ["Scattering.", None, None]
    assert env.prompts[0].meta == {"id": 7} and env.prompts[0].messages == CONVERSATION


def test_conversational_prompts_from_a_list(chat_tokenizer):
    prompts = [{"prompt": CONVERSATION}, CONVERSATION, TextPrompt("Why is the sky blue?", messages=CONVERSATION)]
    env = make_text_task_env(prompts, constant, tokenizer=chat_tokenizer, max_prompt_tokens=64)
    expected = templated(("system", "Be brief."), ("user", "Why is the sky blue?"))
    assert decoded_prompts(env) == [expected] * 3
    assert prompts[2].templated is None  # the given TextPrompt is not changed


def test_a_python_list_prompt_is_never_the_string_of_a_list(chat_tokenizer):
    # The bug: {"prompt": [...]} became "[{'role': 'user', 'content': 'Hi'}]", for the LM and the reward.
    (prompt,) = load_prompts([{"prompt": [{"role": "user", "content": "Hi"}]}])
    assert prompt.text == "Hi" and prompt.messages == [{"role": "user", "content": "Hi"}]
    env = make_text_task_env([{"prompt": [{"role": "user", "content": "Hi"}]}], constant, tokenizer=chat_tokenizer)
    assert "[{" not in decoded_prompts(env)[0] and "[{" not in env.prompts[0].text
    # a TextGenerationEnv made by hand refuses what it cannot give the LM as it is
    with pytest.raises(TypeError, match="T: prompt 0 is a list; TextGenerationEnv takes strings and TextPrompts; "
                                        "conversations .* go through sb3_textrl.make_text_task_env"):
        TextGenerationEnv([[{"role": "user", "content": "Hi"}]], constant, chat_tokenizer, task_id="T")
    with pytest.raises(ValueError, match="prompt 0 is a conversation whose chat template was not applied"):
        TextGenerationEnv([prompt], constant, chat_tokenizer)


@pytest.mark.parametrize(
    ("record", "error", "match"),
    [
        ([], ValueError, "prompt 0: the conversation is empty"),
        ([{"role": "user"}], ValueError, r"message 0: a message is a dict \{'role'"),
        (["Hi"], ValueError, "message 0: a message is a dict"),
        ([{"role": "robot", "content": "Hi"}], ValueError, "unknown role 'robot'; a message's role is one of"),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], TypeError, "content must be a string, got list"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], ValueError, "may only come first"),
        ([{"role": "system", "content": "b"}], ValueError, "the conversation has no user message"),
        ({"prompt": 42}, TypeError, r"prompt 0, 'prompt': a prompt must be a str, a conversation .*; got int"),
        ({"prompt": {"role": "user", "content": "Hi"}}, TypeError, "a prompt must be a str, a conversation .*; got dict"),
        (42, TypeError, "prompt 0: a prompt must be a str, a conversation .*TextPrompt; got int"),
        ({"prompt": "Hi", "reference": {"text": "x"}}, TypeError, "'reference': a reference must be a str, a number or one"),
    ],
)
def test_unknown_prompt_shapes_are_refused(record, error, match):
    with pytest.raises(error, match=match):
        load_prompts([record], task_id="T")


def test_numeric_references_and_trl_completions():
    completion = [{"role": "assistant", "content": "Hello"}]
    prompts = load_prompts([{"question": "2+2?", "answer": 4}, {"prompt": "Hi", "completion": completion}])
    assert [p.reference for p in prompts] == ["4", "Hello"]


def test_system_prompt(chat_tokenizer):
    env = make_text_task_env(["Say hi", [{"role": "user", "content": "Why?"}]], constant, tokenizer=chat_tokenizer,
                             system_prompt="Be brief.", max_prompt_tokens=32)
    assert decoded_prompts(env) == [templated(("system", "Be brief."), ("user", "Say hi")),
                                    templated(("system", "Be brief."), ("user", "Why?"))]
    with pytest.raises(ValueError, match="prompt 0 has its own system message and the task has a system_prompt"):
        make_text_task_env([CONVERSATION], constant, tokenizer=chat_tokenizer, system_prompt="Be kind.")


def test_a_reply_begun_in_the_prompt_is_continued(chat_tokenizer):
    conversation = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]
    env = make_text_task_env([conversation], constant, tokenizer=chat_tokenizer)
    assert decoded_prompts(env) == ["<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\nOne, two,"]
    assert env.prompts[0].text == "Count to three."


def test_templated_prompts_get_one_bos(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.add_bos_token = True  # the tokenizer adds <|endoftext|> in front, and so does the template
    tokenizer.chat_template = "{{ bos_token }}" + CHATML
    bos = tokenizer.bos_token_id
    (ids,) = make_text_task_env(["Say hi"], constant, tokenizer=tokenizer).prompt_ids
    assert ids[0] == bos and ids[1] != bos and tokenizer.decode(ids) == "<|endoftext|>" + templated(("user", "Say hi"))
    (plain,) = make_text_task_env(["Say hi"], constant, tokenizer=tokenizer, chat_template=False).prompt_ids
    assert plain.tolist() == [bos, *tokenizer.encode("Say hi", add_special_tokens=False)]


def test_a_prompt_templated_by_hand_is_refused(chat_tokenizer):
    by_hand = templated(("user", "Say hi"))
    with pytest.raises(ValueError, match=r"prompt 0 already contains '<\|im_.*', a token of the chat template .*"
                                         "pass chat_template=False"):
        make_text_task_env([by_hand], constant, tokenizer=chat_tokenizer)
    env = make_text_task_env([by_hand], constant, tokenizer=chat_tokenizer, chat_template=False)
    assert decoded_prompts(env) == [by_hand]


def test_end_of_turn_of_any_template_stops(gpt2_tokenizer):
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<turn>", "<eot>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<turn>{{ m['role'] }}: {{ m['content'] }}<eot>\n{% endfor %}"
        "{% if add_generation_prompt %}<turn>assistant: {% endif %}"
    )
    env = make_text_task_env(["Say hi"], constant, tokenizer=tokenizer)
    assert env.stop_token_ids == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<eot>")}


def test_the_notes_of_a_templated_task(gpt2_tokenizer, chat_tokenizer, caplog, fresh_log_once):
    with caplog.at_level(logging.WARNING, logger="sb3_textrl"):
        make_text_task_env(["Say hi"], constant, tokenizer=chat_tokenizer, task_id="Noted")
        make_text_task_env(["Say hi"], constant, tokenizer=chat_tokenizer, task_id="Explicit", chat_template=True)
        make_text_task_env([CONVERSATION], constant, tokenizer=chat_tokenizer, task_id="Conversations")
    messages = [r.getMessage() for r in caplog.records if r.name == "sb3_textrl"]
    assert len(messages) == 1 and messages[0].startswith("Noted: its string prompts are given to the LM as user messages")
    # a template whose end of turn is no token of the tokenizer: completions cannot stop there, and the log says so
    plain = copy.deepcopy(gpt2_tokenizer)
    plain.chat_template = CHATML
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sb3_textrl"):
        env = make_text_task_env(["Say hi"], constant, tokenizer=plain, task_id="NoTurnToken", chat_template=True)
    assert env.stop_token_ids == {plain.eos_token_id}
    assert any("NoTurnToken: the chat template ends a turn with '<|im_end|>', which is not one token" in r.getMessage()
               for r in caplog.records)


def test_sft_examples_of_a_templated_task(chat_lm, chat_tokenizer):
    register_text_task("ChatSft-v0", prompts=[{"prompt": "2+2?", "reference": "4"}], reward=constant, tokenizer=chat_lm)
    (example,), _ = task_sft_examples("ChatSft-v0", chat_tokenizer)
    assert chat_tokenizer.decode(example.prompt_ids) == templated(("user", "2+2?"))
    # the template ends with a newline: no space before the target
    assert example.target_ids == [*chat_tokenizer.encode("4", add_special_tokens=False), chat_tokenizer.eos_token_id]


def test_ppo_learns_on_a_templated_task(chat_lm):
    from helpers import shout, toy_ppo
    from stable_baselines3.common.env_util import make_vec_env

    task = "ChatShout-v0"
    register_text_task(task, prompts=["Say hi", [{"role": "user", "content": "Shout"}]], reward=shout, tokenizer=chat_lm,
                       max_new_tokens=3, max_prompt_tokens=24)
    env = make_vec_env(task, n_envs=2, seed=0)
    obs = env.reset()
    first = obs["input_ids"][0][obs["attention_mask"][0] == 1]
    assert env.get_attr("tokenizer", [0])[0].decode(first).endswith("<|im_end|>\n<|im_start|>assistant\n")
    model = toy_ppo(env, chat_lm, n_steps=3, batch_size=6)
    before = [p.detach().clone() for p in model.policy.parameters() if p.requires_grad]
    model.learn(6)
    after = [p.detach() for p in model.policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
