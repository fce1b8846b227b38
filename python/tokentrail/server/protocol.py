"""The OpenAI request bodies the server accepts, checked field by field.

Unknown fields are refused and types are strict ("5" is not a number), so a
client's mistake gets a 400 naming the field instead of a silent default.
Besides OpenAI's fields, the sampling options llama.cpp's and vLLM's servers
accept (top_k, min_p, repetition_penalty) and the ``tokentrail`` extension.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokentrailOptions(Strict):
    """``"tokentrail": {"journey": true, "top": 5}``: every generated token's journey."""

    journey: bool = False
    top: int = Field(5, ge=1, le=MAX_TOP_LOGPROBS)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    cache_prompt: bool = True  # llama-server's field: False keeps this request out of the prompt cache
    tokentrail: Optional[TokentrailOptions] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Messages may carry what templates read (tool_calls, tool_call_id, name, reasoning...):
    # only role and content are checked.
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[TextPart], None] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[dict[str, Any]]] = None
    documents: Optional[list[dict[str, Any]]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error as OpenAI shapes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
