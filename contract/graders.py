"""Grader specs: OpenAI's grader JSON and alignd's own kinds, validated once and shared by API and child.

A grader turns one model sample (and the dataset row it answers, the *item*) into a reward. Kinds:

- OpenAI's: ``string_check``, ``text_similarity``, ``score_model``, ``multi``. ``python`` is refused (alignd
  never runs user code); ``label_model`` is not supported yet.
- alignd's: ``regex``, ``numeric``, ``json_schema``, ``length``, ``ends_with_eos``, ``reward_model``.

Text fields hold templates: ``{{ sample.output_text }}``, ``{{ sample.output_json.a.b }}`` (the output parsed
as JSON), ``{{ sample.finish_reason }}``, ``{{ sample.output_tokens }}`` and ``{{ item.<field> }}`` with
nested fields by dots or ``[index]`` (``{{ item.answers[0].text }}``). :func:`parse_grader` validates a raw
spec and raises :class:`GraderSpecError` with one ``{"field", "code", "message"}`` per problem;
:func:`item_fields` lists the item fields a grader reads so a job can check its dataset rows have them.
Scoring is in ``contract.grading``; docs/graders.md documents every kind.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import jsonschema
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_core.core_schema import ErrorType

from contract import formula as formulas
from contract import safe_regex
from contract.inputs import InputModel

MAX_TEMPLATE_CHARS = 20_000
MAX_SCHEMA_CHARS = 65_536
MAX_SUB_GRADERS = 32  # leaves in a multi grader, all levels together
MAX_MULTI_DEPTH = 3
SAMPLE_FIELDS = ("output_text", "output_json", "finish_reason", "output_tokens")
REFUSED_KINDS = {
    "python": (
        "grader_kind_not_allowed",
        "python graders run user code, and alignd never runs user code; express the rule with string_check, "
        "text_similarity, regex, numeric, json_schema, length or ends_with_eos, combined with multi.",
    ),
    "label_model": (
        "grader_kind_not_supported",
        "label_model graders are not supported yet; use score_model with a range instead.",
    ),
}

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_REFERENCE = re.compile(r"(item|sample)((?:\.[A-Za-z0-9_-]+|\[\d+\])+)")
_SEGMENT = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")
_SUB_GRADER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_JUDGE_MODEL = re.compile(r"(model|art)_[A-Za-z0-9]{1,64}")
_ARTIFACT = re.compile(r"art_[A-Za-z0-9]{1,64}")


# --- templates


class TemplateSyntaxError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FieldRef:
    """One ``{{ namespace.path }}`` placeholder; ``path`` holds str keys and int list indices."""

    namespace: Literal["item", "sample"]
    path: tuple[str | int, ...]

    @property
    def dotted(self) -> str:
        return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in self.path).lstrip(".")


def _parse_reference(inner: str) -> FieldRef:
    match = _REFERENCE.fullmatch(inner.strip())
    if match is None:
        raise TemplateSyntaxError(
            "unknown_template_field",
            f"'{{{{{inner}}}}}' is not a template field: write {{{{item.<field>}}}} or "
            f"{{{{sample.<field>}}}} with <field> one of {', '.join(SAMPLE_FIELDS)}.",
        )
    namespace: Literal["item", "sample"] = "item" if match.group(1) == "item" else "sample"
    path = tuple(name if name else int(index) for name, index in _SEGMENT.findall(match.group(2)))
    if namespace == "sample":
        if path[0] not in SAMPLE_FIELDS:
            raise TemplateSyntaxError(
                "unknown_template_field",
                f"'sample.{path[0]}' is not a sample field; the sample has {', '.join(SAMPLE_FIELDS)}.",
            )
        if len(path) > 1 and path[0] != "output_json":
            raise TemplateSyntaxError(
                "unknown_template_field", f"'sample.{path[0]}' has no fields; only sample.output_json does."
            )
    return FieldRef(namespace=namespace, path=path)


@functools.lru_cache(maxsize=4096)
def parse_template(template: str) -> tuple[str | FieldRef, ...]:
    """Split a template into literal text and field references; raises TemplateSyntaxError."""
    parts: list[str | FieldRef] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(template[position : match.start()])
        parts.append(_parse_reference(match.group(1)))
        position = match.end()
    parts.append(template[position:])
    if any(isinstance(part, str) and "{{" in part for part in parts):
        raise TemplateSyntaxError("invalid_template", "The template has a '{{' without its closing '}}'.")
    return tuple(part for part in parts if part != "")


def _check_template(value: str) -> str:
    try:
        parse_template(value)
    except TemplateSyntaxError as exc:
        raise PydanticCustomError(exc.code, exc.message) from None
    return value


Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS), AfterValidator(_check_template)]
OUTPUT_TEXT = "{{sample.output_text}}"


def template_refs(template: str) -> list[FieldRef]:
    return [part for part in parse_template(template) if isinstance(part, FieldRef)]


# --- the sample


class Sample(InputModel):
    """What a grader grades: one model output. ``output_json`` is not sent: it is ``output_text`` parsed."""

    output_text: str = Field(description="The model's output.")
    finish_reason: Literal["stop", "length"] | None = Field(
        None, description="'stop': the model ended with its end-of-sequence token; 'length': it was cut off."
    )
    output_tokens: int | None = Field(None, ge=0, description="Tokens in the output, when the sampler knows.")


# --- grader kinds


class _Grader(InputModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(min_length=1, max_length=128, description="The grader's name, echoed in the result.")

    def templates(self) -> list[str]:
        """Every template this grader renders (multi: its sub-graders')."""
        return []


class StringCheckGrader(_Grader):
    """1 when the check holds, else 0: eq / ne (case-sensitive), like (contains), ilike (contains, any case)."""

    type: Literal["string_check"]
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]

    def templates(self) -> list[str]:
        return [self.input, self.reference]


