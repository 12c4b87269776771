"""Tokenisation, masking, collation, bucketing and the lr schedule, in process (no subprocess, no training)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from alignd.validation import validate_path
from transformers import AutoTokenizer

from tests.helpers.tiny_model import build_tiny_llama
from workers.training import data
from workers.training.errors import TrainingError
from workers.training.loop import lr_lambda

SKY = ([{"role": "user", "content": "What colour is the sky?"}], "The sky is blue.")


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    folder = build_tiny_llama(tmp_path_factory.mktemp("plain") / "model", chat_template=False)
    return AutoTokenizer.from_pretrained(folder)


def _trained_text(tokenizer: object, example: data.SFTExample) -> str:
    ids = [
        t for t, label in zip(example.input_ids, example.labels, strict=True) if label != data.IGNORE_INDEX
    ]
    return tokenizer.decode(ids)  # type: ignore[attr-defined]


def test_chat_template_masks_exactly_the_prompt(chat_tokenizer: object) -> None:
    [example], stats = data.tokenize_sft(chat_tokenizer, [SKY], max_length=128)  # type: ignore[arg-type]
    assert stats.prefix_fallback == 0
    assert _trained_text(chat_tokenizer, example) == "The sky is blue.</s>\n"
    prompt_text = chat_tokenizer.apply_chat_template(SKY[0], add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    assert chat_tokenizer.decode(example.input_ids[: example.labels.count(data.IGNORE_INDEX)]) == prompt_text  # type: ignore[attr-defined]
    assert example.input_ids.count(chat_tokenizer.bos_token_id) == 2  # type: ignore[attr-defined]  # one per turn, none doubled


def test_completion_only_loss_off_trains_everything(chat_tokenizer: object) -> None:
    [example], _ = data.tokenize_sft(chat_tokenizer, [SKY], max_length=128, completion_only_loss=False)  # type: ignore[arg-type]
    assert example.labels == example.input_ids
    assert example.num_trainable == example.length - 1


def test_plain_tokenizer_uses_prompt_completion_eos(plain_tokenizer: object) -> None:
    [example], _ = data.tokenize_sft(plain_tokenizer, [SKY], max_length=128)  # type: ignore[arg-type]
    assert example.input_ids[0] == plain_tokenizer.bos_token_id  # type: ignore[attr-defined]
    assert example.input_ids[-1] == plain_tokenizer.eos_token_id  # type: ignore[attr-defined]
    assert _trained_text(plain_tokenizer, example) == "The sky is blue.</s>"


def test_prefix_fallback_never_masks_the_completion(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A template whose generation prompt differs from the rendered assistant turn ("assistant:" vs "assistant").
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:\n{% endif %}"
    )
    [example], stats = data.tokenize_sft(tokenizer, [SKY], max_length=128)
    assert stats.prefix_fallback == 1
    trained = _trained_text(tokenizer, example)
    assert trained.endswith("The sky is blue.</s>\n") and len(trained) > len("The sky is blue.</s>\n")


def test_truncation_drops_examples_with_nothing_left(chat_tokenizer: object) -> None:
    long_prompt = ([{"role": "user", "content": "word " * 40}], "yes")
    examples, stats = data.tokenize_sft(chat_tokenizer, [SKY, long_prompt], max_length=24)  # type: ignore[arg-type]
    assert (stats.records, stats.examples, stats.dropped_no_trainable, stats.truncated) == (2, 1, 1, 1)
    assert all(e.length <= 24 for e in examples)


def test_messages_record_trains_on_last_assistant_turn(chat_tokenizer: object, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky?"}, '
        '{"role": "assistant", "content": "Blue."}]}\n'
    )
    [example], _ = data.tokenize_sft(chat_tokenizer, data.read_sft_records(path), max_length=128)  # type: ignore[arg-type]
    assert _trained_text(chat_tokenizer, example) == "Blue.</s>\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("not json", "invalid JSON"),
        ('{"prompt": "a"}', '"completion": missing'),
        ('{"prompt": "a", "completion": 3}', "expected a string, got number"),
        ('{"prompt": "a", "completion": "  "}', "empty"),
        ('{"messages": [{"role": "user", "content": "a"}]}', 'last message must be a "assistant" message'),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "at least one message before"),
    ],
)
def test_bad_records_name_their_line(tmp_path: Path, line: str, expected: str) -> None:
    """The child re-checks with the upload's rules: the same line gets the upload's message."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n\n' + line + "\n")
    with pytest.raises(TrainingError) as info:
        data.read_sft_records(path)
    assert info.value.code == "invalid_dataset"
    assert info.value.message.startswith("line 3:") and expected in info.value.message
    [issue] = validate_path(path, "sft").issues
    assert info.value.message == f"line 3: {issue['message']}"


def test_a_bom_crlf_file_reads_as_the_upload_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "Sky?", "completion": "Blue."}\r\n\r\n{"prompt": "a", "completion": "b"}\r\n'
    )
    assert validate_path(path, "sft").ok
    assert data.read_sft_records(path) == [
        ([{"role": "user", "content": "Sky?"}], "Blue."),
        ([{"role": "user", "content": "a"}], "b"),
    ]


def test_collator_pads_right_and_masks() -> None:
    examples = [data.SFTExample([5, 6, 7], [-100, 6, 7]), data.SFTExample([8], [8])]
    batch = data.SFTCollator(0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_length_bucketing_covers_everything_with_less_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    batches = data.length_bucketed_batches(lengths, 8, rng=random.Random(1))
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert all(len(batch) == 8 for batch in batches)

    def padding(groups: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)

    order = list(range(1000))
    random.Random(1).shuffle(order)
    unsorted = [order[i : i + 8] for i in range(0, 1000, 8)]
    assert padding(batches) < 0.2 * padding(unsorted)
    # Not a global sort: batch order is shuffled, so lengths do not rise through the epoch.
    firsts = [max(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts)
    # Different epochs (seeds) give different batches.
    assert data.length_bucketed_batches(lengths, 8, rng=random.Random(2)) != batches


def test_micro_batches_split_a_step() -> None:
    assert data.split_micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert data.split_micro_batches([1, 2], 4) == [[1], [2]]


def test_lr_schedules() -> None:
    linear = lr_lambda("linear", warmup_steps=2, total_steps=10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 9)] == [0.333, 0.667, 1.0, 0.5, 0.125]
    cosine = lr_lambda("cosine", warmup_steps=0, total_steps=10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and 0 < cosine(9) < 0.03
    constant = lr_lambda("constant", warmup_steps=1, total_steps=10)
    assert constant(0) == 0.5 and constant(9) == 1.0
