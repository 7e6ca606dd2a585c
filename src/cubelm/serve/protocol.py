"""The OpenAI wire format: request models (pydantic), response builders and the error shape.

Field names and defaults follow OpenAI's API (``max_tokens`` 16 for completions, unlimited for chat) plus vLLM's
extra sampling fields (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ...), which the official
client sends through ``extra_body``. Unknown fields are ignored, as OpenAI and vLLM do.

The models carry every constraint the server enforces on a single field, so the OpenAPI document tells the truth:
ranges (vLLM's, plus bounds that keep one request from costing unbounded work: ``n``, ``seed`` as a signed 64-bit
integer, list sizes), non-empty prompts, strict types (``"1"`` is not an integer, ``1e999`` is not a number), no
lone surrogates in strings. Fields that would change the meaning of a request but are not implemented (``echo``,
``suffix``, ``logit_bias``, ``tools``, non-text ``response_format``) are typed so that only their "off" value
validates. What no schema can say is checked by the routes with a 400: the context length (prompt + max_tokens),
token ids below the vocabulary size, ``min_tokens <= max_tokens``, ``top_logprobs`` without ``logprobs``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from cubelm.engine.params import INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N, SamplingParams
from cubelm.serve.errors import APIError

MAX_PROMPTS = 256  # prompts in one completion request
MAX_STOP = 64  # stop strings, stop token ids
MAX_STOP_CHARS = 1024
MAX_MESSAGES = 4096
MAX_TOKEN_ID = 2**31 - 1  # the server also checks ids against the model's vocabulary
MAX_INT32 = 2**31 - 1
MAX_NAME_CHARS = 256  # adapter names


def _valid_utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains a lone surrogate (invalid UTF-16 in the JSON); send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_utf8)]
# the OpenAPI document replaces this maximum with the served model's vocabulary size - 1 (cubelm.serve.openapi)
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, json_schema_extra={"x-token-id": True})]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Nothing = Annotated[dict[str, float], Field(max_length=0)]  # accepted only empty: the feature is not implemented


class _Strict(BaseModel):
    # strict: no silent coercion ("1" -> 1, 1.0 -> 1, "true" -> True); allow_inf_nan=False: 1e999 parses to inf
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extras)."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt (at most the server's --max-n)",
                   json_schema_extra={"x-server-max-n": True})
    temperature: float = Field(1.0, ge=0, description="0 (or below 1e-5) is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: NonEmptyText | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS),
                                                  AfterValidator(_valid_utf8)]],
                                   Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Nothing | None = Field(None, description="not supported: only null or {} is accepted")
    user: Text | None = None
    # vLLM extensions
    top_k: int = Field(0, ge=-1, le=MAX_INT32, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=1e6)
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    skip_special_tokens: bool = True

    def check_cross_field(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, max_tokens=max_tokens, min_tokens=self.min_tokens,
            seed=self.seed, stop=stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            output_kind="delta" if self.stream else "final")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = Field(False, description="not supported: only false is accepted")
    suffix: Literal[""] | None = Field(None, description="not supported (fill-in-the-middle): only null or ''")
    best_of: Literal[1] | None = Field(None, description="only 1 (or null) is supported")

    def prompts(self) -> list[str | list[int]]:
        """A request holds one prompt or a batch: a string, a list of strings, token ids, or lists of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="only plain text is supported")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[dict], Field(max_length=0)] | None = Field(
        None, description="not supported (function calling): only null or [] is accepted")
    response_format: ResponseFormat | None = None

    def check_cross_field(self) -> None:
        super().check_cross_field()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")

    def chat_messages(self) -> list[dict[str, str]]:
        return chat_messages(self.messages)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for the system role
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class TokenizeRequest(_Strict):
    model: Text | None = None
    prompt: NonEmptyText | None = Field(None, description="give exactly one of prompt or messages")
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = Field(True, description="for prompt: add the tokenizer's special tokens (BOS)")


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(_Strict):
    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_valid_utf8)] = Field(
        description="the name requests use as their model")
    lora_path: NonEmptyText = Field(description="a directory on the server holding a peft adapter "
                                                "(adapter_config.json + adapter_model.safetensors)")


class UnloadLoRAAdapterRequest(_Strict):
    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_valid_utf8)]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cubelm"
    root: str | None = None
    parent: str | None = Field(None, description="for an adapter: the base model it runs on")
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- /v1/embeddings -------------------------------------------------------------------------------------------
MAX_EMBED_INPUTS = 2048  # OpenAI's limit on inputs per request
# the OpenAPI document replaces these with the embedding model's vocabulary size - 1 and its max_tokens
EmbedTokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID, json_schema_extra={"x-embed-token-id": True})]
EmbedTokenIds = Annotated[list[EmbedTokenId], Field(min_length=1, json_schema_extra={"x-embed-max-tokens": True})]


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings request. Token-id inputs are the embedding model's ids, used as they are (with no
    special tokens added), as vLLM does."""

    input: (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | EmbedTokenIds | Annotated[list[EmbedTokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]) = (
        Field(description="a text, a list of texts, token ids, or a list of token-id lists"))
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes of each vector, base64-encoded")
    dimensions: int | None = Field(None, ge=1, le=MAX_INT32, description="keep the first N dimensions (Matryoshka), "
                                   "re-normalized; at most the model's embedding size",
                                   json_schema_extra={"x-embed-dim": True})
    user: Text | None = None
    # cubelm extension (extra_body): a prompt of the model's config_sentence_transformers.json, e.g. "query"
    prompt_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), AfterValidator(_valid_utf8)] | None = (
        Field(None, description="prepend the model's named prompt (a query/passage prefix)"))

    @field_validator("input", mode="before")
    @classmethod
    def _not_empty(cls, x):
        # one clear message instead of the union's first branch's ("Input should be a valid string")
        if x == [] or x == "" or (isinstance(x, list) and any(v == [] or v == "" for v in x)):
            raise ValueError("an input must not be empty (no empty list, text or token list)")
        return x

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="the vector, or its base64 float32 bytes")
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
