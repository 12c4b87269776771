"""JSON structure caps on uploaded model files: size, depth and value count, checked by a streaming pre-scan
(``alignd._jsonscan``) before anything is parsed, with real files, a real subprocess and a real server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from alignd._jsonscan import JsonScanner, JsonStructureError, scan_json, scan_json_stream
from safetensors.numpy import save_file

from service.core.errors import ValidationFailed
from service.core.models import (
    HEADER_CAPS,
    MAX_JSON_DEPTH,
    METADATA_CAPS,
    VOCAB_CAPS,
    check_model_files,
    read_safetensors_header,
)
from tests.conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def model_folder(tmp_path: Path, replace: dict[str, bytes] | None = None) -> list[tuple[str, Path]]:
    """A good folder (config, weights, tokenizer files), with the files in ``replace`` replaced or added."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    contents: dict[str, bytes] = {
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"vocab": {"a": 0, "[": 1}}}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        **(replace or {}),
    }
    files = []
    for index, (name, data) in enumerate(contents.items()):
        path = tmp_path / f"part-{index}"
        path.write_bytes(data)
        files.append((name, path))
    weights = tmp_path / "weights"
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(weights))
    return [*files, ("model.safetensors", weights)]


def refusal(files: list[tuple[str, Path]]) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        check_model_files(files)
    return info.value


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- the scanner


@pytest.mark.parametrize(
    ("text", "depth", "nodes"),
    [
        (b'{"a": 1}', 1, 1),
        (b'[1, 2, [3, {"b": []}]]', 4, 7),
        (b'{"s": "[[[{{{,,,"}', 1, 1),  # brackets and commas inside strings are text
        (b'["\\"]]]", "\\\\", ","]', 1, 3),  # escaped quotes and backslashes
        (b'"just a string"', 0, 0),
    ],
)
def test_scan_counts_structure_outside_strings(text: bytes, depth: int, nodes: int) -> None:
    shape = scan_json(text, max_depth=100, max_nodes=100)
    assert (shape.depth, shape.nodes) == (depth, nodes)


def test_scan_reads_strings_and_escapes_across_chunk_boundaries() -> None:
    text = json.dumps({"k": ['a\\"[', "\\", '"', "]]]", {"x": ['\\\\"']}]}).encode()
    expected = scan_json(text, max_depth=100, max_nodes=100)
    assert (expected.depth, expected.nodes) == (4, 8)
    for size in range(1, len(text) + 1):
        shape = scan_json_stream(io.BytesIO(text), max_depth=100, max_nodes=100, chunk_size=size)
        assert shape == expected, size


def test_scan_caps_and_unbalanced_brackets() -> None:
    scan_json(nested(MAX_JSON_DEPTH), max_depth=MAX_JSON_DEPTH, max_nodes=1000)  # at the cap: fine
    with pytest.raises(JsonStructureError) as deep:
        scan_json(nested(MAX_JSON_DEPTH + 1), max_depth=MAX_JSON_DEPTH, max_nodes=1000)
    assert (deep.value.code, deep.value.limit) == ("json_too_deep", MAX_JSON_DEPTH)
    with pytest.raises(JsonStructureError) as large:
        scan_json(b"[" + b"0," * 1000 + b"0]", max_depth=10, max_nodes=1000)
    assert large.value.code == "json_too_large"
    with pytest.raises(JsonStructureError) as unbalanced:
        scan_json(
            b"]" + nested(MAX_JSON_DEPTH + 1)[: MAX_JSON_DEPTH + 1], max_depth=MAX_JSON_DEPTH, max_nodes=1000
        )
    assert unbalanced.value.code == "json_unbalanced"


def test_scan_stops_at_the_first_chunk_past_a_cap() -> None:
    reads = 0

    class Endless:
        def read(self, size: int) -> bytes:
            nonlocal reads
            reads += 1
            return b"{}," * (size // 3)

    with pytest.raises(JsonStructureError):
        scan_json_stream(Endless(), max_depth=10, max_nodes=1_000_000)
    assert reads <= 3  # ~350k values per MiB chunk
    scanner = JsonScanner(max_depth=10, max_nodes=10)
    scanner.feed(b'["a string that goes on')
    scanner.feed(b" and on, [[[[[[[[[[[[[ ]]]]\\")
    scanner.feed(b'" ends here"]')  # the escaped quote is text; the next one closes the string
    assert (scanner.depth, scanner.shape().depth, scanner.nodes) == (0, 1, 1)


# --- model files


def test_normal_folder_is_accepted(tmp_path: Path) -> None:
    assert check_model_files(model_folder(tmp_path)).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer_config.json", "tokenizer.json", "generation_config.json"]
)
def test_deep_json_file_is_refused(tmp_path: Path, name: str) -> None:
    deep = b'{"architectures": ["X"], "x": ' + nested(100_000) + b"}"
    error = refusal(model_folder(tmp_path, {name: deep}))
    assert error.code == "json_too_deep"
    assert error.details == [{"filename": name, "limit": MAX_JSON_DEPTH}]