SimilarityMetric = Literal[
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "cosine",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
]
UNSUPPORTED_METRICS = {
    "meteor": "meteor needs WordNet synonyms and a stemmer, which alignd does not ship",
    "cosine": "cosine needs an embedding model, which alignd does not run for graders",
}


class TextSimilarityGrader(_Grader):
    """The metric's value in [0, 1] (contract/textmetrics.py says how each is computed)."""

    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: SimilarityMetric
    pass_threshold: float | None = Field(
        None, ge=0, le=1, description="Reported as metadata 'passed'; the reward is the metric's value."
    )

    @field_validator("evaluation_metric")
    @classmethod
    def _computable(cls, metric: str) -> str:
        if metric in UNSUPPORTED_METRICS:
            supported = ", ".join(m for m in get_args(SimilarityMetric) if m not in UNSUPPORTED_METRICS)
            raise PydanticCustomError(
                "metric_not_supported",
                "{reason}; supported: {supported}.",
                {"reason": UNSUPPORTED_METRICS[metric], "supported": supported},
            )
        return metric

    def templates(self) -> list[str]:
        return [self.input, self.reference]


class RegexGrader(_Grader):
    """1 when ``pattern`` matches the input (``search``: anywhere; ``fullmatch``: the whole input), else 0."""

    type: Literal["regex"]
    input: Template = OUTPUT_TEXT
    pattern: str = Field(min_length=1, description="Python re syntax; see contract/safe_regex.py for limits.")
    mode: Literal["search", "fullmatch"] = "search"
    ignore_case: bool = False
    multiline: bool = Field(False, description="^ and $ match at every line.")
    dotall: bool = Field(False, description="'.' matches newlines too.")

    @field_validator("pattern")
    @classmethod
    def _safe(cls, pattern: str) -> str:
        try:
            safe_regex.check_pattern(pattern)
        except safe_regex.UnsafePattern as exc:
            raise PydanticCustomError(exc.code, exc.message) from None
        return pattern

    def templates(self) -> list[str]:
        return [self.input]


class NumericGrader(_Grader):
    """1 when the number in the input is close to the reference: ``math.isclose(x, ref, rel_tol, abs_tol)``."""

    type: Literal["numeric"]
    input: Template = OUTPUT_TEXT
    reference: Template = Field(description="Must render to a number, e.g. '{{item.answer}}'.")
    extract: Literal["first", "last", "exact"] = Field(
        "last", description="Which number of the input to take; 'exact': the whole input must be one number."
    )
    rel_tol: float = Field(1e-9, ge=0, le=1)
    abs_tol: float = Field(0.0, ge=0)

    def templates(self) -> list[str]:
        return [self.input, self.reference]


_NOT_SCHEMAS = ("enum", "const", "examples", "default")  # values, not subschemas: never walked
_NAMED_SCHEMAS = ("properties", "$defs", "definitions", "dependentSchemas")  # {name: subschema}


