"""The served model's V2 tensors (Triton's LLM-backend convention) and their validation and byte encodings.

Inputs, each of shape [1]: ``text_input`` (BYTES, required: the prompt), ``stream`` (BOOL: generate in pieces;
gRPC ModelStreamInfer or REST generate_stream), ``sampling_parameters`` (BYTES: a JSON object such as
``{"max_tokens": 8, "temperature": 0}``), ``exclude_input_in_output`` (BOOL). Output: ``text_output`` (BYTES,
shape [1]). These are the names of Triton's vLLM backend, so its clients (tritonclient, genai-perf) work unchanged.

Every transport (REST JSON, REST binary extension, gRPC typed contents, gRPC raw contents) turns a tensor into a
``Tensor`` (name, datatype, shape, Python values); ``text_request`` checks them all in one place and answers a 400
``APIError`` (gRPC: INVALID_ARGUMENT) naming the tensor and what would be right.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from cubelm.serve.errors import APIError

# name -> (datatype, shape, required)
INPUTS = {"text_input": ("BYTES", [1], True), "stream": ("BOOL", [1], False),
          "sampling_parameters": ("BYTES", [1], False), "exclude_input_in_output": ("BOOL", [1], False)}
OUTPUTS = {"text_output": ("BYTES", [1])}
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
             "BF16", "BYTES")
MAX_INPUTS = 16


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: list  # flattened; str/bytes for BYTES, bool for BOOL, numbers otherwise


@dataclass(slots=True, kw_only=True)
class TextRequest:
    """A validated V2 request for the text model."""
    text: str
    stream: bool = False
    sampling: dict = field(default_factory=dict)  # sampling_parameters, parsed (request parameters merged in)
    exclude_input: bool = True  # NOTE: the OpenAI completion's text; Triton's vLLM backend defaults to False


def describe(name: str) -> str:
    dtype, shape, _ = INPUTS[name]
    return f"{name} ({dtype} {shape})"


def text_request(tensors: list[Tensor], parameters: dict | None = None) -> TextRequest:
    """Check the inputs (names, datatypes, shapes, values) and build the request. ``parameters``: the request's
    own parameters, whose sampling keys (max_tokens, temperature, ...) apply unless sampling_parameters sets them."""
    if not tensors:
        raise APIError(400, f"the request has no inputs; give {describe('text_input')}", param="inputs")
    if len(tensors) > MAX_INPUTS:
        raise APIError(400, f"the request has {len(tensors)} inputs; this model takes at most {len(INPUTS)}",
                       param="inputs")
    seen: dict[str, object] = {}
    for t in tensors:
        if t.name not in INPUTS:
            raise APIError(400, f"unknown input '{t.name}'; this model takes " + ", ".join(map(describe, INPUTS)),
                           param="inputs")
        if t.name in seen:
            raise APIError(400, f"input '{t.name}' is given twice", param="inputs")
        dtype, shape, _ = INPUTS[t.name]
        if t.datatype != dtype:
            raise APIError(400, f"input '{t.name}' must have datatype {dtype}, got {t.datatype}", param="inputs")
        if list(t.shape) != shape:
            raise APIError(400, f"input '{t.name}' must have shape {shape}, got {list(t.shape)}", param="inputs")
        if len(t.values) != 1:
            raise APIError(400, f"input '{t.name}' has shape {shape} but {len(t.values)} elements", param="inputs")
        seen[t.name] = _element(t)
    if "text_input" not in seen:
        raise APIError(400, f"missing input {describe('text_input')}", param="inputs")
    sampling = sampling_keys(parameters or {})
    if "sampling_parameters" in seen:
        sampling.update(parse_sampling_parameters(seen["sampling_parameters"]))
    return TextRequest(text=seen["text_input"], stream=seen.get("stream", False), sampling=sampling,
                       exclude_input=seen.get("exclude_input_in_output", True))


def _element(t: Tensor):
    v = t.values[0]
    if t.datatype == "BOOL":
        if not isinstance(v, bool):
            raise APIError(400, f"input '{t.name}' (BOOL) must hold true or false, got {v!r}", param="inputs")
        return v
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"input '{t.name}' is not valid UTF-8 text", param="inputs") from None
    if not isinstance(v, str):
        raise APIError(400, f"input '{t.name}' (BYTES) must hold a string, got {type(v).__name__}", param="inputs")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"input '{t.name}' contains a lone surrogate; send valid Unicode", param="inputs") from None
    return v


def parse_sampling_parameters(text: str) -> dict:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise APIError(400, f"sampling_parameters is not valid JSON ({e}); give an object such as "
                            f'{{"max_tokens": 8, "temperature": 0}}', param="sampling_parameters") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"sampling_parameters must be a JSON object, got {type(obj).__name__}",
                       param="sampling_parameters")
    return {k: _number_from_string(v) for k, v in obj.items()}


def _number_from_string(v):
    """Triton's vLLM backend documents string values ({"temperature": "0.1"}); read them as the JSON they spell."""
    if isinstance(v, str):
        try:
            parsed = json.loads(v)
        except ValueError:
            return v
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return v


def sampling_keys(parameters: dict) -> dict:
    from cubelm.serve.v2.core import SAMPLING_KEYS
    return {k: _number_from_string(v) for k, v in parameters.items() if k in SAMPLING_KEYS}


# ---- BYTES and BOOL in raw form (REST binary extension, gRPC raw_*_contents) --------------------------------------
def decode_raw(name: str, datatype: str, data: bytes) -> list:
    """Raw tensor bytes to values: BYTES is a sequence of (uint32 little-endian length, bytes); BOOL one byte each;
    other datatypes are refused by ``text_request`` anyway, so their bytes are only counted."""
    if datatype == "BOOL":
        return [b != 0 for b in data]
    if datatype != "BYTES":
        return [None] * max(1, len(data))  # wrong datatype: text_request names it
    out, pos = [], 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise APIError(400, f"input '{name}': truncated BYTES element (a 4-byte length prefix is cut)",
                           param="inputs")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise APIError(400, f"input '{name}': a BYTES element claims {n} bytes, only {len(data) - pos} remain",
                           param="inputs")
        out.append(data[pos:pos + n])
        pos += n
    return out


def encode_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode("utf-8") for v in values))
