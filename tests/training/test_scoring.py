"""The evaluate child's model-backed parts on the tiny model: greedy sampling, the log-ratio to the base, a
reward model scoring as its sequence classifier does, and a judge whose answer becomes the score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from contract.graders import parse_grader
from contract.grading import grade
from tests.training._child import run_child, write_spec
from tests.training.adapters import random_adapter
from workers.training import data, lora, rollout
from workers.training.evaluate import _answer_logprobs
from workers.training.scoring import ChildScorer, SharedModels, load_shared_models, reward_of, rewards_of

CPU = torch.device("cpu")
JUDGE_TURNS = [
    {"role": "developer", "content": "Rate the answer from 0 to 9. Reply with the number only."},
    {"role": "user", "content": "Answer: {{sample.output_text}}"},
]


def _greedy_by_hand(model: torch.nn.Module, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def test_greedy_sampling_is_the_argmax_and_draws_no_randomness(tiny_model_dir: Path) -> None:
    models = load_shared_models(str(tiny_model_dir), adapters={}, reward_models={}, device=CPU)
    prompts = [
        rollout.encode_prompt(models.tokenizer, [{"role": "user", "content": q}])
        for q in ("Hi?", "Name a colour.")
    ]
    ids, mask = rollout.left_pad(prompts, models.pad_token_id)
    answers = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        raw = rollout.sample_responses(
            models.step,
            ids,
            mask,
            max_new_tokens=6,
            temperature=0.0,
            top_p=1.0,
            eos_token_id=models.eos_token_id,
            pad_token_id=models.pad_token_id,
            generator=generator,
        )
        answers.append(raw)
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state())
    assert torch.equal(answers[0], answers[1])
    for row, prompt in enumerate(prompts):
        expected = _greedy_by_hand(models.model, prompt, 6, models.eos_token_id)
        assert answers[0][row, : len(expected)].tolist() == expected


def test_answer_logprobs_match_the_full_forward(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    models = load_shared_models(
        str(tiny_model_dir), adapters={"art_a": str(adapter)}, reward_models={}, device=CPU
    )
    prompt = rollout.encode_prompt(models.tokenizer, [{"role": "user", "content": "What colour is the sky?"}])
    ids, mask = rollout.left_pad([prompt, prompt[-4:]], models.pad_token_id)
    tokens = torch.tensor([[40, 41, models.eos_token_id], [42, models.eos_token_id, models.pad_token_id]])
    answer_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad(), models.active("art_a"):
        ours = _answer_logprobs(models, ids, mask, tokens, answer_mask)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)
    ).eval()
    for row, prompt_ids in enumerate([prompt, prompt[-4:]]):
        answer = [t for t, m in zip(tokens[row].tolist(), answer_mask[row].tolist(), strict=True) if m]
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt_ids + answer])).logits[0]
        logp = logits.log_softmax(-1)
        expected = sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer))
        assert float(ours[row]) == pytest.approx(expected, abs=1e-4)
    with torch.no_grad(), models.active(None):
        base = _answer_logprobs(models, ids, mask, tokens, answer_mask)
    assert not torch.allclose(base, ours)  # the adapter changes the scores; disabled, it is the base


def test_a_reward_model_grader_scores_as_its_sequence_classifier(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = random_adapter(tiny_model_dir, tmp_path / "rm", seed=2, reward=True)
    models = load_shared_models(
        str(tiny_model_dir), adapters={}, reward_models={"art_rm": str(folder)}, device=CPU
    )
    scorer = ChildScorer(models, base_model_id="model_tiny", seed=0)
    grader = parse_grader({"type": "reward_model", "name": "rm", "artifact": "art_rm"})
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reference = PeftModel.from_pretrained(classifier, str(folder)).eval()
    scores = []
    for prompt, answer in (("What colour is the sky?", "Blue."), ("What colour is the sky?", "Green, sir.")):
        result = grade(grader, answer, {"prompt": prompt}, model_scorer=scorer)
        assert not result.metadata["errors"], result.metadata
        ids, _, _ = data.encode_sft_record(models.tokenizer, [{"role": "user", "content": prompt}], answer)
        with torch.no_grad():
            expected = lora.score_last_token(
                reference, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
            )
        assert result.reward == pytest.approx(float(expected[0]), abs=1e-4)
        scores.append(result.reward)
    assert scores[0] != scores[1]
    # A messages prompt scores the same conversation.
    messages = [{"role": "user", "content": "What colour is the sky?"}]
    as_messages = grade(
        grader.model_copy(update={"prompt": "{{item.messages}}"}),
        "Blue.",
        {"messages": messages},
        model_scorer=scorer,
    )
    assert as_messages.reward == pytest.approx(scores[0])
    # the score job's batched path (right-padded rows of different lengths) gives the same rewards
    examples = [
        ("What colour is the sky?", "Blue."),
        ("What colour is the sky?", "Green, sir, a lot longer."),
    ]
    batched = rewards_of(models, "art_rm", examples, batch_size=2)
    assert batched == pytest.approx(
        [reward_of(models, "art_rm", prompt=p, response=r) for p, r in examples], abs=1e-4
    )


@pytest.fixture(scope="module")
def judge_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter taught to answer "7" to the judge's prompt, whatever the answer it is shown."""
    work = tmp_path_factory.mktemp("judge")
    rows = [
        {
            "messages": [
                {"role": "system", "content": JUDGE_TURNS[0]["content"]},
                {"role": "user", "content": f"Answer: The {thing} is {colour}."},
                {"role": "assistant", "content": "7"},
            ]
        }
        for thing in ("sky", "grass", "snow", "coal")
        for colour in ("red", "blue", "green", "white")
    ]
    dataset = work / "judge.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = write_spec(
        work,
        model_dir=tiny_model_dir,
        dataset=dataset,
        hyperparameters={
            "epochs": 10,
            "max_steps": 20,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_length": 64,
        },
        lora={"r": 8, "alpha": 16},
    )
    run = run_child(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    return next((work / "out").rglob("adapter_config.json")).parent


def test_a_judge_answers_its_score(tiny_model_dir: Path, judge_adapter: Path) -> None:
    models: SharedModels = load_shared_models(
        str(tiny_model_dir), adapters={"art_judge": str(judge_adapter)}, reward_models={}, device=CPU
    )
    scorer = ChildScorer(models, base_model_id="model_tiny", seed=0)
    judge = parse_grader(
        {"type": "score_model", "name": "judge", "model": "art_judge", "input": JUDGE_TURNS, "range": [0, 9]}
    )
    result = grade(judge, "The plum is purple.", {}, model_scorer=scorer)
    assert result.metadata["errors"] == [] and result.reward == 7.0, result.metadata
    # The base (the job's base model, adapters disabled) never learned to answer a number: a recorded error.
    base_judge = judge.model_copy(update={"model": "model_tiny"})
    failed = grade(base_judge, "The plum is purple.", {}, model_scorer=scorer)
    assert failed.reward == 0.0
    assert failed.metadata["errors"][0]["code"] in ("model_scorer_failed", "score_out_of_range"), (
        failed.metadata
    )


def test_logprob_verdicts_cancel_a_position_lean_and_swap_with_the_responses(tiny_model_dir: Path) -> None:
    from contract.hyperparameters import JudgeHyperparameters
    from workers.training.feedback_jobs import _judge_messages, _verdict_by_logprobs
    from workers.training.scoring import answer_log_odds

    models = load_shared_models(str(tiny_model_dir), adapters={}, reward_models={}, device=CPU)
    hp = JudgeHyperparameters(name="t", rubric="Prefer the longer answer.", verdict="logprobs")
    prompt, short, long = "Say something.", "Sky.", "The sky is blue and wide today."

    # the log-odds are those of the full forward's next-token distribution, "1" against "2"
    messages = _judge_messages(hp, prompt, short, long)
    ids = torch.tensor([rollout.encode_prompt(models.tokenizer, messages)])
    with torch.no_grad():
        logprobs = torch.log_softmax(models.model(input_ids=ids).logits[0, -1].float(), dim=-1)

    def choice(text: str) -> torch.Tensor:
        tokens = {
            models.tokenizer.encode(v, add_special_tokens=False)[0]
            for v in (text, " " + text)
            if len(models.tokenizer.encode(v, add_special_tokens=False)) == 1
        }
        return torch.logsumexp(logprobs[sorted(tokens)], dim=0)

    forward = answer_log_odds(models, messages, judge=None)
    assert forward == pytest.approx(float(choice("1") - choice("2")), abs=1e-5)

    # one pair, asked both ways round: opposite verdicts; each order's lean is counted once
    counts: dict[str, float] = dict.fromkeys(
        ("consistent", "inconsistent", "first_position", "answered", "position_bias"), 0.0
    )
    one = _verdict_by_logprobs(models, hp, None, (prompt, short, long), counts)
    other = _verdict_by_logprobs(models, hp, None, (prompt, long, short), counts)
    assert {one, other} == {"a", "b"}
    backward = answer_log_odds(models, _judge_messages(hp, prompt, long, short), judge=None)
    assert counts["position_bias"] == pytest.approx(forward + backward, abs=1e-5)  # (f+b)/2, twice
    assert (counts["answered"], counts["consistent"] + counts["inconsistent"]) == (4, 2)
    # a judge that leans to the first position by any constant is judged on what is left: the verdict is
    # the sign of forward - backward, whatever each order's own sign
    assert one == ("a" if forward - backward > 0 else "b")
