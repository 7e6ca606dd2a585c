"""Retrieval-augmented chat: a conversation + retrieved chunks -> a grounded prompt that fits the model; and
``cubelm rag chat``.

    cubelm rag chat --index idx/ --model DIR "How does json.loads handle NaN?"
    cubelm rag chat --index idx/ "..." -k 6 --mmr-lambda 0.7 --where source=json/decoder.py --json

``ground`` is shared by the CLI and the server's ``POST /v1/rag/chat``: the last message is the question (it must
be the user's), earlier user/assistant turns are kept as history, and any system text of the conversation is added
after the grounding instruction. The sources get what the context leaves once the question, history, chat template
and the answer's tokens are set aside: ``max_tokens`` when given, else a quarter of the context (at least 1) - so
the lowest-ranked chunks are dropped (``cubelm.rag.prompt.fit_hits``) rather than the request refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError
from cubelm.rag.prompt import DEFAULT_SYSTEM, cited_indices, citations, fit_hits, grounded_messages
from cubelm.rag.store import Hit

TEMPLATE_SLACK = 8  # tokens: text tokenized in context can merge differently than each part alone


@dataclass(slots=True)
class GroundedPrompt:
    messages: list[dict]  # render with the model's chat template
    hits: list[Hit]  # the sources kept, numbered [1]..[n] in the prompt


def split_conversation(messages: list[dict]) -> tuple[str | None, list[dict], str]:
    """(system text or None, earlier user/assistant turns, the question = the last message, a user's)."""
    if not messages or messages[-1].get("role") != "user":
        raise CubelmError("messages: the last message must be the user's question")
    question = messages[-1].get("content") or ""
    if not question.strip():
        raise CubelmError("messages: the question (the last user message) is empty")
    system = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "system" and m.get("content"))
    history = [m for m in messages[:-1] if m["role"] in ("user", "assistant")]
    return system or None, history, question


def ground(tokenizer, messages: list[dict], hits: list[Hit], *, max_model_len: int,
           max_tokens: int | None = None) -> GroundedPrompt:
    """The grounded messages for ``messages`` and ``hits`` whose rendered prompt leaves room for the answer."""
    extra_system, history, question = split_conversation(messages)
    system = DEFAULT_SYSTEM + ("\n\n" + extra_system if extra_system else "")

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    bare = grounded_messages(question, [], system=system, history=history)
    template = count(tokenizer.apply_chat_template(bare, add_generation_prompt=True)) - sum(
        count(m["content"]) for m in bare)  # what the chat template adds around the contents
    answer = max_tokens if max_tokens is not None else max(1, max_model_len // 4)
    budget = max_model_len - answer - max(template, 0) - TEMPLATE_SLACK
    if budget < 1:
        raise CubelmError(f"a {max_model_len}-token context leaves no room for the question after {answer} tokens "
                          "for the answer; lower max_tokens")
    kept = fit_hits(hits, system=system, history=history, question=question, max_context_tokens=budget,
                    count_tokens=count)
    msgs = grounded_messages(question, hits[:len(kept)], system=system, history=history,
                             max_context_tokens=budget, count_tokens=count)
    return GroundedPrompt(msgs, [h for h, _ in kept])


def annotated_citations(hits: list[Hit], answers: list[str]) -> list[dict]:
    """``citations(hits)``, each with ``cited`` (some answer cites it as [n]) and ``cited_by`` (which answers do)."""
    used = [cited_indices(a) for a in answers]
    return [c | {"cited_by": [i for i, u in enumerate(used) if c["index"] in u],
                 "cited": any(c["index"] in u for u in used)} for c in citations(hits)]


# ---- cubelm rag chat ------------------------------------------------------------------------------------------

@dataclass(slots=True, kw_only=True)
class ChatOptions:
    question: str = opt(help="the question", flag="QUESTION")
    index: str = opt(help="index directory (`cubelm rag ingest`) or http://HOST:PORT/COLLECTION")
    model: str | None = opt(None, help="LLM directory or model-store name; default: the default model")
    embedder: str | None = opt(None, help="embedder (default: the one the index was built with)")
    k: int = opt(4, flag="-k", help="chunks retrieved")
    fetch_k: int | None = opt(None, help="MMR: candidates reranked (default max(4k, 20))")
    mmr_lambda: float | None = opt(None, help="rerank by maximal marginal relevance: 1 = relevance only, 0 = "
                                              "diversity only (0.5-0.7 typical); default: no reranking")
    where: list[str] = opt([], help="metadata filter KEY=VALUE (repeatable; all must hold)")
    max_tokens: int = opt(256, help="most tokens in the answer")
    temperature: float = opt(0.0, help="sampling temperature; 0 = greedy")
    device: str = opt("cpu", help="torch device for the LLM and the embedder")
    dtype: str = opt("auto", help="LLM compute dtype: auto, float32, bfloat16, float16")
    json_output: bool = opt(False, flag="--json", help="print the answer and citations as JSON")


def run_chat(o: ChatOptions) -> int:
    from cubelm.engine.llm import LLM
    from cubelm.engine.params import SamplingParams
    from cubelm.rag.commands import _parse_where
    from cubelm.rag.filters import parse_where
    from cubelm.rag.retrieve import Retriever, check_retrieval_args

    if not o.question.strip():
        raise CubelmError("the question is empty")
    check_retrieval_args(o.k, o.fetch_k, o.mmr_lambda)
    where = _parse_where(o.where)
    parse_where(where)
    if o.max_tokens < 1:
        raise CubelmError(f"--max-tokens must be >= 1, got {o.max_tokens}")
    retriever = Retriever.open(o.index, embedder=o.embedder, device=o.device)  # a bad index fails before the LLM
    hits = retriever.retrieve(o.question, o.k, fetch_k=o.fetch_k, mmr_lambda=o.mmr_lambda, where=where)
    llm = LLM(o.model, device=o.device, dtype=o.dtype)
    tok = llm.get_tokenizer()
    prompt = ground(tok, [{"role": "user", "content": o.question}], hits, max_model_len=llm.engine.max_model_len,
                    max_tokens=o.max_tokens)
    ids = tok.encode(tok.apply_chat_template(prompt.messages, add_generation_prompt=True), add_special_tokens=False)
    out = llm.generate(ids, SamplingParams(temperature=o.temperature, max_tokens=o.max_tokens), use_tqdm=False)[0]
    answer = out.outputs[0].text.strip()
    cits = annotated_citations(prompt.hits, [answer])
    if o.json_output:
        print(json.dumps({"answer": answer, "citations": cits}, indent=1, ensure_ascii=False))
        return 0
    print(answer)
    print("\nSources:" if cits else "\n(no sources found)")
    for c in cits:
        first = next((line.strip() for line in c["text"].splitlines() if line.strip()), "")
        print(f"  [{c['index']}]{'*' if c['cited'] else ' '} {c['label']}  ({c['score']:.3f})  {first[:80]}")
    if any(c["cited"] for c in cits):
        print("  (* = cited in the answer)")
    return 0
