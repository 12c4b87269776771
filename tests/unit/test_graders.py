"""Graders: every kind scored on hand-written cases, every refusal with its code and field, metrics checked
against values worked out by hand in the comments."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from contract import textmetrics
from contract.graders import (
    GraderSpecError,
    RewardModelGrader,
    ScoreModelGrader,
    dump_grader,
    item_fields,
    model_backed,
    parse_grader,
    parse_template,
)
from contract.grading import GradeResult, grade, missing_item_fields, references

OUT = "{{sample.output_text}}"


def check(**spec: Any) -> dict[str, Any]:
    return {"name": "g", **spec}


def run(spec: dict[str, Any], sample: Any, item: dict[str, Any] | None = None, **kwargs: Any) -> GradeResult:
    return grade(parse_grader(spec), sample, item, **kwargs)


def refused(spec: Any) -> list[tuple[str, str]]:
    with pytest.raises(GraderSpecError) as info:
        parse_grader(spec)
    return [(d["field"], d["code"]) for d in info.value.details]


def error_codes(result: GradeResult) -> list[str]:
    return [e["code"] for e in result.metadata["errors"]]


# --- templates


def test_templates_split_into_text_and_field_references() -> None:
    parts = parse_template("Q: {{ item.question }} / {{item.answers[0].text}} -> {{sample.output_json.a}}")
    refs = [p for p in parts if not isinstance(p, str)]
    assert [(r.namespace, r.path) for r in refs] == [
        ("item", ("question",)),
        ("item", ("answers", 0, "text")),
        ("sample", ("output_json", "a")),
    ]
    assert [r.dotted for r in refs] == ["question", "answers[0].text", "output_json.a"]
    assert parts[0] == "Q: "


@pytest.mark.parametrize(
    ("template", "code"),
    [
        ("{{foo.bar}}", "unknown_template_field"),
        ("{{item}}", "unknown_template_field"),
        ("{{sample.output_tools}}", "unknown_template_field"),
        ("{{sample.output_text.length}}", "unknown_template_field"),
        ("{{item.a b}}", "unknown_template_field"),
        ("answer: {{item.answer", "invalid_template"),
    ],
)
def test_bad_templates_are_refused_with_the_field_named(template: str, code: str) -> None:
    spec = check(type="string_check", input=OUT, reference=template, operation="eq")
    assert refused(spec) == [("grader.reference", code)]


def test_item_fields_lists_what_a_grader_reads_and_rows_are_checked() -> None:
    grader = parse_grader(
        check(
            type="multi",
            graders={
                "exact": check(type="string_check", input=OUT, reference="{{item.answer}}", operation="eq"),
                "near": check(type="numeric", reference="{{ item.answer }}"),
                "meta": check(type="regex", input="{{item.meta.tag}} {{sample.output_text}}", pattern="x"),
            },
            calculate_output="exact + near + meta",
        )
    )
    assert item_fields(grader) == ["answer", "meta.tag"]
    assert missing_item_fields(grader, {"answer": 1, "meta": {"tag": "t"}}) == []
    assert missing_item_fields(grader, {"meta": {}}) == ["answer", "meta.tag"]


def test_a_missing_item_field_scores_zero_with_the_error_recorded() -> None:
    result = run(
        check(type="string_check", input=OUT, reference="{{item.answer}}", operation="eq"), "Paris", {}
    )
    assert result.reward == 0.0
    assert result.metadata["errors"] == [
        {"grader": "g", "code": "missing_field", "message": "The item has no field 'answer'."}
    ]


# --- string_check


@pytest.mark.parametrize(
    ("operation", "output", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "Lyon", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris.", 1.0),
        ("like", "It is PARIS.", 0.0),
        ("ilike", "It is PARIS.", 1.0),
        ("ilike", "It is Lyon.", 0.0),
    ],
)
def test_string_check(operation: str, output: str, expected: float) -> None:
    spec = check(type="string_check", input=OUT, reference="{{item.city}}", operation=operation)
    result = run(spec, output, {"city": "Paris"})
    assert result.reward == expected and result.metadata["errors"] == []
    assert result.metadata["name"] == "g" and result.metadata["type"] == "string_check"


def test_non_string_item_values_render_as_json() -> None:
    spec = check(type="string_check", input=OUT, reference="{{item.answer}}", operation="eq")
    assert run(spec, "42", {"answer": 42}).reward == 1.0
    assert run(spec, '["a", 1]', {"answer": ["a", 1]}).reward == 1.0


def test_output_json_fields_are_templates_too() -> None:
    spec = check(type="string_check", input="{{sample.output_json.city}}", reference="Paris", operation="eq")
    assert run(spec, '{"city": "Paris"}').reward == 1.0
    result = run(spec, "Paris")
    assert result.reward == 0.0 and error_codes(result) == ["sample_not_json"]


# --- text_similarity


def _levenshtein_table(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _lcs_table(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for char_a in a:
        current = [0]
        for j, char_b in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if char_a == char_b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def test_bit_parallel_levenshtein_and_lcs_match_the_textbook_tables() -> None:
    rng = random.Random(7)
    for _ in range(1500):
        a = "".join(rng.choice("abcé") for _ in range(rng.randint(0, 14)))
        b = "".join(rng.choice("abcé") for _ in range(rng.randint(0, 70)))  # past one 64-bit word
        assert textmetrics.levenshtein(a, b) == _levenshtein_table(a, b), (a, b)
        assert textmetrics.lcs_length(a, b) == _lcs_table(a, b), (a, b)


def similarity(metric: str, output: str, reference: str, **extra: Any) -> GradeResult:
    spec = check(type="text_similarity", input=OUT, reference=reference, evaluation_metric=metric, **extra)
    return run(spec, output)


def test_fuzzy_match_is_normalized_levenshtein() -> None:
    # kitten -> sitting: 3 edits (k->s, e->i, +g); the longer has 7 characters: 1 - 3/7.
    assert similarity("fuzzy_match", "kitten", "sitting").reward == pytest.approx(1 - 3 / 7)
    assert similarity("fuzzy_match", "same", "same").reward == 1.0
    assert similarity("fuzzy_match", "", "abc").reward == 0.0


def test_bleu_against_hand_computed_values() -> None:
    ref = "the cat sat on the mat"
    assert similarity("bleu", ref, ref).reward == pytest.approx(1.0)
    # "the cat sat on a mat": 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3; same length: no penalty.
    assert similarity("bleu", "the cat sat on a mat", ref).reward == pytest.approx(
        (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    )
    # "the cat the mat": 1-grams 4/4, 2-grams 2/3 (the cat, the mat), 3-grams 0/2 -> 1/(2*2), 4-grams 0/1 ->
    # 1/(4*1) (exp smoothing doubles per empty order); 4 tokens vs 6: brevity exp(1 - 6/4).
    expected = math.exp(1 - 6 / 4) * (1 * 2 / 3 * 1 / 4 * 1 / 4) ** 0.25
    assert similarity("bleu", "the cat the mat", ref).reward == pytest.approx(expected)
    # "the cat" has no 3-grams: effective order 2, both orders fully matched; brevity exp(1 - 3/2).
    assert similarity("bleu", "the cat", "the cat sat").reward == pytest.approx(math.exp(1 - 3 / 2))
    assert similarity("bleu", "dog", ref).reward == 0.0
    assert similarity("bleu", "", ref).reward == 0.0
    # Case and punctuation are tokens: "Cat." is ["Cat", "."].
    assert textmetrics.bleu_tokens("The Cat.") == ["The", "Cat", "."]


def test_gleu_is_min_of_pooled_precision_and_recall() -> None:
    # hypothesis n-grams (1-4): 3 + 2 + 1 = 6, all in the reference; reference: 6 + 5 + 4 + 3 = 18.
    assert similarity("gleu", "the cat sat", "the cat sat on the mat").reward == pytest.approx(6 / 18)


def test_rouge_against_hand_computed_values() -> None:
    ref = "the cat sat on the mat"
    # unigram overlap 5 of 6 on each side (the, cat, sat, on, mat).
    assert similarity("rouge_1", "the cat sat on a mat", ref).reward == pytest.approx(5 / 6)
    # bigrams: the cat, cat sat, sat on shared of 5 each side.
    assert similarity("rouge_2", "the cat sat on a mat", ref).reward == pytest.approx(3 / 5)
    # LCS "the cat sat on mat" = 5 of 6 tokens each side.
    assert similarity("rouge_l", "the cat sat on a mat", ref).reward == pytest.approx(5 / 6)
    # LCS 2 ("police killed") of 4 tokens on each side; tokens are lowercased.
    assert similarity(
        "rouge_l", "The gunman police killed", "police killed the gunman"
    ).reward == pytest.approx(0.5)
    # precision 1 (3/3) and recall 3/6: F1 = 2 * 1 * 0.5 / 1.5.
    assert similarity("rouge_3", "the cat sat on", "the cat sat on the mat").reward == pytest.approx(
        2 * (2 / 2) * (2 / 4) / (1 + 2 / 4)
    )
    assert similarity("rouge_5", "too short", ref).reward == 0.0


def test_similarity_threshold_and_length_cap() -> None:
    result = similarity("fuzzy_match", "kitten", "sitting", pass_threshold=0.5)
    assert result.metadata["details"] == {"passed": True}
    long = similarity("fuzzy_match", "x" * 10_001, "x")
    assert long.reward == 0.0 and error_codes(long) == ["input_too_long"]


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_metrics_alignd_cannot_compute_are_refused(metric: str) -> None:
    spec = check(type="text_similarity", input=OUT, reference="x", evaluation_metric=metric)
    assert refused(spec) == [("grader.evaluation_metric", "metric_not_supported")]


# --- regex


def test_regex_search_fullmatch_and_flags() -> None:
    result = run(check(type="regex", pattern=r"\d+ apples"), "I have 12 apples.")
    assert result.reward == 1.0 and result.metadata["details"] == {"matched": True, "match": "12 apples"}
    assert run(check(type="regex", pattern=r"\d+", mode="fullmatch"), "12 apples").reward == 0.0
    assert run(check(type="regex", pattern="yes", ignore_case=True), "YES").reward == 1.0
    assert run(check(type="regex", pattern="^b$", multiline=True), "a\nb").reward == 1.0
    assert run(check(type="regex", pattern="a.b", dotall=True), "a\nb").reward == 1.0


@pytest.mark.parametrize(
    ("pattern", "code"),
    [
        ("(unclosed", "invalid_regex"),
        ("{{item.x}}", "invalid_regex"),  # literal braces to re, an error to the regex package that matches
        ("(a+)+$", "unsafe_regex"),
        (r"^(\w+\s?)*$", "unsafe_regex"),
        ("(a{2,})*b", "unsafe_regex"),
        ("(?:x|y*)+z", "unsafe_regex"),
        ("a" * 513, "regex_too_long"),
    ],
)
def test_bad_and_catastrophic_regexes_are_refused(pattern: str, code: str) -> None:
    assert refused(check(type="regex", pattern=pattern)) == [("grader.pattern", code)]


def test_possessive_and_atomic_inner_quantifiers_are_allowed() -> None:
    assert run(check(type="regex", pattern=r"^(\w++\s?)*$"), "a b c").reward == 1.0
    assert run(check(type="regex", pattern=r"^(?>\w+\s?)*$"), "a b c").reward == 1.0


def test_a_regex_that_runs_too_long_is_stopped() -> None:
    # Polynomial backtracking the static check lets through (no nesting); the timeout stops it.
    result = run(check(type="regex", pattern=".*a.*b"), "a" * 50_000)
    assert result.reward == 0.0 and error_codes(result) == ["regex_timeout"]
    assert error_codes(run(check(type="regex", pattern="a"), "a" * 100_001)) == ["input_too_long"]


# --- numeric


@pytest.mark.parametrize(
    ("output", "reference", "extra", "expected"),
    [
        ("The answer is 42.", "42", {}, 1.0),
        ("3 apples and 5 pears", "5", {}, 1.0),
        ("3 apples and 5 pears", "5", {"extract": "first"}, 0.0),
        ("It costs $1,234.50 in total", "1234.5", {}, 1.0),
        ("x = -3", "-3", {}, 1.0),
        ("on 2023-10-05", "5", {}, 1.0),  # the hyphen of a date is not a minus sign
        ("pi is 3.14159", "3.14", {"abs_tol": 0.01}, 1.0),
        ("pi is 3.14159", "3.14", {}, 0.0),
        ("1e3", "1000", {"extract": "exact"}, 1.0),
        ("about 42", "42", {"extract": "exact"}, 0.0),
    ],
)
def test_numeric(output: str, reference: str, extra: dict[str, Any], expected: float) -> None:
    result = run(check(type="numeric", reference=reference, **extra), output)
    assert result.reward == expected, result.metadata


def test_numeric_reads_the_item_and_records_parse_errors() -> None:
    spec = check(type="numeric", reference="{{item.answer}}")
    result = run(spec, "so 7", {"answer": 7})
    assert result.reward == 1.0 and result.metadata["details"] == {"value": 7.0, "reference": 7.0}
    no_number = run(spec, "I do not know", {"answer": 7})
    assert no_number.reward == 0.0 and error_codes(no_number) == ["no_number"]
    bad_reference = run(spec, "7", {"answer": "seven"})
    assert bad_reference.reward == 0.0 and error_codes(bad_reference) == ["reference_not_a_number"]


# --- json_schema

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"}, "age": {"type": "integer"}},
    "required": ["name"],
}


def test_json_schema_grader() -> None:
    spec = check(type="json_schema", schema=SCHEMA)
    assert run(spec, '{"name": "Ada", "age": 36}').reward == 1.0
    wrong = run(spec, '{"name": "Ada", "age": "old"}')
    assert wrong.reward == 0.0 and wrong.metadata["errors"] == []
    assert wrong.metadata["details"]["valid"] is False and "age" in wrong.metadata["details"]["reason"]
    assert run(spec, '{"name": "ada"}').reward == 0.0  # the pattern keyword, matched with the timeout
    not_json = run(spec, "name: Ada")
    assert not_json.reward == 0.0 and error_codes(not_json) == ["invalid_json"]
    assert dump_grader(parse_grader(spec))["schema"] == SCHEMA


@pytest.mark.parametrize(
    ("schema", "code"),
    [
        ({"type": "strin"}, "invalid_json_schema"),
        ("object", "invalid_json_schema"),
        ({"patternProperties": {"^a": {}}}, "unsupported_schema_keyword"),
        ({"$ref": "https://example.com/schema.json"}, "unsupported_schema_ref"),
        ({"properties": {"x": {"type": "string", "pattern": "(a+)+$"}}}, "unsafe_regex"),
    ],
)
def test_bad_json_schemas_are_refused(schema: Any, code: str) -> None:
    assert refused(check(type="json_schema", schema=schema)) == [("grader.schema", code)]


def test_a_property_named_like_a_keyword_is_not_a_keyword() -> None:
    schema = {"properties": {"patternProperties": {"type": "string"}}, "examples": [{"$ref": "http://x"}]}
    assert run(check(type="json_schema", schema=schema), '{"patternProperties": "x"}').reward == 1.0


# --- length and ends_with_eos


def test_length_in_chars_words_and_tokens() -> None:
    assert run(check(type="length", min=3, max=5), "abcd").reward == 1.0
    assert run(check(type="length", max=3), "abcd").reward == 0.0
    words = run(check(type="length", unit="words", min=2), "two words")
    assert words.reward == 1.0 and words.metadata["details"] == {"length": 2, "unit": "words"}
    tokens = check(type="length", unit="tokens", max=10)
    assert run(tokens, {"output_text": "hi", "output_tokens": 10}).reward == 1.0
    assert run(tokens, {"output_text": "hi", "output_tokens": 11}).reward == 0.0
    assert error_codes(run(tokens, "hi")) == ["missing_field"]


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({}, "missing_bounds"),
        ({"min": 5, "max": 2}, "invalid_bounds"),
        ({"unit": "tokens", "max": 3, "input": "{{item.x}}"}, "invalid_value"),
        ({"unit": "bytes", "max": 3}, "invalid_value"),
    ],
)
def test_bad_length_graders_are_refused(spec: dict[str, Any], code: str) -> None:
    assert [c for _, c in refused(check(type="length", **spec))] == [code]


def test_ends_with_eos() -> None:
    spec = check(type="ends_with_eos")
    assert run(spec, {"output_text": "done", "finish_reason": "stop"}).reward == 1.0
    assert run(spec, {"output_text": "cut o", "finish_reason": "length"}).reward == 0.0
    assert error_codes(run(spec, "no finish reason in a plain string")) == ["missing_field"]


# --- model-backed kinds

JUDGE = check(
    type="score_model",
    model="model_0123abcd",
    input=[
        {"role": "system", "content": "Score 0-1."},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "Q: {{item.q}} A: {{sample.output_text}}"}],
        },
    ],
)


class LengthJudge:
    """A deterministic ModelScorer: the judge 'scores' by length, the reward model by prompt type."""

    def __init__(self, score: float = 0.5) -> None:
        self.score = score
        self.seen: list[Any] = []

    def score_judge(self, grader: ScoreModelGrader, messages: list[dict[str, str]]) -> float:
        self.seen.append(messages)
        return self.score

    def score_reward_model(self, grader: RewardModelGrader, *, prompt: Any, response: str) -> float:
        self.seen.append((prompt, response))
        if response == "boom":
            raise RuntimeError("model crashed")
        return -1.5


def test_score_model_validation() -> None:
    assert refused({**JUDGE, "model": ""}) == [("grader.model", "judge_model_required")]
    no_model = {k: v for k, v in JUDGE.items() if k != "model"}
    assert refused(no_model) == [("grader.model", "judge_model_required")]
    assert refused({**JUDGE, "model": "gpt-4o"}) == [("grader.model", "invalid_judge_model")]
    assert refused({**JUDGE, "range": [1, 0]}) == [("grader", "invalid_range")]
    assert (
        refused({**JUDGE, "input": [{"role": "user", "content": "{{item.q.}}"}]})[0][1]
        == "unknown_template_field"
    )
    normalized = dump_grader(parse_grader(JUDGE))
    assert normalized["input"][0]["content"] == [{"type": "input_text", "text": "Score 0-1."}]
    assert normalized["range"] == [0.0, 1.0]


def test_score_model_delegates_to_the_model_scorer() -> None:
    grader = parse_grader(JUDGE)
    assert model_backed(grader) == ["g"]
    without = grade(grader, "Paris", {"q": "Capital of France?"})
    assert without.reward == 0.0 and error_codes(without) == ["needs_model_scorer"]
    judge = LengthJudge(0.75)
    result = grade(grader, "Paris", {"q": "Capital of France?"}, model_scorer=judge)
    assert result.reward == 0.75
    assert judge.seen == [
        [
            {"role": "system", "content": "Score 0-1."},
            {"role": "user", "content": "Q: Capital of France? A: Paris"},
        ]
    ]
    out_of_range = grade(grader, "x", {"q": "?"}, model_scorer=LengthJudge(3.0))
    assert out_of_range.reward == 0.0 and error_codes(out_of_range) == ["score_out_of_range"]


def test_reward_model_gets_the_prompt_as_it_is_and_its_failures_are_recorded() -> None:
    assert refused(check(type="reward_model", artifact="model_1")) == [
        ("grader.artifact", "invalid_artifact")
    ]
    grader = parse_grader(check(type="reward_model", artifact="art_00ff"))
    assert item_fields(grader) == ["prompt"]
    scorer = LengthJudge()
    messages = [{"role": "user", "content": "hi"}]
    assert grade(grader, "hello", {"prompt": messages}, model_scorer=scorer).reward == -1.5
    assert scorer.seen == [(messages, "hello")]
    failed = grade(grader, "boom", {"prompt": "p"}, model_scorer=scorer)
    assert failed.reward == 0.0
    assert failed.metadata["errors"][0]["code"] == "model_scorer_failed"
    assert "model crashed" in failed.metadata["errors"][0]["message"]


# --- multi


def multi(formula: str, **graders: Any) -> dict[str, Any]:
    graders = graders or {
        "exact": check(type="string_check", input=OUT, reference="{{item.answer}}", operation="eq"),
        "fuzzy": check(
            type="text_similarity", input=OUT, reference="{{item.answer}}", evaluation_metric="fuzzy_match"
        ),
    }
    return check(type="multi", graders=graders, calculate_output=formula)


def test_multi_combines_sub_graders() -> None:
    result = run(multi("0.5 * exact + 0.5 * fuzzy"), "kitten", {"answer": "sitting"})
    assert result.reward == pytest.approx(0.5 * 0 + 0.5 * (1 - 3 / 7))
    assert result.metadata["scores"] == {"exact": 0.0, "fuzzy": pytest.approx(1 - 3 / 7)}
    assert result.metadata["details"] == {"graders": {"exact": {}, "fuzzy": {}}}
    clipped = run(
        multi("clip(2 * fuzzy - exact, 0, 0.5) + max(exact, 0) + abs(-1) - floor(0.5) + ceil(0)"),
        "a",
        {"answer": "a"},
    )
    assert clipped.reward == pytest.approx(0.5 + 1 + 1)
    assert (
        run(multi("sqrt(fuzzy) * exp(0) + log(1) + fuzzy ** 2 + min(1, 2, 3)"), "a", {"answer": "a"}).reward
        == 3.0
    )


def test_multi_records_a_failing_sub_grader_and_scores_it_zero() -> None:
    spec = multi(
        "a + b", a=check(type="numeric", reference="{{item.n}}"), b=check(type="regex", pattern="yes")
    )
    result = run(spec, "yes", {"n": 3})
    assert result.reward == 1.0
    assert result.metadata["errors"] == [
        {"grader": "g.a", "code": "no_number", "message": "The input has no number."}
    ]


@pytest.mark.parametrize(
    ("formula", "says"),
    [
        ("__import__('os')", "Function '__import__' is not allowed"),
        ("__import__('os').system('true')", "not allowed"),
        ("exact.__class__", "Attribute access is not allowed"),
        ("open('x')", "Function 'open' is not allowed"),
        ("eval('1')", "Function 'eval' is not allowed"),
        ("exact.real + 1", "Attribute access"),
        ("[exact][0]", "not allowed"),
        ("(lambda: 1)()", "Calling anything but the listed functions by name is not allowed"),
        ("exact if fuzzy else 1", "not allowed"),
        ("exact > 0.5", "not allowed"),
        ("'text'", "Only numbers"),
        ("True + exact", "Only numbers"),
        ("exact ^ 2", "use ** for powers"),
        ("exact + unknown", "Unknown name 'unknown'"),
        ("max(exact)", "'max' takes at least 2"),
        ("min(exact, key=abs)", "positional arguments only"),
        ("clip(exact, 0)", "'clip' takes 3"),
        ("(x := 1)", "not allowed"),
        ("exact +", "not a valid expression"),
        ("", "empty"),
        ("1" * 1001, "at most 1000"),
    ],
)
def test_unsafe_or_bad_formulas_are_refused(formula: str, says: str) -> None:
    with pytest.raises(GraderSpecError) as info:
        parse_grader(multi(formula))
    [detail] = info.value.details
    assert (detail["field"], detail["code"]) == ("grader.calculate_output", "invalid_formula")
    assert says in detail["message"], detail["message"]


@pytest.mark.parametrize(
    "formula", ["exact / (fuzzy - fuzzy)", "sqrt(exact - 2)", "exp(1000 * fuzzy)", "(exact - 2) ** 0.5"]
)
def test_formulas_that_cannot_be_evaluated_score_zero(formula: str) -> None:
    result = run(multi(formula), "a", {"answer": "a"})
    assert result.reward == 0.0 and error_codes(result) == ["formula_error"]


def test_multi_structure_is_checked() -> None:
    leaf = check(type="regex", pattern="x")
    assert refused(multi("1", **{"min": leaf})) == [("grader.graders", "invalid_grader_name")]
    assert refused(check(type="multi", graders={"a-b": leaf}, calculate_output="1")) == [
        ("grader.graders", "invalid_grader_name")
    ]
    deep: dict[str, Any] = leaf
    for _ in range(4):
        deep = multi("a", a=deep)
    assert refused(deep) == [("grader", "too_deep")]
    wide = multi(
        "a",
        a=multi("x0", **{f"x{i}": leaf for i in range(16)}),
        b=multi("x0", **{f"x{i}": leaf for i in range(16)}),
        c=leaf,
    )
    assert refused(wide) == [("grader", "too_many_graders")]
    inner = multi("a", a={"type": "python", "name": "p", "source": "def grade(s, i): return 1"})
    assert refused(inner) == [("grader.graders.a.type", "grader_kind_not_allowed")]
    bad_leaf = multi("a", a=check(type="regex", pattern="(a*)*"))
    assert refused(bad_leaf) == [("grader.graders.a.pattern", "unsafe_regex")]


# --- kinds and normalization


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
            ("grader.type", "grader_kind_not_allowed"),
        ),
        ({"type": "label_model", "name": "l"}, ("grader.type", "grader_kind_not_supported")),
        ({"type": "magic", "name": "m"}, ("grader.type", "unknown_grader_type")),
        ({"name": "m"}, ("grader.type", "missing_grader_type")),
        ({"type": "regex", "name": "r", "pattern": "x", "flags": 1}, ("grader.flags", "unknown_field")),
        (
            {"type": "string_check", "name": "s", "input": OUT, "operation": "eq"},
            ("grader.reference", "missing_field"),
        ),
        (
            {"type": "string_check", "name": "", "input": OUT, "reference": "", "operation": "eq"},
            ("grader.name", "invalid_value"),
        ),
        ("not an object", ("grader", "invalid_value")),
    ],
)
def test_refused_kinds_and_shapes(spec: Any, expected: tuple[str, str]) -> None:
    assert refused(spec) == [expected]


def test_python_refusal_says_why() -> None:
    with pytest.raises(GraderSpecError) as info:
        parse_grader({"type": "python", "name": "p", "source": "import os"})
    assert "never runs user code" in info.value.details[0]["message"]


def test_normalized_specs_round_trip_with_defaults_filled_in() -> None:
    grader = parse_grader(check(type="numeric", reference="{{item.answer}}"))
    dumped = dump_grader(grader)
    assert dumped == {
        "name": "g",
        "type": "numeric",
        "input": OUT,
        "reference": "{{item.answer}}",
        "extract": "last",
        "rel_tol": 1e-9,
        "abs_tol": 0.0,
    }
    assert parse_grader(dumped) == grader
    spec = multi("exact")
    assert parse_grader(dump_grader(parse_grader(spec))) == parse_grader(spec)


VALID_SPECS = [
    check(type="string_check", input=OUT, reference="{{item.answer}}", operation="ilike"),
    check(
        type="text_similarity",
        input=OUT,
        reference="{{item.answer}}",
        evaluation_metric="bleu",
        pass_threshold=0.5,
    ),
    check(type="regex", pattern=r"\d+", mode="fullmatch", ignore_case=True),
    check(type="numeric", reference="{{item.answer}}", extract="first", abs_tol=0.5),
    check(type="json_schema", schema=SCHEMA),
    check(type="length", unit="words", min=1, max=5),
    check(type="ends_with_eos"),
    JUDGE,
    check(type="reward_model", artifact="art_00ff"),
    multi("0.5 * exact + 0.5 * fuzzy"),
]
ODD_VALUES: list[Any] = [
    None,
    0,
    -1,
    1e308,
    "",
    "{{item.x}}",
    "{{",
    [],
    [1, "a"],
    {},
    {"type": "regex"},
    True,
]
ODD_SAMPLES: list[Any] = [
    "",
    "42",
    '{"name": "Ada"}',
    {"output_text": "x" * 20_000, "finish_reason": "length"},
]
ODD_ITEMS: list[Any] = [{}, {"answer": None}, {"answer": [1, {"a": 2}]}, {"answer": "4,2"}, {"answer": 1e308}]


def test_odd_values_are_refused_cleanly_and_never_break_grading() -> None:
    # Every field of every kind swapped for values of the wrong type or range: validation either accepts or
    # raises GraderSpecError with details (never another exception), and what it accepts always grades.
    for spec in VALID_SPECS:
        for key in spec:
            for value in ODD_VALUES:
                try:
                    grader = parse_grader({**spec, key: value})
                except GraderSpecError as exc:
                    assert exc.details and all(d["field"].startswith("grader") for d in exc.details)
                    continue
                for sample in ODD_SAMPLES:
                    for item in ODD_ITEMS:
                        result = grade(grader, sample, item)
                        assert math.isfinite(result.reward)
                        assert "internal_error" not in error_codes(result), result.metadata


def test_references_are_rendered_on_the_item_per_leaf() -> None:
    item = {"answer": "sitting", "n": 3}
    assert references(parse_grader(multi("exact")), item) == {"g.exact": "sitting", "g.fuzzy": "sitting"}
    numeric = check(type="numeric", input=OUT, reference="{{item.n}} items")
    assert references(parse_grader(numeric), item) == {"g": "3 items"}
    # No reference kind, one reading the sample, one whose item field is missing: nothing to show.
    assert references(parse_grader(check(type="length", max=3)), item) == {}
    echo = check(type="string_check", input=OUT, reference="{{sample.output_text}}", operation="eq")
    assert references(parse_grader(echo), item) == {}
    missing = check(type="string_check", input=OUT, reference="{{item.gone}}", operation="eq")
    assert references(parse_grader(missing), item) == {}
