"""The V2 REST bodies (pydantic), so that the OpenAPI document describes them and the fuzz test can exercise them.

Requests are validated with these models whether the body is plain JSON or the JSON header of Triton's binary
tensor extension, so a body the document calls invalid is always a 400. Parameter values are what the protocol
allows: booleans, numbers and strings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from cubelm.serve.v2.tensors import DATATYPES, MAX_INPUTS

Name = Annotated[str, Field(min_length=1, max_length=256)]
ParamValue = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = Annotated[dict[str, ParamValue], Field(max_length=64)]
Dim = Annotated[int, Field(ge=0, le=2**31 - 1)]
Datatype = Literal[DATATYPES]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class InferInput(_Body):
    name: Name
    shape: Annotated[list[Dim], Field(max_length=8)]
    datatype: Datatype
    parameters: Parameters | None = None
    data: list | None = Field(None, description="the elements, row-major (nested or flat); absent when the tensor "
                                                "is sent as binary data (parameters.binary_data_size)")


class RequestedOutput(_Body):
    name: Name
    parameters: Parameters | None = None


class InferRequest(_Body):
    id: Annotated[str, Field(max_length=256)] | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[InferInput], Field(min_length=1, max_length=MAX_INPUTS)]
    outputs: Annotated[list[RequestedOutput], Field(max_length=MAX_INPUTS)] | None = None


class InferOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, ParamValue] | None = None
    data: list | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, ParamValue] | None = None
    outputs: list[InferOutput]


class GenerateRequest(_Body):
    """Triton's generate extension: the inputs by name, as JSON values, plus request parameters."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    text_input: str
    stream: bool | None = None
    sampling_parameters: str | None = Field(None, description='a JSON object, e.g. {"max_tokens": 8}')
    exclude_input_in_output: bool | None = None
    parameters: Parameters | None = Field(None, description="sampling keys (max_tokens, temperature, ...) and "
                                                            "stream")


class GenerateResponse(BaseModel):
    model_name: str
    model_version: str
    text_output: str
    finish_reason: str | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    """Every V2 error, in the protocol's shape."""
    error: str
