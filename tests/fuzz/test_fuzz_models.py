"""Fuzzing the model-folder checks: safetensors headers and the config/tokenizer/index files.

Properties: the checks either accept or raise ValidationFailed with one of their documented codes and a
message the server can encode as UTF-8, never anything else; and a safetensors file the header check accepts
opens in the ``safetensors`` library with the same tensor names, dtypes and shapes (the module's claim).
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

from service.core.errors import ValidationFailed
from service.core.models import DTYPE_BITS, check_model_files, read_safetensors_header
from tests.fuzz import mutate
from tests.fuzz.budget import FUZZ_SETTINGS, VARIANTS, scratch_dir, target

HEADER_CODES = {"invalid_safetensors", "json_too_deep", "json_too_large"}
FOLDER_CODES = HEADER_CODES | {
    "invalid_filename",
    "unsafe_weights",
    "unsafe_file",
    "remote_code_not_allowed",
    "missing_config",
    "invalid_config",
    "missing_weights",
    "missing_shard",
    "invalid_index",
    "invalid_json",
}
WORK = Path(scratch_dir("alignd-fuzz-models-"))
seeds = st.integers(0, 2**32 - 1)


def check_refusal(exc: ValidationFailed, codes: set[str]) -> None:
    assert exc.code in codes, (exc.code, exc.message)
    json.dumps(exc.to_body(), ensure_ascii=False).encode("utf-8")  # the server's 422 body


# --- safetensors headers


def valid_header(rng: random.Random) -> tuple[dict[str, Any], int]:
    """A consistent header (dtypes, shapes, contiguous offsets in a shuffled order) and its data size."""
    header: dict[str, Any] = {}
    names = [f"layer.{i}.weight" for i in range(rng.randint(0, 5))]
    offset = 0
    for name in names:
        dtype = rng.choice(sorted(DTYPE_BITS))
        bits = DTYPE_BITS[dtype]
        shape = [rng.choice([0, 1, 2, 3, 8]) for _ in range(rng.randint(0, 3))]
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * bits % 8:
            shape, numel = [*shape, 8], numel * 8
        size = numel * bits // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if rng.random() < 0.3:
        header["__metadata__"] = {"format": "pt"}
    items = list(header.items())
    rng.shuffle(items)
    return dict(items), offset


def safetensors_bytes(header_json: bytes, data_size: int, length: int | None = None) -> bytes:
    prefix = struct.pack("<Q", len(header_json) if length is None else length)
    return prefix + header_json + b"\0" * data_size


def header_variant(rng: random.Random, header: dict[str, Any], data_size: int) -> bytes:
    encoded = json.dumps(header).encode()
    choice = rng.randrange(5)
    if choice == 0:  # bytes of the header edited, the length prefix kept right
        return safetensors_bytes(mutate.mutate(rng, encoded), data_size)
    if choice == 1:  # a value edited somewhere inside the header
        return safetensors_bytes(mutate.encode(rng, mutate.mutate_value(rng, header)), data_size)
    if choice == 2:  # the length prefix wrong
        wrong = rng.choice([0, 1, len(encoded) - 1, len(encoded) + 1, 2**63, rng.randrange(2**64)])
        return safetensors_bytes(encoded, data_size, length=wrong)
    if choice == 3:  # data area too short or too long, or the whole file cut
        whole = safetensors_bytes(encoded, max(0, data_size + rng.choice([-3, -1, 1, 7])))
        return whole[: rng.randint(0, len(whole))] if rng.random() < 0.3 else whole
    return mutate.mutate(rng, safetensors_bytes(encoded, data_size))  # anything, prefix included


def check_header_file(path: Path) -> None:
    try:
        tensors = read_safetensors_header("model.safetensors", path)
    except ValidationFailed as exc:
        check_refusal(exc, HEADER_CODES)
        return
    with safe_open(str(path), framework="numpy") as opened:
        loaded = {
            name: (opened.get_slice(name).get_dtype(), tuple(opened.get_slice(name).get_shape()))
            for name in opened.keys()  # noqa: SIM118 (safe_open objects are not iterable)
        }
    assert loaded == tensors, (path.read_bytes()[:400], loaded, tensors)


@FUZZ_SETTINGS
@given(seed=seeds)
def test_safetensors_headers(seed: int) -> None:
    rng = random.Random(seed)
    header, data_size = valid_header(rng)
    path = WORK / "model.safetensors"
    figures = target("model checks: safetensors headers")
    with figures.input():
        path.write_bytes(safetensors_bytes(json.dumps(header).encode(), data_size))
        assert set(read_safetensors_header("model.safetensors", path)) == set(header) - {"__metadata__"}
    for _ in range(VARIANTS - 1):
        with figures.input():
            path.write_bytes(header_variant(rng, header, data_size))
            check_header_file(path)


# --- the whole folder: config.json, tokenizer_config.json, an index, file names

WEIGHTS = WORK / "weights"
WEIGHTS.write_bytes(
    safetensors_bytes(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), 8)
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8,
    "rope_scaling": None,
}
INDEX = {"metadata": {"total_size": 8}, "weight_map": {"w": "model.safetensors"}}


def _parsed(content: bytes | None) -> Any:
    try:
        return json.loads(content or b"{}")
    except ValueError:  # already edited into something else
        return {}


def folder_variant(rng: random.Random) -> dict[str, bytes | None]:
    """File name -> content (None: the good weights file). One or two files edited in one of many ways."""
    files: dict[str, bytes | None] = {
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "model.safetensors": None,
        "model.safetensors.index.json": json.dumps(INDEX).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
    }
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(sorted(files))
        choice = rng.randrange(5)
        if choice == 0 and files[name] is not None:
            files[name] = mutate.mutate(rng, files[name] or b"")
        elif choice == 1 and name.endswith(".json"):
            files[name] = mutate.encode(rng, mutate.mutate_value(rng, _parsed(files[name])))
        elif choice == 2:
            files[name] = mutate.encode(rng, mutate.random_json(rng))
        elif choice == 3:
            del files[name]
        else:  # a file under another name: random, hidden, a path, a pickle, code
            other = rng.choice(
                [mutate.random_string(rng), ".hidden", "../x", "a/b", "x.bin", "run.py", "x.SAFETENSORS"]
            )
            files[other] = files.pop(name)
    return files


def check_folder(files: dict[str, bytes | None]) -> None:
    staged = []
    for index, (name, content) in enumerate(files.items()):
        if content is None:
            staged.append((name, WEIGHTS))
            continue
        path = WORK / f"part-{index}"
        path.write_bytes(content)
        staged.append((name, path))
    try:
        info = check_model_files(staged)
    except ValidationFailed as exc:
        check_refusal(exc, FOLDER_CODES)
        return
    assert isinstance(info.architecture, str) and info.architecture
    assert info.num_parameters >= 0 and info.size_bytes >= 0
    json.dumps(list(info.files), ensure_ascii=False).encode("utf-8")  # they end up in the response


@FUZZ_SETTINGS
@given(seed=seeds)
def test_model_folders(seed: int) -> None:
    rng = random.Random(seed)
    figures = target("model checks: config, tokenizer, index, names")
    for _ in range(VARIANTS):
        with figures.input():
            check_folder(folder_variant(rng))