def _keyword_problem(key: str, value: Any, where: str) -> tuple[str, str, str] | None:
    if key == "patternProperties":
        return (
            where,
            "unsupported_schema_keyword",
            "patternProperties is not supported: jsonschema matches it with Python's re, which alignd cannot "
            "time-limit.",
        )
    if key == "$ref" and isinstance(value, str) and not value.startswith("#"):
        return (where, "unsupported_schema_ref", "Only local $refs ('#/...') are resolved.")
    if key == "pattern" and isinstance(value, str):
        try:
            safe_regex.check_pattern(value)
        except safe_regex.UnsafePattern as exc:
            return (where, exc.code, exc.message)
    return None


def _schema_problems(schema: Any, path: str = "schema") -> list[tuple[str, str, str]]:
    """(field, code, message) for what a json_schema grader refuses beyond the metaschema."""
    problems: list[tuple[str, str, str]] = []
    if isinstance(schema, list):
        for index, value in enumerate(schema):
            problems.extend(_schema_problems(value, f"{path}[{index}]"))
    if not isinstance(schema, dict):
        return problems
    for key, value in schema.items():
        where = f"{path}.{key}"
        problem = _keyword_problem(key, value, where)
        if problem is not None:
            problems.append(problem)
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            for name, subschema in value.items():
                problems.extend(_schema_problems(subschema, f"{where}.{name}"))
        elif key not in _NOT_SCHEMAS:
            problems.extend(_schema_problems(value, where))
    return problems


class JsonSchemaGrader(_Grader):
    """1 when the input parses as JSON and validates against ``schema``, else 0."""

    type: Literal["json_schema"]
    input: Template = OUTPUT_TEXT
    # Any, not dict | bool: a union would name its members in every error's location.
    json_schema: Any = Field(
        alias="schema", description="A JSON Schema object (draft 2020-12 unless its $schema says otherwise)."
    )

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, schema: Any) -> Any:
        if not isinstance(schema, dict | bool):
            raise PydanticCustomError(
                "invalid_json_schema", "schema must be a JSON Schema object (or a boolean)."
            )
        if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
            raise PydanticCustomError(
                "schema_too_large", f"The schema is over {MAX_SCHEMA_CHARS} characters."
            )
        if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
            raise PydanticCustomError("invalid_json_schema", "$schema must be a metaschema URI string.")
        try:
            validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            validator.check_schema(schema)
        except jsonschema.SchemaError as error:
            where = "/".join(str(part) for part in error.path) or "(root)"
            raise PydanticCustomError(
                "invalid_json_schema",
                "Not a valid JSON Schema at {where}: {reason}",
                {"where": where, "reason": error.message},
            ) from None
        except Exception as exc:  # jsonschema choking on a shape its metaschema let through: still a 422
            raise PydanticCustomError(
                "invalid_json_schema", "jsonschema could not read the schema: {reason}", {"reason": repr(exc)}
            ) from None
        problems = _schema_problems(schema)
        if problems:
            field, code, message = problems[0]
            raise PydanticCustomError(code, "{field}: {message}", {"field": field, "message": message})
        return schema

    def templates(self) -> list[str]:
        return [self.input]


class LengthGrader(_Grader):
    """1 when the input's length is within [min, max] (either may be left out), else 0."""

    type: Literal["length"]
    input: Template = OUTPUT_TEXT
    unit: Literal["chars", "words", "tokens"] = Field(
        "chars",
        description="chars: characters; words: whitespace-separated runs; tokens: the sample's output_tokens "
        "(the sampler's count; the input must then be {{sample.output_text}}).",
    )
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> LengthGrader:
        if self.min is None and self.max is None:
            raise PydanticCustomError("missing_bounds", "A length grader needs min, max or both.")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise PydanticCustomError("invalid_bounds", "min is larger than max.")
        if self.unit == "tokens" and self.input.replace(" ", "") != OUTPUT_TEXT:
            raise PydanticCustomError(
                "invalid_value",
                "unit 'tokens' counts the sample's output tokens: input must be {{sample.output_text}}.",
            )
        return self

    def templates(self) -> list[str]:
        return [self.input]


class EndsWithEosGrader(_Grader):
    """1 when the sample ended with the end-of-sequence token (finish_reason 'stop'), 0 when cut off."""

    type: Literal["ends_with_eos"]


def _text_parts(content: Any) -> Any:
    # OpenAI allows a plain string or a list of parts; normalized to the list form.
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    return content


class JudgeContentPart(InputModel):
    type: Literal["input_text", "output_text"] = "input_text"
    text: Template


