"""Candidate generation: K sampled answers per prompt, written as a ``candidates`` dataset for people to rank.

The first step of a feedback round. The policy (the base, or the base with ``init_adapter``: the previous
round's policy) samples ``num_responses`` answers to each prompt. Prompts go in batches, each prompt repeated
K times, left-padded and sampled with a KV cache in lock-step (``rollout.sample_responses``, the same sampler
PPO uses, so a round's candidates come from the distribution PPO will optimise). Answers end at the first EOS.

Identical answers (after normalising whitespace) and empty ones are dropped: two identical candidates give an
annotator nothing to choose between, and the ``candidates`` rules refuse them. A prompt left with fewer than
two distinct answers is dropped and counted. The file is checked with the ``candidates`` rules before it is
announced (the runner checks it again when it stores it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from alignd import validation
from pydantic import ValidationError

from contract.hyperparameters import GenerateHyperparameters, LoraSettings
from contract.protocol import ProgressWriter, TrainingSpec
from workers.training import lora, rollout
from workers.training.context import RunContext
from workers.training.errors import (
    INTERNAL_ERROR,
    INVALID_DATASET,
    INVALID_HYPERPARAMETERS,
    INVALID_SPEC,
    NO_TRAINABLE_EXAMPLES,
    TrainingError,
)
from workers.training.ppo import choose_pad_token_id

STAGE = "generate"
ROLE = "prompts"
KIND = "candidates"


def read_prompts(path: str | Path) -> list[tuple[Any, list[rollout.Message]]]:
    """(the prompt as written in the file, its messages) per record: the output keeps the user's form.

    Read like every dataset (the SDK's one reader) and re-checked with the upload's ``prompts`` rules.
    """
    out: list[tuple[Any, list[rollout.Message]]] = []
    try:
        for number, record in validation.iter_records(path, kind="prompts"):
            messages = rollout.parse_prompt_record(record, number)
            out.append((record.get("prompt", record.get("messages")), messages))
    except validation.DatasetLineError as exc:
        raise TrainingError(INVALID_DATASET, str(exc)) from None
    except OSError as exc:
        raise TrainingError(INVALID_DATASET, f"cannot read {path}: {exc}") from None
    if not out:
        raise TrainingError(INVALID_DATASET, f"{path} holds no prompts")
    return out


def distinct_answers(texts: list[str]) -> list[str]:
    """Non-empty answers, first occurrence of each (whitespace-normalised) text, in sampling order."""
    seen: set[str] = set()
    out = []
    for text in texts:
        key = " ".join(text.split())
        if key and key not in seen:
            seen.add(key)
            out.append(text.strip())
    return out


def _sample(
    step: rollout.StepFn,
    rows: list[list[int]],
    hp: GenerateHyperparameters,
    eos: int,
    pad: int,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample an answer per row (left-padded prompts): (tokens, response mask, has EOS), cut after the EOS."""
    ids, mask = rollout.left_pad(rows, pad)
    raw = rollout.sample_responses(
        step,
        ids.to(device),
        mask.to(device),
        max_new_tokens=hp.max_new_tokens,
        temperature=hp.temperature,
        top_p=hp.top_p,
        eos_token_id=eos,
        pad_token_id=pad,
        generator=generator,
    )
    return rollout.truncate_after_eos(raw, eos, pad)


def _decode(tokenizer: Any, tokens: torch.Tensor, lengths: list[Any], rows: range) -> list[str]:
    """The answers of ``rows`` as text, each cut at its length, without NUL characters.

    A byte-level vocabulary has a token for the byte 0, and a model may sample it (the tiny test model did
    once sampling drew other random numbers); the candidates file must pass the dataset rules, which refuse
    NUL (PostgreSQL's text refuses it), so it is dropped from the text as it would be from a person's."""
    return [
        str(tokenizer.decode(tokens[r, : int(lengths[r])].tolist(), skip_special_tokens=True)).replace(
            "\x00", ""
        )
        for r in rows
    ]


def load_sampler(
    spec: TrainingSpec, lora_settings: LoraSettings, progress: ProgressWriter, *, stage: str
) -> tuple[rollout.StepFn, torch.device]:
    """The policy a sampling job answers with, the base or the base with ``init_adapter``, loaded on the
    worker's device as a KV-cached step for ``rollout.sample_responses``; and that device."""
    device = lora.pick_device()
    model: torch.nn.Module = lora.load_base_model(
        spec.base_model.path, device=device, precision=spec.resources.precision
    )
    if spec.init_adapter is not None:
        model = lora.attach_adapter(model, lora_settings, init_adapter=spec.init_adapter.path)  # type: ignore[arg-type]
        progress.event(f"sampling from the base with adapter {spec.init_adapter.id}", stage=stage)
    model.eval()

    def step(
        ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1], out.past_key_values

    return step, device


def run(ctx: RunContext) -> None:
    spec, progress, cancel = ctx.spec, ctx.progress, ctx.cancel
    try:
        hp = GenerateHyperparameters.model_validate(spec.hyperparameters)
        lora_settings = LoraSettings.model_validate(spec.lora)
    except ValidationError as exc:
        raise TrainingError(INVALID_HYPERPARAMETERS, f"invalid generate settings: {exc}") from None
    dataset_ref = spec.datasets.get(ROLE)
    if dataset_ref is None:
        raise TrainingError(INVALID_SPEC, f"method generate needs a dataset with role '{ROLE}'")

    prompts = read_prompts(dataset_ref.path)
    if hp.max_prompts is not None:
        prompts = prompts[: hp.max_prompts]
    tokenizer = lora.load_tokenizer(spec.base_model.path)
    encoded, truncated = rollout.encode_prompts(tokenizer, [m for _, m in prompts], max_length=hp.max_length)
    if tokenizer.eos_token_id is None:
        raise TrainingError(INVALID_SPEC, "the tokenizer has no EOS token; answers could never end")
    eos = int(tokenizer.eos_token_id)
    pad = choose_pad_token_id(tokenizer, eos)
    k = hp.num_responses
    progress.event(
        f"dataset {dataset_ref.name}: {len(prompts)} prompts x {k} answers, up to {hp.max_new_tokens} new tokens"
        + (f"; {truncated} prompts cut from the left to {hp.max_length} tokens" if truncated else ""),
        stage=STAGE,
    )

    step, device = load_sampler(spec, lora_settings, progress, stage=STAGE)
    generator = torch.Generator(device=device).manual_seed(hp.seed if hp.seed is not None else spec.seed)

    out_dir = Path(spec.output_dir) / KIND
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{KIND}.jsonl"
    written = dropped_prompts = duplicates = 0
    total_tokens = ended = 0
    started = time.perf_counter()
    batches = [
        list(range(i, min(i + hp.batch_size, len(prompts)))) for i in range(0, len(prompts), hp.batch_size)
    ]
    with open(out_path, "w", encoding="utf-8") as out:
        for number, chunk in enumerate(batches, start=1):
            batch_started = time.perf_counter()
            with cancel.deferred():  # SIGTERM waits for the batch: a half-sampled batch is worth nothing
                rows = [encoded[i] for i in chunk for _ in range(k)]
                tokens, response_mask, has_eos = _sample(step, rows, hp, eos, pad, device, generator)
            seconds = time.perf_counter() - batch_started
            lengths = response_mask.sum(dim=1).tolist()
            batch_tokens = int(sum(lengths))
            total_tokens += batch_tokens
            ended += int(has_eos.sum())
            for j, prompt_index in enumerate(chunk):
                answers = distinct_answers(_decode(tokenizer, tokens, lengths, range(j * k, (j + 1) * k)))
                duplicates += k - len(answers)
                if len(answers) < validation.MIN_RESPONSES:
                    dropped_prompts += 1
                    continue
                record = {"prompt": prompts[prompt_index][0], "responses": answers}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            progress.metric(
                stage=STAGE,
                step=number,
                values={
                    "tokens_per_second": batch_tokens / max(seconds, 1e-9),
                    "responses_per_second": len(rows) / max(seconds, 1e-9),
                    "mean_response_tokens": batch_tokens / len(rows),
                    "eos_rate": float(has_eos.float().mean()),
                },
            )
            progress.progress(number / len(batches), stage=STAGE)
    elapsed = time.perf_counter() - started
    samples = len(prompts) * k
    progress.metric(
        stage=STAGE,
        step=len(batches),
        values={
            "candidates_written": written,
            "prompts_dropped": dropped_prompts,
            "duplicate_or_empty_answers": duplicates,
            "overall_tokens_per_second": total_tokens / max(elapsed, 1e-9),
        },
    )
    if dropped_prompts:
        progress.event(
            f"{dropped_prompts} of {len(prompts)} prompts dropped: fewer than 2 distinct non-empty answers "
            "(raise temperature or max_new_tokens for more varied answers)",
            stage=STAGE,
            level="warning",
        )
    if not written:
        raise TrainingError(NO_TRAINABLE_EXAMPLES, "no prompt got 2 distinct non-empty answers")
    report = validation.validate_path(out_path, KIND)
    if not report.ok:  # a bug here, not bad input: the file was written from checked parts
        raise TrainingError(INTERNAL_ERROR, f"generated candidates break the rules: {report.issues[:3]}")
    progress.event(
        f"{written} prompts with {samples - duplicates} answers ({ended} of {samples} ended with EOS, "
        f"{total_tokens} tokens in {elapsed:.1f} s, {total_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
        stage=STAGE,
    )
    progress.dataset(
        str(out_path),
        stage=STAGE,
        kind=KIND,
        name=f"{dataset_ref.name} candidates ({spec.job_id})",
        metadata={"prompts": written, "num_responses": k, "source": dataset_ref.id},
    )
