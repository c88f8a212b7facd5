"""The OpenAI request and response shapes (pydantic), and nexttok's extension fields.

Requests forbid unknown fields, and the OpenAI fields nexttok does not implement are declared so they can be
refused by name (:data:`UNSUPPORTED`), never dropped. Responses follow OpenAI's shapes exactly; what only
nexttok has goes under a ``nexttok`` field, which standard clients ignore.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Extensions(Strict):
    """The request's ``nexttok`` field (``extra_body={"nexttok": {...}}`` with the openai client)."""

    trace: bool = Field(False, description="record what each sampling stage kept, per generated token")
    prompt_logprobs: int | None = Field(None, ge=0, description="the prompt's tokens with K alternatives each")
    ignore_eos: bool = Field(False, description="go on past the end-of-sequence token")


# OpenAI request fields nexttok does not implement: a 400 naming the field, never silently ignored.
UNSUPPORTED = (
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "suffix",
    "best_of", "audio", "modalities", "prediction", "store", "metadata", "service_tier", "reasoning_effort",
    "web_search_options", "verbosity",
)  # fmt: skip


class Sampling(Strict):
    """The sampling fields both endpoints share; ``None`` means "not given" (the model's generation config
    or OpenAI's default fills it in, and the response says which)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own logs; it changes nothing here
    nexttok: Extensions = Field(default_factory=Extensions)
    # Declared only to be refused by name (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    suffix: Any = None
    best_of: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class Message(Strict):
    role: str
    content: str | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class NextTokenRequest(Strict):
    """``POST /v1/next_token``: ``nexttok predict --json`` for a prompt, messages or token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    ids: list[int] | None = None
    top: int = Field(10, ge=1)
    tokens: list[str | int] = Field(default_factory=list, description="also report these tokens' probability")
    temperatures: list[float] = Field(default_factory=lambda: [1.0])


class StagesRequest(Strict):
    """``POST /v1/stages``: what each sampling stage keeps of the next-token distribution after a prompt (text,
    messages or ids), from the prompt's cached last-position scores; with ``seed``, one token drawn from it."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    ids: list[int] | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    top: int = Field(10, ge=1, le=1000)
    seed: int | None = None


class RanksRequest(Strict):
    """``POST /v1/ranks``: each token of a text with its probability and rank given the tokens before it."""

    model: str | None = None
    prompt: str | None = None
    ids: list[int] | None = None
    top: int = Field(5, ge=0, le=100)


class CompareRequest(Strict):
    """``POST /v1/compare``: two served models' next-token distributions after one prompt (``nexttok compare``).
    ``a`` and ``b`` name them (default: the first two the server serves)."""

    a: str | None = None
    b: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    ids: list[int] | None = None
    top: int = Field(10, ge=1, le=100)
    moves: int = Field(5, ge=1, le=100)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# --- responses -----------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Answer(BaseModel):
    """What every completion, chat completion and chunk carries, in OpenAI's order (a subclass that narrows
    ``object`` and ``choices`` keeps their place)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None
    nexttok: dict[str, Any] | None = None


class LegacyLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nexttok"
    context_length: int | None
    vocab_size: int
    source: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
