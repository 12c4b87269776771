"""Checks on an uploaded model folder (``service.core.models``), with real safetensors files."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from service.core.errors import ValidationFailed
from service.core.models import check_model_files, inspect_model_files, read_safetensors_header

Files = list[tuple[str, Path]]

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}
TENSORS: dict[str, np.ndarray] = {
    "embed.weight": np.zeros((10, 4), dtype=np.float32),
    "norm.weight": np.ones((4,), dtype=np.float16),
    "step": np.array(3, dtype=np.int64),  # a 0-d tensor: 1 element
    "mask": np.zeros((2, 3), dtype=np.bool_),
}
NUM_PARAMS = 40 + 4 + 1 + 6


def write(folder: Path, name: str, content: bytes | str | dict[str, Any]) -> tuple[str, Path]:
    path = folder / f"part-{len(list(folder.iterdir()))}"  # the server stages under neutral names too
    if isinstance(content, dict):
        content = json.dumps(content)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return name, path


def weights(folder: Path, name: str, tensors: dict[str, np.ndarray] | None = None) -> tuple[str, Path]:
    path = folder / f"part-{len(list(folder.iterdir()))}"
    save_file(tensors if tensors is not None else TENSORS, str(path))
    return name, path


@pytest.fixture
def folder(tmp_path: Path) -> Files:
    """A minimal good model folder."""
    return [
        write(tmp_path, "config.json", CONFIG),
        weights(tmp_path, "model.safetensors"),
        write(tmp_path, "tokenizer.json", {"version": "1.0"}),
        write(tmp_path, "tokenizer_config.json", {"chat_template": "{{ messages }}"}),
        write(tmp_path, "special_tokens_map.json", {}),
        write(tmp_path, "generation_config.json", {"do_sample": False}),
        write(tmp_path, "chat_template.jinja", "{{ messages }}"),
        write(tmp_path, "merges.txt", "a b\n"),
        write(tmp_path, "tokenizer.model", b"\x00\x01"),
        write(tmp_path, "README.md", "# model"),
    ]


def code_of(files: Files) -> str:
    with pytest.raises(ValidationFailed) as info:
        check_model_files(files)
    assert info.value.status == 422
    return info.value.code


def test_a_good_folder(folder: Files) -> None:
    info = check_model_files(folder)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_type == "llama"
    assert info.num_parameters == NUM_PARAMS
    assert info.size_bytes == sum(p.stat().st_size for _, p in folder)
    assert info.weight_files == ("model.safetensors",)
    assert inspect_model_files is check_model_files


def test_architecture_falls_back_to_model_type(tmp_path: Path) -> None:
    files = [write(tmp_path, "config.json", {"model_type": "gpt2"}), weights(tmp_path, "model.safetensors")]
    assert check_model_files(files).architecture == "gpt2"
    files[0] = write(tmp_path, "config.json", {"hidden_size": 3})
    assert code_of(files) == "invalid_config"


def test_header_matches_what_the_safetensors_library_reads(tmp_path: Path) -> None:
    name, path = weights(tmp_path, "model.safetensors")
    header = read_safetensors_header(name, path)
    with safe_open(str(path), framework="numpy") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    assert {k: shape for k, (_, shape) in header.items()} == expected
    assert header["norm.weight"][0] == "F16" and header["mask"][0] == "BOOL"


@pytest.mark.parametrize(
    "name",
    ["a/config.json", "../x.json", "..", ".", ".hidden", "", "x\\y.json", "bad\nname.txt", " lead.txt"],
)
def test_invalid_filename(folder: Files, tmp_path: Path, name: str) -> None:
    assert code_of([*folder, write(tmp_path, name, "x")]) == "invalid_filename"


def test_duplicate_filename(folder: Files, tmp_path: Path) -> None:
    assert code_of([*folder, write(tmp_path, "README.md", "again")]) == "invalid_filename"


@pytest.mark.parametrize(
    "name",
    ["pytorch_model.bin", "model.pt", "model.pth", "x.pkl", "model.ckpt", "pytorch_model.bin.index.json"],
)
def test_unsafe_weights(folder: Files, tmp_path: Path, name: str) -> None:
    assert code_of([*folder, write(tmp_path, name, b"\x80\x04")]) == "unsafe_weights"


@pytest.mark.parametrize("name", ["modeling_llama.py", "kernel.so", "KERNEL.SO", "run.sh"])
def test_unsafe_file(folder: Files, tmp_path: Path, name: str) -> None:
    assert code_of([*folder, write(tmp_path, name, "import os")]) == "unsafe_file"


def test_missing_config(folder: Files) -> None:
    assert code_of([f for f in folder if f[0] != "config.json"]) == "missing_config"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_invalid_config(folder: Files, tmp_path: Path, content: str) -> None:
    files = [f for f in folder if f[0] != "config.json"] + [write(tmp_path, "config.json", content)]
    assert code_of(files) == "invalid_config"


@pytest.mark.parametrize("which", ["config.json", "tokenizer_config.json"])
def test_remote_code_not_allowed(folder: Files, tmp_path: Path, which: str) -> None:
    base = CONFIG if which == "config.json" else {}
    replaced = write(tmp_path, which, {**base, "auto_map": {"AutoModel": "modeling.X"}})
    files = [f for f in folder if f[0] != which] + [replaced]
    assert code_of(files) == "remote_code_not_allowed"


def test_missing_weights(folder: Files) -> None:
    assert code_of([f for f in folder if f[0] != "model.safetensors"]) == "missing_weights"


# --- hand-corrupted safetensors files ----------------------------------------------------------------------------


def _header_and_data(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _assemble(header: dict[str, Any], data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _edit_tensor(key: str, field: str, value: Any) -> Callable[[bytes, Path], bytes]:
    def edit(raw: bytes, path: Path) -> bytes:
        header, data = _header_and_data(path)
        header[key][field] = value
        return _assemble(header, data)

    return edit


CORRUPTIONS: dict[str, Callable[[bytes, Path], bytes]] = {
    "empty file": lambda raw, _: b"",
    "shorter than the length prefix": lambda raw, _: raw[:5],
    "header length past the end": lambda raw, _: struct.pack("<Q", len(raw)) + raw[8:],
    "huge header length": lambda raw, _: struct.pack("<Q", 2**63) + raw[8:],
    "header not json": lambda raw, _: struct.pack("<Q", 4) + b"{abc" + raw[8:],
    "header not an object": lambda raw, _: struct.pack("<Q", 2) + b"[]",
    "truncated data": lambda raw, _: raw[:-3],
    "trailing bytes": lambda raw, _: raw + b"\x00" * 8,
    "unknown dtype": _edit_tensor("embed.weight", "dtype", "F128"),
    "shape does not match the bytes": _edit_tensor("embed.weight", "shape", [10, 5]),
    "negative dimension": _edit_tensor("embed.weight", "shape", [-10, -4]),
    "offsets reversed": _edit_tensor("norm.weight", "data_offsets", [8, 0]),
    "offsets overlap": _edit_tensor("norm.weight", "data_offsets", [0, 8]),
    "metadata not strings": lambda raw, path: _assemble(
        {**_header_and_data(path)[0], "__metadata__": {"format": 1}}, _header_and_data(path)[1]
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_invalid_safetensors(folder: Files, corruption: str) -> None:
    path = dict(folder)["model.safetensors"]
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes(), path))
    with pytest.raises(ValidationFailed) as info:
        check_model_files(folder)
    assert info.value.code == "invalid_safetensors"
    assert "model.safetensors" in info.value.message
    # what we refuse, the library refuses too (we only check its own rules, by hand)
    with pytest.raises(Exception), safe_open(str(path), framework="numpy") as f:  # noqa: B017 - several types
        for k in f.keys():  # noqa: SIM118 - not a dict
            f.get_tensor(k)


def test_header_with_trailing_spaces_is_valid(tmp_path: Path) -> None:
    # The format allows padding the header with spaces (writers align the data to 8 bytes this way).
    _, path = weights(tmp_path, "model.safetensors")
    header, data = _header_and_data(path)
    blob = json.dumps(header).encode() + b"   "
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    assert set(read_safetensors_header("model.safetensors", path)) == set(TENSORS)


# --- sharded folders -----------------------------------------------------------------------------------------------


def sharded(tmp_path: Path) -> Files:
    a: dict[str, np.ndarray] = {
        "embed.weight": np.zeros((10, 4), dtype=np.float32),
        "shared": np.zeros((3,), dtype=np.float32),
    }
    b: dict[str, np.ndarray] = {
        "norm.weight": np.ones((4,), dtype=np.float16),
        "shared": np.zeros((3,), dtype=np.float32),
    }
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {
            "embed.weight": "model-00001-of-00002.safetensors",
            "shared": "model-00001-of-00002.safetensors",
            "norm.weight": "model-00002-of-00002.safetensors",
        },
    }
    return [
        write(tmp_path, "config.json", CONFIG),
        weights(tmp_path, "model-00001-of-00002.safetensors", a),
        weights(tmp_path, "model-00002-of-00002.safetensors", b),
        write(tmp_path, "model.safetensors.index.json", index),
    ]


def test_sharded_folder_counts_each_tensor_once(tmp_path: Path) -> None:
    info = check_model_files(sharded(tmp_path))
    assert info.num_parameters == 40 + 3 + 4  # "shared" is in both shards, counted once
    assert info.weight_files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def test_missing_shard(tmp_path: Path) -> None:
    files = [f for f in sharded(tmp_path) if f[0] != "model-00002-of-00002.safetensors"]
    with pytest.raises(ValidationFailed) as info:
        check_model_files(files)
    assert info.value.code == "missing_shard"
    assert info.value.details == [
        {"filename": "model.safetensors.index.json", "shard": "model-00002-of-00002.safetensors"}
    ]


@pytest.mark.parametrize(
    "index",
    [
        "{broken",
        {"weight_map": ["model-00001-of-00002.safetensors"]},
        {"weight_map": {"embed.weight": "model-00002-of-00002.safetensors"}},  # tensor is not in that shard
    ],
)
def test_invalid_index(tmp_path: Path, index: Any) -> None:
    files = [f for f in sharded(tmp_path) if not f[0].endswith(".index.json")]
    files.append(write(tmp_path, "model.safetensors.index.json", index))
    assert code_of(files) == "invalid_index"
