"""Instruct data and prompt templates (book ch. 3 "Instruct Schema", ch. 7 zero/one/few-shot prompting).

An example is ``{instruction, input, output}``: what to do, optional context, the desired response. Two ways to
render it as text:

- ``format_alpaca``: the book's template, ``### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n``
  (the Input section is left out when the input is empty);
- ``format_chat``: cubelm's chat template (``<|user|>...<|eos|><|assistant|>``), the same text the tokenizer's
  Jinja ``chat_template`` renders (``cubelm.data.tokenizer.render_chat``).

The prompt builders put 0, 1 or k solved examples before the task. When an example is packed for training, the
prompt's tokens are masked out of the loss (``to_document`` keeps prompt and response apart).

    >>> from cubelm.data.instruct import InstructExample, format_alpaca
    >>> format_alpaca(InstructExample(instruction="Add the numbers.", input="2 3", output="5"))
    '### Instruction:\\nAdd the numbers.\\n\\n### Input:\\n2 3\\n\\n### Response:\\n'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cubelm.data.sources import Document
from cubelm.errors import CubelmError


@dataclass(frozen=True, slots=True, kw_only=True)
class InstructExample:
    instruction: str
    input: str = ""
    output: str = ""

    def __post_init__(self) -> None:
        for name in ("instruction", "input", "output"):
            if not isinstance(getattr(self, name), str):
                raise CubelmError(f"instruct field {name!r} must be a string")
        if not self.instruction.strip():
            raise CubelmError("an instruct example needs a non-empty 'instruction'")

    @classmethod
    def from_dict(cls, record: dict) -> InstructExample:
        if "instruction" not in record or "output" not in record:
            raise CubelmError("an instruct record needs 'instruction' and 'output' fields ('input' is optional)")
        return cls(instruction=record["instruction"], input=record.get("input") or "", output=record["output"])

    def to_dict(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def format_alpaca(example: InstructExample) -> str:
    """The prompt, ending where the response starts (``### Response:\\n``)."""
    parts = [f"### Instruction:\n{example.instruction}"]
    if example.input:
        parts.append(f"### Input:\n{example.input}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def user_message(example: InstructExample) -> str:
    return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction


def format_chat(example: InstructExample, *, system: str | None = None) -> str:
    """The chat-template prompt for one user turn, ending with the assistant marker."""
    from cubelm.data.tokenizer import render_chat

    return render_chat(to_messages(example, system=system, with_output=False), add_generation_prompt=True)


def to_messages(example: InstructExample, *, system: str | None = None, with_output: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_message(example)})
    if with_output:
        messages.append({"role": "assistant", "content": example.output})
    return messages


def format_prompt(example: InstructExample, template: str = "alpaca") -> str:
    if template == "alpaca":
        return format_alpaca(example)
    if template == "chat":
        return format_chat(example)
    raise CubelmError(f"unknown template {template!r}; use 'alpaca' or 'chat'")


def to_document(doc_id: str, example: InstructExample, template: str = "alpaca") -> Document:
    """A packable document: the prompt (masked from the loss) and the response (learned). The packer appends
    EOS after the response, which in the chat template also closes the assistant turn."""
    return Document(doc_id, example.output, prompt=format_prompt(example, template))


# ---- zero-, one- and few-shot prompts (book ch. 7) -----------------------------------------------------------
def few_shot_prompt(task: InstructExample, shots: Sequence[InstructExample] = (), template: str = "alpaca") -> str:
    """Solved examples, then the task's prompt. With ``template="chat"`` the shots become earlier turns."""
    if template == "chat":
        from cubelm.data.tokenizer import render_chat

        messages = [m for shot in shots for m in to_messages(shot)]
        messages += to_messages(task, with_output=False)
        return render_chat(messages, add_generation_prompt=True)
    solved = [format_alpaca(shot) + shot.output for shot in shots]
    return "\n\n".join([*solved, format_alpaca(task)])


def zero_shot_prompt(task: InstructExample, template: str = "alpaca") -> str:
    return few_shot_prompt(task, (), template)


def one_shot_prompt(task: InstructExample, shot: InstructExample, template: str = "alpaca") -> str:
    return few_shot_prompt(task, (shot,), template)
