import pytest

from aquila.model.chat import DEFAULT_SYSTEM, Message, clean_reply, pieces, render

CONVERSATION = [Message("human", "床前明月光的下一句是什么？"), Message("gpt", "疑是地上霜。"),
                Message("human", "And in English?"), Message("gpt", "I took it for frost on the ground.")]


def render_text(messages, system=None, generation=False) -> str:
    """The conversation as text: what render's tokens decode to, without BOS and EOS."""
    return "".join(text for text, _ in pieces(messages, system, generation))


def test_text_follows_the_aquila_chat_format():
    assert render_text(CONVERSATION[:1], generation=True) == \
        f"{DEFAULT_SYSTEM}###Human: 床前明月光的下一句是什么？###Assistant:"
    assert render_text(CONVERSATION, system="Be brief.") == (
        "Be brief.###Human: 床前明月光的下一句是什么？###Assistant: 疑是地上霜。###"
        "Human: And in English?###Assistant: I took it for frost on the ground.###")


def test_training_tokens_start_with_bos_end_with_eos_and_learn_only_the_answers(small_tokenizer):
    rendered = render(small_tokenizer, CONVERSATION)
    assert rendered.ids[0] == small_tokenizer.bos_id and rendered.ids[-1] == small_tokenizer.eos_id
    assert len(rendered.ids) == len(rendered.learn)
    assert small_tokenizer.decode(rendered.ids) == render_text(CONVERSATION)
    learned = small_tokenizer.decode(i for i, keep in zip(rendered.ids, rendered.learn) if keep)
    assert learned == " 疑是地上霜。### I took it for frost on the ground.###"
    assert rendered.learn[-1] and not rendered.learn[0]


def test_the_prompt_is_a_prefix_of_the_training_tokens(small_tokenizer):
    """Inference sees exactly the tokens SFT trained on, up to the answer (FlagAI's mismatch, fixed)."""
    for turns in (1, 3):
        prompt = render(small_tokenizer, CONVERSATION[:turns], generation=True).ids
        trained = render(small_tokenizer, CONVERSATION[:turns + 1]).ids
        assert trained[:len(prompt)] == prompt


def test_turn_order_is_checked():
    with pytest.raises(ValueError, match="at least one"):
        render_text([])
    with pytest.raises(ValueError, match="message 0 must be from 'human'"):
        render_text([Message("gpt", "hi")])
    with pytest.raises(ValueError, match="message 1 must be from 'gpt'"):
        render_text([Message("human", "a"), Message("human", "b")], generation=True)
    with pytest.raises(ValueError, match="prompt must end with a 'human'"):
        render_text(CONVERSATION, generation=True)
    with pytest.raises(ValueError, match="training conversation must end with a 'gpt'"):
        render_text(CONVERSATION[:1])
    with pytest.raises(ValueError, match="role must be one of"):
        Message("system", "x")


def test_clean_reply():
    assert clean_reply(" 疑是地上霜。###Human: more") == "疑是地上霜。"
    assert clean_reply(" plain  ") == "plain"
