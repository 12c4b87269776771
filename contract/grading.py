"""Scoring a sample with a validated grader: ``grade(grader, sample, item) -> GradeResult``. Torch-free.

The rule graders are computed here. The model-backed ones (``score_model``, ``reward_model``) are handed to a
:class:`ModelScorer`, which the training child implements with the models it has loaded; without one they
score 0 with the error ``needs_model_scorer``.

Nothing here raises on a bad sample or item: a grader that cannot score (an item field that is missing, an
answer with no number, a regex that ran past its timeout) scores 0 and its error is recorded in
``metadata["errors"]`` as ``{"grader", "code", "message"}``, so one bad row never stops an evaluation or a
GRPO step.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import jsonschema
import regex
from jsonschema.exceptions import best_match
from referencing.exceptions import Unresolvable

from contract import formula as formulas
from contract import safe_regex, textmetrics
from contract.graders import (
    EndsWithEosGrader,
    FieldRef,
    JsonSchemaGrader,
    LengthGrader,
    MultiGrader,
    NumericGrader,
    RegexGrader,
    RewardModelGrader,
    Sample,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    leaves,
    parse_template,
    template_refs,
)

MAX_SIMILARITY_CHARS = 10_000  # per side; fuzzy_match on two 10,000-character texts takes ~0.2 s here
MAX_JSON_CHARS = 100_000
MAX_DETAIL_CHARS = 200  # matched text echoed in metadata

# A number as people write it: optional sign, digits with optional thousands commas, optional decimals and
# exponent. The look-behinds keep a hyphen inside "2023-10-05" or "x-1" from reading as a minus sign.
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]])[-+])?(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
)


class ModelScorer(Protocol):
    """Scores with models; implemented where the models are loaded (the training child)."""

    def score_judge(self, grader: ScoreModelGrader, messages: list[dict[str, str]]) -> float:
        """The judge's score for the rendered messages (``{"role", "content"}``), within ``grader.range``."""
        ...

    def score_reward_model(self, grader: RewardModelGrader, *, prompt: Any, response: str) -> float:
        """The reward model's scalar for (prompt, response); ``prompt`` is a string or a list of messages."""
        ...


@dataclass(frozen=True)
class GradeResult:
    reward: float
    metadata: dict[str, Any]


