"""What the model runtime gives back, and how it fails. No llama.cpp types leak past here."""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.errors import LoopbotError


class InferenceError(LoopbotError, RuntimeError):
    """The model could not answer this request; the runtime keeps serving others."""


class InferenceTimeout(InferenceError):
    """The request was not answered in time (it is dropped if it had not started)."""


class RuntimeBusy(InferenceError):
    """The inference queue is full: the caller should ask the user to try again later."""


class ServerBusy(RuntimeBusy):
    """An inference server is overloaded (429, 503) or too slow: the same "busy" answer."""


class ServerUnavailable(ServerBusy):
    """No inference server could be reached; /healthz names the ones that are down."""


class UnsupportedModel(InferenceError):
    """The chosen backend cannot run this model file (e.g. ctransformers with qwen2)."""


@dataclass(frozen=True)
class Verdict:
    label: str
    # One probability per configured label, summing to 1.
    probabilities: dict[str, float]
    version_id: str
    latency_ms: float
    # Tokens evaluated for this verdict after the cached prefix.
    tokens_evaluated: int = 0
    prefix_cached: bool = True
    # The user's text was longer than model.max_input_tokens and was cut.
    truncated: bool = False
    # Which scorer produced the probabilities: "gguf:<file name>:<sha256 prefix>" in process,
    # "remote:<server's model id>" on an inference server. Arms scored differently are not
    # compared (the same prompt can score differently on another build or model file).
    scorer: str = ""

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int
    latency_ms: float
    stopped_by: str = "eos"  # "eos" | "length"
    extra: dict[str, float] = field(default_factory=dict)