class JudgeMessage(InputModel):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[list[JudgeContentPart], BeforeValidator(_text_parts)] = Field(
        min_length=1, max_length=16
    )


class JudgeSamplingParams(InputModel):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    max_completions_tokens: int | None = Field(None, ge=1, le=4096)


def _judge_model(model: str) -> str:
    if not model:
        raise PydanticCustomError(
            "judge_model_required",
            "A score_model grader needs 'model': the id of an alignd model (model_...) or adapter (art_...).",
        )
    if _JUDGE_MODEL.fullmatch(model) is None:
        raise PydanticCustomError(
            "invalid_judge_model",
            "'{model}' is not an alignd model: alignd judges with models it hosts, named by id "
            "(model_... or art_...).",
            {"model": model},
        )
    return model


class ScoreModelGrader(_Grader):
    """A judge model reads the rendered messages and answers a number in ``range``; scored by a worker."""

    type: Literal["score_model"]
    model: Annotated[str, AfterValidator(_judge_model)] = Field("", validate_default=True)
    input: list[JudgeMessage] = Field(min_length=1, max_length=32)
    # strict=False lets a JSON list be the tuple; its two numbers stay strict.
    range: tuple[float, float] = Field((0.0, 1.0), strict=False)
    pass_threshold: float | None = None
    sampling_params: JudgeSamplingParams | None = None

    @model_validator(mode="after")
    def _range(self) -> ScoreModelGrader:
        low, high = self.range
        if not low < high:
            raise PydanticCustomError("invalid_range", "range must be [low, high] with low < high.")
        if self.pass_threshold is not None and not low <= self.pass_threshold <= high:
            raise PydanticCustomError("invalid_value", "pass_threshold must lie within range.")
        return self

    def templates(self) -> list[str]:
        return [part.text for message in self.input for part in message.content]


def _artifact(artifact: str) -> str:
    if _ARTIFACT.fullmatch(artifact) is None:
        raise PydanticCustomError(
            "invalid_artifact", "'{artifact}' is not an artifact id (art_...).", {"artifact": artifact}
        )
    return artifact


class RewardModelGrader(_Grader):
    """A trained alignd reward model's scalar score of (prompt, response); scored by a worker."""

    type: Literal["reward_model"]
    artifact: Annotated[str, AfterValidator(_artifact)] = Field(
        description="A reward_model artifact (art_...), e.g. from a reward_model or rlhf job."
    )
    prompt: Template = Field("{{item.prompt}}", description="The prompt the response answers.")
    input: Template = Field(OUTPUT_TEXT, description="The response to score.")

    def templates(self) -> list[str]:
        return [self.prompt, self.input]


class MultiGrader(_Grader):
    """Sub-graders combined by ``calculate_output``, arithmetic over their names (contract/formula.py)."""

    type: Literal["multi"]
    graders: dict[str, Grader] = Field(min_length=1, max_length=16)
    calculate_output: str = Field(description="e.g. '0.5 * exact + 0.5 * fuzzy'; " + formulas.ALLOWED + ".")

    @field_validator("graders")
    @classmethod
    def _names(cls, graders: dict[str, Any]) -> dict[str, Any]:
        for key in graders:
            if _SUB_GRADER_NAME.fullmatch(key) is None or key in formulas.FUNCTIONS:
                raise PydanticCustomError(
                    "invalid_grader_name",
                    "Sub-grader name '{key}' must be an identifier (letters, digits, _) and not a function name.",
                    {"key": key},
                )
        return graders

    @field_validator("calculate_output")
    @classmethod
    def _formula(cls, source: str, info: ValidationInfo) -> str:
        graders = info.data.get("graders")
        if graders is None:
            return source  # the graders' own error is reported; names cannot be checked without them
        try:
            formulas.parse_formula(source, frozenset(graders))
        except formulas.FormulaError as exc:
            raise PydanticCustomError("invalid_formula", "{reason}", {"reason": str(exc)}) from None
        return source

    @model_validator(mode="after")
    def _size(self) -> MultiGrader:
        if _depth(self) > MAX_MULTI_DEPTH:
            raise PydanticCustomError("too_deep", f"multi graders nest at most {MAX_MULTI_DEPTH} levels.")
        if len(leaves(self)) > MAX_SUB_GRADERS:
            raise PydanticCustomError("too_many_graders", f"At most {MAX_SUB_GRADERS} graders in all.")
        return self

    def templates(self) -> list[str]:
        return [template for grader in self.graders.values() for template in grader.templates()]