class GradingError(Exception):
    """Why one grader could not score; becomes an entry of ``metadata["errors"]`` and a reward of 0."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Context:
    sample: Sample
    item: Mapping[str, Any]
    scorer: ModelScorer | None
    _output_json: Any = field(default=None, init=False)
    _parsed: bool = field(default=False, init=False)

    def output_json(self) -> Any:
        if not self._parsed:
            try:
                self._output_json = json.loads(self.sample.output_text)
            except (ValueError, RecursionError):
                raise GradingError("sample_not_json", "The sample's output_text is not valid JSON.") from None
            self._parsed = True
        return self._output_json


def as_sample(value: str | Sample | Mapping[str, Any]) -> Sample:
    """OpenAI sends the sample as a string; alignd also takes the :class:`Sample` object (or its JSON)."""
    if isinstance(value, Sample):
        return value
    if isinstance(value, str):
        return Sample(output_text=value)
    return Sample.model_validate(value)


def _walk(root: Any, ref: FieldRef, start: int, where: str) -> Any:
    current = root
    for part in ref.path[start:]:
        if isinstance(current, Mapping) and str(part) in current:
            current = current[str(part)]
        elif isinstance(current, list) and str(part).isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise GradingError("missing_field", f"{where} has no field '{ref.dotted}'.")
    return current


def resolve(ref: FieldRef, context: _Context) -> Any:
    """The value a placeholder names; raises GradingError when the item or sample lacks it."""
    if ref.namespace == "item":
        return _walk(context.item, ref, 0, "The item")
    if ref.path[0] == "output_json":
        return _walk(context.output_json(), ref, 1, "The sample's output_json")
    value = getattr(context.sample, str(ref.path[0]))
    if value is None:
        raise GradingError("missing_field", f"The sample has no {ref.path[0]}.")
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, context: _Context) -> str:
    """The template with every placeholder replaced (strings as they are, other values as JSON)."""
    return "".join(
        part if isinstance(part, str) else _as_text(resolve(part, context))
        for part in parse_template(template)
    )


def _render_value(template: str, context: _Context) -> Any:
    # A template that is one placeholder keeps its value's type (a list of chat messages stays a list).
    parts = parse_template(template)
    if len(parts) == 1 and isinstance(parts[0], FieldRef):
        return resolve(parts[0], context)
    return render(template, context)


def missing_item_fields(grader: Any, item: Mapping[str, Any]) -> list[str]:
    """The item fields ``grader`` reads that ``item`` lacks (dotted paths, sorted): a dataset row check."""
    missing: set[str] = set()
    for template in grader.templates():
        for ref in template_refs(template):
            if ref.namespace == "item":
                try:
                    _walk(item, ref, 0, "The item")
                except GradingError:
                    missing.add(ref.dotted)
    return sorted(missing)


# --- rule graders: each returns (reward, details)

Scored = tuple[float, dict[str, Any]]


def _string_check(grader: StringCheckGrader, context: _Context) -> Scored:
    text, reference = render(grader.input, context), render(grader.reference, context)
    checks: dict[str, Callable[[], bool]] = {
        "eq": lambda: text == reference,
        "ne": lambda: text != reference,
        "like": lambda: reference in text,
        "ilike": lambda: reference.casefold() in text.casefold(),
    }
    return float(checks[grader.operation]()), {}


_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": textmetrics.fuzzy_match,
    "bleu": textmetrics.sentence_bleu,
    "gleu": textmetrics.sentence_gleu,
    "rouge_l": textmetrics.rouge_l,
    **{f"rouge_{n}": functools.partial(textmetrics.rouge_n, n=n) for n in range(1, 6)},
}


def _text_similarity(grader: TextSimilarityGrader, context: _Context) -> Scored:
    text, reference = render(grader.input, context), render(grader.reference, context)
    longest = max(len(text), len(reference))
    if longest > MAX_SIMILARITY_CHARS:
        raise GradingError(
            "input_too_long",
            f"A text has {longest} characters; similarity is computed on at most {MAX_SIMILARITY_CHARS}.",
        )
    score = _METRICS[grader.evaluation_metric](text, reference)
    details = {} if grader.pass_threshold is None else {"passed": score >= grader.pass_threshold}
    return score, details


def _regex(grader: RegexGrader, context: _Context) -> Scored:
    flags = (
        (regex.IGNORECASE if grader.ignore_case else 0)
        | (regex.MULTILINE if grader.multiline else 0)
        | (regex.DOTALL if grader.dotall else 0)
    )
    text = render(grader.input, context)
    try:
        match = safe_regex.timed_search(
            grader.pattern, text, flags=flags, fullmatch=grader.mode == "fullmatch"
        )
    except safe_regex.SubjectTooLong as exc:
        raise GradingError("input_too_long", str(exc)) from None
    except safe_regex.RegexTimeout as exc:
        raise GradingError("regex_timeout", str(exc)) from None
    if match is None:
        return 0.0, {"matched": False}
    return 1.0, {"matched": True, "match": match.group(0)[:MAX_DETAIL_CHARS]}


def _to_number(text: str) -> float:
    return float(text.replace(",", ""))


def _numeric(grader: NumericGrader, context: _Context) -> Scored:
    reference_text = render(grader.reference, context).strip()
    if _NUMBER.fullmatch(reference_text) is None:
        raise GradingError(
            "reference_not_a_number", f"The reference {reference_text[:80]!r} is not a number."
        )
    reference = _to_number(reference_text)
    text = render(grader.input, context)
    if len(text) > safe_regex.MAX_SUBJECT_CHARS:
        raise GradingError(
            "input_too_long", f"The input has {len(text)} characters; at most {safe_regex.MAX_SUBJECT_CHARS}."
        )
    if grader.extract == "exact":
        found = [text.strip()] if _NUMBER.fullmatch(text.strip()) else []
    else:
        found = _NUMBER.findall(text)
    if not found:
        what = "is not a number" if grader.extract == "exact" else "has no number"
        raise GradingError("no_number", f"The input {what}.")
    value = _to_number(found[-1] if grader.extract == "last" else found[0])
    close = math.isclose(value, reference, rel_tol=grader.rel_tol, abs_tol=grader.abs_tol)
    return float(close), {"value": value, "reference": reference}


def _safe_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    # jsonschema's own 'pattern' uses re.search with no time limit; this one has the timeout.
    if validator.is_type(instance, "string") and safe_regex.timed_search(pattern, instance) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.lru_cache(maxsize=64)
def _schema_validator(schema_json: str) -> Any:
    schema = json.loads(schema_json)
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return jsonschema.validators.extend(base, {"pattern": _safe_pattern})(schema)


def _json_schema(grader: JsonSchemaGrader, context: _Context) -> Scored:
    text = render(grader.input, context)
    if len(text) > MAX_JSON_CHARS:
        raise GradingError(
            "input_too_long", f"The input has {len(text)} characters; at most {MAX_JSON_CHARS}."
        )
    try:
        instance = json.loads(text)
    except (ValueError, RecursionError):
        raise GradingError("invalid_json", "The input is not valid JSON.") from None
    validator = _schema_validator(json.dumps(grader.json_schema, sort_keys=True))
    try:
        error = best_match(validator.iter_errors(instance))
    except safe_regex.RegexTimeout as exc:
        raise GradingError("regex_timeout", str(exc)) from None
    except (jsonschema.exceptions.SchemaError, Unresolvable, RecursionError, LookupError) as exc:
        raise GradingError("schema_error", f"The schema could not be applied: {exc}") from None
    if error is None:
        return 1.0, {"valid": True}
    where = "/".join(str(part) for part in error.absolute_path) or "(root)"
    return 0.0, {"valid": False, "reason": f"at {where}: {error.message}"[:MAX_DETAIL_CHARS]}


def _length(grader: LengthGrader, context: _Context) -> Scored:
    if grader.unit == "tokens":
        if context.sample.output_tokens is None:
            raise GradingError(
                "missing_field", "unit 'tokens' needs the sample's output_tokens, which it lacks."
            )
        size = context.sample.output_tokens
    else:
        text = render(grader.input, context)
        size = len(text) if grader.unit == "chars" else len(text.split())
    inside = (grader.min is None or size >= grader.min) and (grader.max is None or size <= grader.max)
    return float(inside), {"length": size, "unit": grader.unit}


def _ends_with_eos(grader: EndsWithEosGrader, context: _Context) -> Scored:
    reason = context.sample.finish_reason
    if reason is None:
        raise GradingError(
            "missing_field", "The sample has no finish_reason (send the sample object, not a string)."
        )
    return float(reason == "stop"), {"finish_reason": reason}


# --- model-backed graders


def _scorer(context: _Context, kind: str) -> ModelScorer:
    if context.scorer is None:
        raise GradingError(
            "needs_model_scorer", f"{kind} graders are scored by a worker that loads the model."
        )
    return context.scorer


def _checked_score(call: Callable[[], float]) -> float:
    try:
        value = float(call())
    except Exception as exc:  # the scorer is another component's code: its failure is this sample's error
        raise GradingError("model_scorer_failed", f"{type(exc).__name__}: {exc}") from None
    if not math.isfinite(value):
        raise GradingError("model_scorer_failed", f"The model scorer returned {value}.")
    return value


def _score_model(grader: ScoreModelGrader, context: _Context) -> Scored:
    scorer = _scorer(context, "score_model")
    messages = [
        {"role": message.role, "content": "\n".join(render(part.text, context) for part in message.content)}
        for message in grader.input
    ]
    score = _checked_score(lambda: scorer.score_judge(grader, messages))
    low, high = grader.range
    if not low <= score <= high:
        raise GradingError("score_out_of_range", f"The judge answered {score}, outside [{low}, {high}].")
    details = {} if grader.pass_threshold is None else {"passed": score >= grader.pass_threshold}
    return score, details


def _reward_model(grader: RewardModelGrader, context: _Context) -> Scored:
    scorer = _scorer(context, "reward_model")
    prompt, response = _render_value(grader.prompt, context), render(grader.input, context)
    return _checked_score(lambda: scorer.score_reward_model(grader, prompt=prompt, response=response)), {}


_SCORERS: dict[str, Callable[[Any, _Context], Scored]] = {
    "string_check": _string_check,
    "text_similarity": _text_similarity,
    "regex": _regex,
    "numeric": _numeric,
    "json_schema": _json_schema,
    "length": _length,
    "ends_with_eos": _ends_with_eos,
    "score_model": _score_model,
    "reward_model": _reward_model,
}


@functools.lru_cache(maxsize=256)
def _formula(source: str, names: frozenset[str]) -> formulas.Formula:
    return formulas.parse_formula(source, names)


def _grade_node(
    grader: Any, context: _Context, errors: list[dict[str, str]], path: str
) -> tuple[float, dict[str, Any]]:
    if isinstance(grader, MultiGrader):
        scores: dict[str, float] = {}
        children: dict[str, Any] = {}
        for key, sub in grader.graders.items():
            scores[key], children[key] = _grade_node(sub, context, errors, f"{path}.{key}")
        try:
            reward = formulas.evaluate(_formula(grader.calculate_output, frozenset(grader.graders)), scores)
        except formulas.FormulaError as exc:
            errors.append({"grader": path, "code": "formula_error", "message": str(exc)})
            reward = 0.0
        return reward, {"scores": scores, "graders": children}
    try:
        return _SCORERS[grader.type](grader, context)
    except GradingError as exc:
        errors.append({"grader": path, "code": exc.code, "message": exc.message})
    except Exception as exc:  # a bug must not stop an evaluation; it is reported, never swallowed silently
        errors.append({"grader": path, "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"})
    return 0.0, {}


def grade(
    grader: Any,
    sample: str | Sample | Mapping[str, Any],
    item: Mapping[str, Any] | None = None,
    *,
    model_scorer: ModelScorer | None = None,
) -> GradeResult:
    """Score one sample. ``grader`` is a model from ``contract.graders.parse_grader``.

    ``metadata``: ``name``, ``type``, ``errors`` (list of ``{"grader", "code", "message"}``, ``grader`` being
    the dotted path inside a multi), ``scores`` (a multi's sub-graders' rewards by name; empty otherwise)
    and ``details`` (what the kind measured: matched text, parsed numbers, length, per-sub-grader details).
    """
    context = _Context(sample=as_sample(sample), item=item or {}, scorer=model_scorer)
    errors: list[dict[str, str]] = []
    reward, details = _grade_node(grader, context, errors, grader.name)
    scores = details.pop("scores", {}) if isinstance(grader, MultiGrader) else {}
    return GradeResult(
        reward=reward,
        metadata={
            "name": grader.name,
            "type": grader.type,
            "errors": errors,
            "scores": scores,
            "details": details,
        },
    )


def references(grader: Any, item: Mapping[str, Any]) -> dict[str, str]:
    """What each grader inside ``grader`` compares answers with on this item: ``{dotted path: rendered
    reference}`` for the kinds with a ``reference`` template (string_check, text_similarity, numeric).

    A reference that reads the sample, or an item field the item lacks, is left out (there is no single
    reference to show: the grader's error says why it scored 0)."""
    out: dict[str, str] = {}
    context = _Context(sample=Sample(output_text=""), item=item, scorer=None)
    for path, leaf in leaves(grader):
        template = getattr(leaf, "reference", None)
        if not isinstance(template, str):
            continue
        if any(ref.namespace != "item" for ref in template_refs(template)):
            continue
        try:
            out[path] = render(template, context)
        except GradingError:
            continue
    return out