def test_many_values_are_refused_by_count_and_size(tmp_path: Path) -> None:
    values = METADATA_CAPS.max_nodes + 1
    wide = b'{"architectures": ["X"], "x": [' + b"0," * values + b"0]}"
    assert refusal(model_folder(tmp_path, {"config.json": wide})).code == "json_too_large"
    # A tokenizer.json may hold more (vocabularies are big); its own, larger cap still applies.
    tokenizer = b'{"v": [' + b"0," * values + b"0]}"
    check_model_files(model_folder(tmp_path / "big-tokenizer", {"tokenizer.json": tokenizer}))
    assert VOCAB_CAPS.max_nodes > values


def test_byte_cap_is_checked_before_reading(tmp_path: Path) -> None:
    files = model_folder(tmp_path)
    config_path = dict(files)["config.json"]
    with open(config_path, "r+b") as handle:  # sparse: the cap must refuse it from its size alone
        handle.truncate(METADATA_CAPS.max_bytes + 1)
    error = refusal(files)
    assert (error.code, error.details) == (
        "json_too_large",
        [{"filename": "config.json", "limit": METADATA_CAPS.max_bytes}],
    )
    assert VOCAB_CAPS.max_bytes > METADATA_CAPS.max_bytes


def test_unparsed_json_with_stray_closing_bracket_is_invalid_json(tmp_path: Path) -> None:
    assert refusal(model_folder(tmp_path, {"tokenizer.json": b'{"a": 1}]]'})).code == "invalid_json"


def test_config_must_be_utf8(tmp_path: Path) -> None:
    # json.loads(bytes) would accept UTF-16, whose bytes the scan cannot read; transformers would not load it.
    utf16 = json.dumps(CONFIG).encode("utf-16")
    assert refusal(model_folder(tmp_path, {"config.json": utf16})).code == "invalid_config"


def test_deep_or_wide_safetensors_header_is_refused(tmp_path: Path) -> None:
    for body, code in (
        (b'{"__metadata__": ' + nested(10_000) + b"}", "json_too_deep"),
        (b'{"x": [' + b"[]," * HEADER_CAPS.max_nodes + b"[]]}", "json_too_large"),
    ):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(len(body).to_bytes(8, "little") + body)
        with pytest.raises(ValidationFailed) as info:
            read_safetensors_header("bad.safetensors", path)
        assert info.value.code == code


PEAK_RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from service.core.errors import ValidationFailed
    from service.core.models import check_model_files

    def peak_kib():
        # VmHWM, not ru_maxrss: ru_maxrss keeps the parent's high-water mark across fork + exec.
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])

    folder = Path(sys.argv[1])
    files = [(p.name, p) for p in folder.iterdir()]
    before = peak_kib()
    try:
        check_model_files(files)
        code = None
    except ValidationFailed as exc:
        code = exc.code
    after = peak_kib()
    print(json.dumps({"code": code, "peak_kib_before": before, "peak_kib": after}))
    """
)


def test_50mb_config_of_17m_empty_objects_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / "config.json", "wb") as out:
        out.write(b'{"architectures": ["LlamaForCausalLM"], "x": [')
        piece = b"{}," * 1_000_000
        for _ in range(17):
            out.write(piece)
        out.write(b"{}]}")
    assert (folder / "config.json").stat().st_size > 50_000_000
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["code"] == "json_too_large"
    # json.loads of this file peaks near 1.4 GB; the scan adds about one 1 MiB chunk to the imports.
    assert figures["peak_kib"] < 200 * 1024, figures
    assert figures["peak_kib"] - figures["peak_kib_before"] < 20 * 1024, figures


def test_api_answers_422_with_the_code(live_server: LiveServer, tmp_path: Path) -> None:
    files = [
        ("files", (name, path.read_bytes(), "application/octet-stream"))
        for name, path in model_folder(
            tmp_path, {"config.json": b'{"architectures": ["X"], "x": ' + nested(65) + b"}"}
        )
    ]
    with live_server.client() as client:
        response = client.post("/v1/models", data={"name": "deep"}, files=files)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "json_too_deep"
        assert error["details"] == [{"filename": "config.json", "limit": MAX_JSON_DEPTH}]
        assert client.get("/v1/models").json()["data"] == []