Grader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | ScoreModelGrader
    | MultiGrader
    | RegexGrader
    | NumericGrader
    | JsonSchemaGrader
    | LengthGrader
    | EndsWithEosGrader
    | RewardModelGrader,
    Field(discriminator="type"),
]
MultiGrader.model_rebuild()
GRADER_KINDS = (
    "string_check",
    "text_similarity",
    "score_model",
    "multi",
    "regex",
    "numeric",
    "json_schema",
    "length",
    "ends_with_eos",
    "reward_model",
)
MODEL_BACKED_KINDS = ("score_model", "reward_model")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Grader)


def _depth(grader: Any) -> int:
    if isinstance(grader, MultiGrader):
        return 1 + max(_depth(sub) for sub in grader.graders.values())
    return 0


def leaves(grader: Any, path: str | None = None) -> list[tuple[str, Any]]:
    """(dotted path, grader) for every non-multi grader inside ``grader``, depth first; the path starts with
    the outer grader's name and goes down by sub-grader keys ('mix.exact'), as grading's errors name them."""
    path = grader.name if path is None else path
    if isinstance(grader, MultiGrader):
        return [item for key, sub in grader.graders.items() for item in leaves(sub, f"{path}.{key}")]
    return [(path, grader)]


def model_backed(grader: Any) -> list[str]:
    """Dotted names of the graders inside ``grader`` that need a model to score (a worker's job)."""
    return [name for name, leaf in leaves(grader) if leaf.type in MODEL_BACKED_KINDS]


def item_fields(grader: Any) -> list[str]:
    """The item fields the grader's templates read, as dotted paths ('answer', 'meta.id', 'a[0]'), sorted."""
    return sorted(
        {
            ref.dotted
            for template in grader.templates()
            for ref in template_refs(template)
            if ref.namespace == "item"
        }
    )


# --- parsing with field-named errors


class GraderSpecError(ValueError):
    """A grader spec refused; ``details`` holds one ``{"field", "code", "message"}`` per problem."""

    def __init__(self, details: list[dict[str, str]]) -> None:
        self.details = details
        super().__init__("; ".join(f"{d['field']}: {d['message']}" for d in details[:5]))


def _field_path(loc: tuple[int | str, ...], prefix: str) -> str:
    # A discriminated union puts the chosen tag in the location ("string_check", or after graders.<key>
    # inside a multi); the tag is not a field of the request, so it is dropped.
    parts: list[str] = [prefix] if prefix else []
    expect_tag = True
    for index, part in enumerate(loc):
        if expect_tag and part in GRADER_KINDS:
            expect_tag = False
            continue
        expect_tag = index >= 1 and loc[index - 1] == "graders" and isinstance(part, str)
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(parts).replace(".[", "[")


def _detail(error: Any, prefix: str) -> dict[str, str]:
    field = _field_path(tuple(error["loc"]), prefix)
    kind = error["type"]
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", ""))
        if tag in REFUSED_KINDS:
            code, message = REFUSED_KINDS[tag]
            return {"field": f"{field}.type", "code": code, "message": message}
        return {
            "field": f"{field}.type",
            "code": "unknown_grader_type",
            "message": f"Unknown grader type '{tag}'; one of: {', '.join(GRADER_KINDS)}.",
        }
    if kind == "union_tag_not_found":
        return {
            "field": f"{field}.type",
            "code": "missing_grader_type",
            "message": "A grader needs a 'type'.",
        }
    # pydantic's own error types become two clear codes or invalid_value; ours (PydanticCustomError) pass through.
    renamed = {"extra_forbidden": "unknown_field", "missing": "missing_field"}
    code = renamed.get(kind) or ("invalid_value" if kind in _PYDANTIC_CODES else str(kind))
    return {"field": field, "code": code, "message": str(error["msg"])}


_PYDANTIC_CODES = frozenset(get_args(ErrorType))  # built-in error types; ours pass through as codes


def parse_grader(raw: Any, *, field_prefix: str = "grader") -> Any:
    """Validate a raw grader spec (a JSON object) into its model; raises :class:`GraderSpecError`."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise GraderSpecError([_detail(error, field_prefix) for error in exc.errors()]) from None


def dump_grader(grader: Any) -> dict[str, Any]:
    """The normalized spec: every default filled in, as JSON (``schema`` under its JSON name)."""
    dumped: dict[str, Any] = grader.model_dump(mode="json", by_alias=True)
    return dumped
