"""Instruct schema, the book's template, prompt builders, the stdlib docstring -> source set, and loss masks."""

import ast
import json

import numpy as np
import pytest

from cubelm.data.instruct import (InstructExample, few_shot_prompt, format_alpaca, format_chat, one_shot_prompt,
                                  zero_shot_prompt)
from cubelm.data.packed import PackedData
from cubelm.data.prepare import PrepareConfig, prepare
from cubelm.data.clean import CleanConfig
from cubelm.data.sources import resolve_source
from cubelm.data.stdlib_instruct import examples_from_source
from cubelm.data.tokenizer import TokenizerConfig
from cubelm.errors import CubelmError

TASK = InstructExample(instruction="Translate to French.", input="cheese", output="fromage")
SHOT = InstructExample(instruction="Add the numbers.", input="2 3", output="5")


def test_alpaca_template_matches_the_book():
    assert format_alpaca(TASK) == "### Instruction:\nTranslate to French.\n\n### Input:\ncheese\n\n### Response:\n"
    no_input = InstructExample(instruction="Say hi.", output="hi")
    assert format_alpaca(no_input) == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_zero_one_few_shot_prompts():
    assert zero_shot_prompt(TASK) == format_alpaca(TASK)
    one = one_shot_prompt(TASK, SHOT)
    assert one == format_alpaca(SHOT) + "5\n\n" + format_alpaca(TASK)
    few = few_shot_prompt(TASK, [SHOT, SHOT])
    assert few.count("### Instruction:") == 3 and few.endswith("### Response:\n")
    chat = few_shot_prompt(TASK, [SHOT], template="chat")
    assert chat == ("<|user|>Add the numbers.\n\n2 3<|eos|><|assistant|>5<|eos|>"
                    "<|user|>Translate to French.\n\ncheese<|eos|><|assistant|>")
    assert format_chat(TASK) == "<|user|>Translate to French.\n\ncheese<|eos|><|assistant|>"


def test_schema_validation():
    assert InstructExample.from_dict({"instruction": "a", "output": "b"}).input == ""
    with pytest.raises(CubelmError):
        InstructExample.from_dict({"input": "a"})
    with pytest.raises(CubelmError):
        InstructExample(instruction="  ")


SOURCE = '''
import functools

def undocumented(x):
    return x

class Greeter:
    """A class."""

    @functools.cache
    def greet(self, name: str = "world") -> str:
        """Return a friendly greeting for the given name."""
        return f"hello {name}"

async def fetch(url, *, timeout=10):
    """Fetch the URL and return the body as bytes."""
    def helper():
        """A nested helper function is not an example."""
    return b""
'''


def test_stdlib_instruct_extracts_docstring_to_source():
    examples = list(examples_from_source(SOURCE))
    assert [name for name, _ in examples] == ["Greeter.greet", "fetch"]
    greet = examples[0][1]
    assert greet.input == "Return a friendly greeting for the given name."
    assert greet.instruction == "Write the Python function `greet(self, name: str='world')` described below."
    assert greet.output.startswith("@functools.cache\ndef greet(self")  # decorators kept, dedented
    ast.parse(greet.output)  # the output is valid Python on its own
    assert examples[1][1].instruction.startswith("Write the Python function `async fetch(url, *, timeout=10)`")
    assert list(examples_from_source(SOURCE)) == examples  # deterministic
    assert list(examples_from_source("def broken(:\n")) == []


def test_instruct_packing_masks_exactly_the_prompt(tmp_path):
    records = [{"instruction": f"Compute item {i}.", "input": f"value {i}" if i % 2 else "",
                "output": f"result = {i * i}\nprint(result)\n"} for i in range(40)]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = PrepareConfig(clean=CleanConfig(min_chars=1), tokenizer=TokenizerConfig(vocab_size=300),
                           val_fraction=0.1)
    prepare(resolve_source(str(src), instruct=True), tmp_path / "out", config, log=lambda *_: None)
    data = PackedData(tmp_path / "out")
    tok = data.load_tokenizer()
    assert data.has_mask and data.train_mask.shape == data.train.shape and data.val_mask.shape == data.val.shape
    by_prompt = {format_alpaca(InstructExample.from_dict(r)): r["output"] for r in records}
    for ids, mask in ((data.train, data.train_mask), (data.val, data.val_mask)):
        ends = np.flatnonzero(ids == tok.eos_token_id)
        for start, end in zip(np.r_[0, ends[:-1] + 1], ends):
            doc_ids, doc_mask = ids[start:end + 1], mask[start:end + 1]
            prompt, response = tok.decode(doc_ids[doc_mask == 0]), tok.decode(doc_ids[doc_mask == 1])
            assert by_prompt[prompt] + "<|eos|>" == response
            assert doc_mask[:np.argmax(doc_mask)].sum() == 0 and doc_mask[np.argmax(doc_mask):].all()
    assert sum(data.meta["num_documents"].values()) == 40
