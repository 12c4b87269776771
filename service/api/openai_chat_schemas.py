"""The OpenAI facade's chat completions (``POST /openai/v1/chat/completions``): the request as OpenAI's API takes
it, and the ``chat.completion`` and ``chat.completion.chunk`` objects the pinned ``openai`` release reads.

Every request field OpenAI documents for text chat is declared, so each one is either honoured, mapped onto
the ``chat`` job's settings (contract/hyperparameters.py ``ChatHyperparameters``), accepted at the value that
means "off" only (anything else: a 400 naming it), or accepted and ignored; docs/openai.md has the table.
An undeclared field is refused like everywhere in the facade (``InputModel``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from contract.hyperparameters import MAX_CHAT_CHOICES, MAX_CHAT_TOKENS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from contract.inputs import InputModel

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields accepted only at the value that turns them off: what alignd cannot do is refused, never dropped.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
}
_WHY_REFUSED = {
    "frequency_penalty": "alignd's sampler has no repetition penalties",
    "presence_penalty": "alignd's sampler has no repetition penalties",
    "logit_bias": "alignd's sampler takes no logit bias",
    "logprobs": "alignd does not return log-probabilities",
    "top_logprobs": "alignd does not return log-probabilities",
    "response_format": "alignd returns plain text only (no JSON mode or schema)",
    "modalities": "alignd returns text only",
    "audio": "alignd returns text only",
}


class OpenAIChatTextPart(InputModel):
    type: Literal["text"]
    text: str


class OpenAIChatMessage(InputModel):
    role: str = Field(description="system, developer (read as system), user or assistant.")
    content: str | list[OpenAIChatTextPart] = Field(description="Text, or a list of text parts (joined).")
    name: str | None = Field(None, max_length=256, description="Accepted and ignored.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # One clear refusal for an image, audio or file part, rather than one per branch of the union.
        for index, part in enumerate(value if isinstance(value, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content[{index}] is a {kind!r} part: alignd serves text only")
        return value

    @field_validator("role")
    @classmethod
    def _known_role(cls, value: str) -> str:
        if value in ("tool", "function"):
            raise ValueError(f"{value} messages are not supported: alignd serves text chat, without tools")
        if value not in _ROLES:
            raise ValueError("must be one of system, developer, user, assistant")
        return value

    def as_alignd(self) -> dict[str, str]:
        """The message as a ``chat`` job takes it: developer -> system, text parts -> their text."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": _ROLES[self.role], "content": text}


class OpenAIStreamOptions(InputModel):
    include_usage: bool | None = Field(None, description="A last chunk with the usage and no choices.")
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored (no padding is sent).")


class OpenAIChatCompletionCreate(InputModel):
    model: str = Field(
        min_length=1,
        max_length=512,
        description="A base model's id (model_...) or name, a fine-tuned model's ft:... name, or (an alignd "
        "extension) the id of one of the tenant's adapter artifacts (art_...), sampled on its base model.",
    )
    messages: list[OpenAIChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_CHAT_TOKENS,
        description="Longest completion in tokens; default: what the model's context leaves, at most "
        f"{MAX_CHAT_TOKENS}.",
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_CHAT_TOKENS, description="Deprecated by OpenAI: max_completion_tokens."
    )
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 is greedy decoding.")
    top_p: float | None = Field(None, gt=0, le=1, description="Default 1 (off).")
    n: int | None = Field(None, ge=1, le=MAX_CHAT_CHOICES, description="Choices, sampled in one batch.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} stop texts of 1-{MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Seeds the sampler (default: drawn).")
    stream: bool | None = Field(None, description="Answer as chat.completion.chunk server-sent events.")
    stream_options: OpenAIStreamOptions | None = None
    # Accepted at the value that turns them off only (_OFF_VALUES).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted and ignored: they change nothing a base model or its adapter could do differently.
    parallel_tool_calls: bool | None = None
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=64)
    reasoning_effort: str | None = Field(None, max_length=64)
    verbosity: str | None = Field(None, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop texts")
        if any(not 1 <= len(stop) <= MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop text has 1 to {MAX_STOP_CHARS} characters")
        return value

    def refused(self) -> list[dict[str, str]]:
        """A detail for each field set to something alignd cannot do (tools, penalties, log-probabilities,
        JSON mode, audio), and for two different token limits."""
        problems = [
            {
                "field": name,
                "code": "unsupported_parameter",
                "message": f"not supported: {_WHY_REFUSED.get(name, 'alignd serves text chat, without tools')}",
            }
            for name, allowed in _OFF_VALUES.items()
            if getattr(self, name) not in allowed
        ]
        if (
            None not in (self.max_tokens, self.max_completion_tokens)
            and self.max_tokens != self.max_completion_tokens
        ):
            problems.append(
                {
                    "field": "max_tokens",
                    "code": "conflicting_field",
                    "message": "differs from max_completion_tokens; give max_completion_tokens only",
                }
            )
        return problems

    def hyperparameters(self) -> dict[str, Any]:
        """The ``chat`` job's settings (ChatHyperparameters); an absent field keeps OpenAI's default."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {
            "messages": [message.as_alignd() for message in self.messages],
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "n": self.n or 1,
            "stop": stops,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- responses


class OpenAIChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    annotations: list[Any] = Field(default_factory=list)


class OpenAIChatCompletionChoice(BaseModel):
    index: int
    message: OpenAIChatCompletionMessage
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: an end-of-sequence token or a stop text; length: max_tokens was reached."
    )
    logprobs: None = None


class OpenAICompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the messages under the chat template.")
    completion_tokens: int = Field(description="Tokens sampled over every choice, end-of-sequence included.")
    total_tokens: int


class OpenAIChatCompletion(BaseModel):
    id: str = Field(description="The alignd chat job (GET /v1/jobs/{id}); the same id.")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The model as the request named it.")
    choices: list[OpenAIChatCompletionChoice]
    usage: OpenAICompletionUsage
    system_fingerprint: str | None = None
    service_tier: str | None = None


class OpenAIChatCompletionChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class OpenAIChatCompletionChunkChoice(BaseModel):
    index: int
    delta: OpenAIChatCompletionChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class OpenAIChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[OpenAIChatCompletionChunkChoice]
    usage: OpenAICompletionUsage | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
