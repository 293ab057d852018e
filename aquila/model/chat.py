"""The AquilaChat conversation template: the one definition that SFT trains on and that chat and generation serve.

FlagAI trained AquilaChat with one template and BOS handling and served it with another; here both sides call
render(), so the tokens a model was fine-tuned on are exactly the tokens it is prompted with.

The text follows the published AquilaChat (FastChat "aquila-chat") format, so released AquilaChat weights also work:

    {system}###Human: {question}###Assistant: {answer}###Human: ...###Assistant:

Tokens: [BOS], then each piece encoded on its own (so SFT and inference split the text into the same tokens):
`{system}###`, `Human: {question}###`, `Assistant:`, ` {answer}###`, ..., and [EOS] after the last answer of a training
conversation. The model learns the answers (with their `###` and the final EOS) and nothing else; generation stops at
the stop string `###` or at EOS.
"""

import dataclasses
from collections.abc import Sequence
from typing import Optional

DEFAULT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SEPARATOR = "###"
STOP_STRINGS = (SEPARATOR,)
ROLES = {"human": "Human", "gpt": "Assistant"}


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # "human" or "gpt", as in FlagAI's conversation files
    text: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Message: role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Message: text must be a str, got {type(self.text).__name__}")


@dataclasses.dataclass
class Rendered:
    ids: list[int]
    learn: list[bool]  # per token: True where SFT trains the model (the answers), False for the rest


def check_turns(messages: Sequence[Message], generation: bool) -> None:
    """Turns alternate human, gpt, human, ...; a training conversation ends with the assistant, a prompt with the
    human."""
    if not messages:
        raise ValueError("chat: a conversation needs at least one message")
    for index, message in enumerate(messages):
        expected = "human" if index % 2 == 0 else "gpt"
        if message.role != expected:
            raise ValueError(f"chat: message {index} must be from {expected!r} (turns alternate, starting with the "
                             f"human), got {message.role!r}")
    last = "human" if generation else "gpt"
    if messages[-1].role != last:
        raise ValueError(f"chat: a {'prompt' if generation else 'training conversation'} must end with a "
                         f"{last!r} message")


def pieces(messages: Sequence[Message], system: Optional[str], generation: bool) -> list[tuple[str, bool]]:
    """The template's text pieces with whether each is learned."""
    check_turns(messages, generation)
    out = [((DEFAULT_SYSTEM if system is None else system) + SEPARATOR, False)]
    for message in messages:
        if message.role == "human":
            out.append((f"{ROLES['human']}: {message.text}{SEPARATOR}", False))
        else:
            out += [(f"{ROLES['gpt']}:", False), (f" {message.text}{SEPARATOR}", True)]
    if generation:
        out.append((f"{ROLES['gpt']}:", False))
    return out


def render(tokenizer, messages: Sequence[Message], system: Optional[str] = None,
           generation: bool = False) -> Rendered:
    """Token ids of a conversation. generation=True renders a prompt (ending with the human) followed by the
    assistant's cue; False renders a training conversation (ending with the assistant) followed by EOS."""
    ids, learn = [tokenizer.bos_id], [False]
    for text, learned in pieces(messages, system, generation):
        piece = tokenizer.encode(text)
        ids += piece
        learn += [learned] * len(piece)
    if not generation:
        ids.append(tokenizer.eos_id)
        learn.append(True)
    return Rendered(ids, learn)


def clean_reply(text: str) -> str:
    """A generated answer as the user sees it: the template's leading space and anything from a stop string on
    removed."""
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.removeprefix(" ").rstrip()
