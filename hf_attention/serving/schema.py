"""What `POST /v1/translate` reads and answers, as typed request models: FastAPI answers a wrong type or an unknown
field with 422 naming it, before any of our code runs."""

from dataclasses import dataclass
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from ..constraints_hf_attention import LexicalConstraints


class TranslateRequest(BaseModel):
    """One or several source sentences and how to decode them; an option left out takes the server's default."""

    model_config = ConfigDict(extra="forbid")  # an unknown option is a mistake the caller must hear about

    text: str | list[str] = Field(description="A source sentence, or a list of them.")
    num_beams: int | None = Field(None, ge=1, le=64, description="Beam size (default: the model's).")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest translation, in tokens.")
    n_best: int = Field(1, ge=1, le=64, description="Hypotheses per sentence, best first (at most num_beams).")
    return_scores: bool = Field(False, description="Give each hypothesis's score (its log-probability).")
    target_prefix: str | list[str] | None = Field(
        None, description="The start each translation must continue (autocompletion): one per sentence, '' for none."
    )
    constraints: list[str] | list[list[str]] | None = Field(
        None,
        description="Phrases each translation must contain (terminology): a list for one sentence, a list of lists "
        "for a list of sentences ([] for none). With `text` and `avoid`, a request is a Sockeye JSON input line.",
    )
    avoid: list[str] | list[list[str]] | None = Field(
        None, description="Phrases each translation must not contain, shaped as `constraints`."
    )
    alignments: bool = Field(
        False, description="Give each hypothesis's word alignment (Moses i-j pairs; torch and ctranslate2 engines)."
    )


class Hypothesis(BaseModel):
    text: str
    score: float | None = None
    alignment: str | None = None


class Translation(BaseModel):
    """A sentence's best translation; with `n_best` > 1 also every hypothesis, best first."""

    text: str
    score: float | None = None
    alignment: str | None = None
    n_best: list[Hypothesis] | None = None


class TranslateResponse(BaseModel):
    translations: list[Translation]
    model: str


class Source(NamedTuple):
    """One sentence to translate, the start its translation must continue ("" for none) and its lexical
    constraints (None for none)."""

    text: str
    prefix: str = ""
    constraints: LexicalConstraints | None = None


@dataclass(frozen=True)
class DecodingOptions:
    """The options a batch shares: requests decode together only when these are equal."""

    num_beams: int
    max_new_tokens: int
    n_best: int = 1
    scores: bool = False
    alignments: bool = False


def field_error(field: str, message: str, value=None) -> dict:
    """One entry of a 422 answer's `detail`, in the shape FastAPI gives its own validation errors."""
    location = ["body", *field.replace("]", "").replace("[", ".").split(".")]
    return {"loc": [int(part) if part.isdigit() else part for part in location], "msg": message, "input": value}
