"""The README.md model card written into every adapter folder (and offered alone as a ``model_card``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetCardEntry:
    role: str
    name: str
    id: str
    sha256: str
    num_records: int
    num_examples: int | None = None  # after tokenisation (dropped examples excluded)


def _json_block(value: Any) -> str:
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True, default=str) + "\n```"


def _format_metric(value: float) -> str:
    return f"{value:.6g}"


def render_model_card(
    *,
    title: str,
    method: str,
    job_id: str,
    base_model_name: str,
    base_model_id: str,
    datasets: list[DatasetCardEntry],
    lora: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    seed: int,
    metrics: Mapping[str, float],
    loader: str = "AutoModelForCausalLM",
    loader_args: str = "",
    notes: str = "",
) -> str:
    dataset_rows = "\n".join(
        f"| {d.role} | {d.name} | `{d.id}` | `{d.sha256}` | {d.num_records} | "
        f"{'' if d.num_examples is None else d.num_examples} |"
        for d in datasets
    )
    metric_rows = "\n".join(f"| {name} | {_format_metric(value)} |" for name, value in metrics.items())
    front_matter = "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {json.dumps(base_model_name)}",
            f"tags: [alignd, lora, {method}]",
            "---",
        ]
    )
    return f"""{front_matter}

# {title}

A LoRA adapter trained by alignd (job `{job_id}`, method `{method}`, seed {seed}).

## Base model

{base_model_name} (alignd model `{base_model_id}`). The adapter holds only the LoRA weights; load it on top of
this base model.

## Training data

| role | name | id | sha256 | records | examples used |
|---|---|---|---|---|---|
{dataset_rows}

## LoRA settings

{_json_block(dict(lora))}

## Hyperparameters (resolved)

{_json_block(dict(hyperparameters))}

## Final metrics

| metric | value |
|---|---|
{metric_rows}

## How to load

```python
from peft import PeftModel
from transformers import {loader}, AutoTokenizer

base = {loader}.from_pretrained("path/to/{base_model_name}"{loader_args})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

`model.merge_and_unload()` folds the adapter into the base weights if you want a plain transformers model.
{notes}"""
