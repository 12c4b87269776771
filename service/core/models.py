"""Checks on an uploaded Hugging Face model folder, before anything is stored. No torch, no safetensors package.

What we refuse and why:
- file names that are not plain names (``invalid_filename``): they become paths in storage and in the
  training child's folder, so ``../x``, ``a/b`` or hidden names could escape or shadow files;
- pickle-based weights (``unsafe_weights``): loading a pickle runs arbitrary code;
- executable-ish files such as ``.py`` and ``.so`` (``unsafe_file``): they only exist to be run (custom model
  code); we never pass ``trust_remote_code``, so they are at best dead weight, at worst a trap for whoever
  downloads the folder later;
- ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` (``remote_code_not_allowed``): the model needs
  custom code to load;
- a missing or unreadable ``config.json`` (``missing_config`` / ``invalid_config``), no ``*.safetensors``
  (``missing_weights``), a corrupt safetensors header (``invalid_safetensors``), an index that names files that
  were not uploaded (``missing_shard``) or is itself malformed (``invalid_index``);
- any ``*.json`` file, or safetensors header, over its size, nesting depth or value-count cap
  (``json_too_large`` / ``json_too_deep``, see :class:`JsonCaps`), found by a streaming pre-scan before
  anything parses it: ``json.loads`` spends ~90 bytes per value, so a 50 MB file of ``{}`` would cost over a
  gigabyte; the scan holds one chunk. A JSON file the server does not parse (``tokenizer.json``) whose
  brackets close more than they open is ``invalid_json``. The files parsed here must be UTF-8 and hold no
  ``\\u`` escape of a lone surrogate (it has no UTF-8 form: the response, the database and the 422 body
  quoting it could not be written).

Other files (the contents of tokenizer files, ``generation_config.json``, chat templates, ``README.md``,
licences, ...) are accepted as they are: they are data, read by tokenizers and templates, never executed.

Safetensors headers are parsed by hand (8-byte little-endian header length, then a JSON header) with the same
consistency rules the ``safetensors`` library enforces on load (a key twice in one object included), so a
file that passes here loads there; tests/fuzz checks that claim against the library. Only the header is read:
memory and time do not grow with the weights' size.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignd._jsonscan import JSON_UNBALANCED, JsonStructureError, scan_json, scan_json_stream

from service.core.errors import ValidationFailed

__all__ = [
    "HEADER_CAPS",
    "INDEX_CAPS",
    "METADATA_CAPS",
    "VOCAB_CAPS",
    "JsonCaps",
    "ModelCheck",
    "check_model_files",
    "inspect_model_files",
    "json_caps_for",
    "read_safetensors_header",
]

CONFIG_FILE = "config.json"
INDEX_SUFFIX = ".safetensors.index.json"

# Pickle-based formats (the ``.bin`` of ``pytorch_model.bin`` included): loading them executes code.
UNSAFE_WEIGHT_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
# Files that exist to be executed or imported.
UNSAFE_FILE_SUFFIXES = frozenset(
    {".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".exe", ".sh", ".bat", ".cmd", ".ps1", ".jar"}
)

# Bits per element of every dtype the safetensors format defines (sub-byte float types included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

# The safetensors library refuses headers above 100 MB; so do we (and we never read more than that).
MAX_HEADER_BYTES = 100_000_000
# Real configs, tokenizers and headers nest 3 to 6 levels deep.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class JsonCaps:
    """Limits on one JSON document: its size in bytes, nesting depth, and values (``[``, ``{`` and ``,``
    outside strings, as :mod:`alignd._jsonscan` counts them)."""

    max_bytes: int
    max_nodes: int
    max_depth: int = MAX_JSON_DEPTH


# Files parsed here with json.loads (config.json, tokenizer_config.json, ...) and by transformers' Python json
# in the training child: at ~90 bytes per value at worst, 1M values is ~90 MB. Real ones hold a few thousand.
METADATA_CAPS = JsonCaps(max_bytes=16 * 1024**2, max_nodes=1_000_000)
# Two values per tensor: 1M is 500k tensors (DeepSeek-V3's index names ~90k in 9 MB).
INDEX_CAPS = JsonCaps(max_bytes=64 * 1024**2, max_nodes=1_000_000)
# Never parsed here; the child's tokenizers library reads them. Large real ones: Gemma 3's tokenizer.json is
# ~33 MB with ~2M values (vocabulary and merges).
VOCAB_CAPS = JsonCaps(max_bytes=256 * 1024**2, max_nodes=8_000_000)
# About 8 values per tensor: 2M is 250k tensors in one file.
HEADER_CAPS = JsonCaps(max_bytes=MAX_HEADER_BYTES, max_nodes=2_000_000)
VOCAB_FILES = frozenset({"tokenizer.json", "vocab.json"})


def json_caps_for(name: str) -> JsonCaps:
    """The caps of the uploaded JSON file ``name``."""
    if name in VOCAB_FILES:
        return VOCAB_CAPS
    if name.endswith(INDEX_SUFFIX):
        return INDEX_CAPS
    return METADATA_CAPS


@dataclass(frozen=True)
class ModelCheck:
    """What the API reports about an accepted model folder."""

    architecture: str
    model_type: str | None
    num_parameters: int
    size_bytes: int
    weight_files: tuple[str, ...]
    files: tuple[str, ...] = field(default=())


def _fail(code: str, message: str, **detail: Any) -> ValidationFailed:
    return ValidationFailed(message, code=code, details=[detail] if detail else None)


def _check_filename(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise _fail("invalid_filename", "Every uploaded file needs a non-empty file name.")
    bad = (
        "/" in name
        or "\\" in name
        or name in (".", "..")
        or name.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or name != name.strip()
        or any("\ud800" <= c <= "\udfff" for c in name)  # not text: no UTF-8 for it, on disk or in JSON
        or len(name.encode("utf-8", "surrogatepass")) > 255
    )
    if bad:
        raise _fail(
            "invalid_filename",
            f"File name {name!r} is not allowed: use plain names (no slashes, no '..', no hidden names).",
            # as UTF-8 can write it: the 422 body is JSON in UTF-8, and a lone surrogate has no encoding
            filename=name.encode("utf-8", "backslashreplace").decode("utf-8"),
        )
    return name


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _structure_failure(name: str, exc: JsonStructureError, *, code: str) -> ValidationFailed:
    if exc.code == JSON_UNBALANCED:
        return _fail(code, f"{name} is not valid JSON: {exc.message}.", filename=name)
    return _fail(
        exc.code, f"{name}: {exc.message}, over the limit for this file.", filename=name, limit=exc.limit
    )


def _scan_json_file(name: str, path: Path, *, code: str) -> None:
    """Refuse ``name`` past its caps, reading one chunk at a time (nothing is parsed)."""
    caps = json_caps_for(name)
    size = path.stat().st_size
    if size > caps.max_bytes:
        raise _fail(
            "json_too_large",
            f"{name} is {size} bytes, over the {caps.max_bytes}-byte limit for this file.",
            filename=name,
            limit=caps.max_bytes,
        )
    try:
        with path.open("rb") as f:
            scan_json_stream(f, max_depth=caps.max_depth, max_nodes=caps.max_nodes)
    except JsonStructureError as exc:
        raise _structure_failure(name, exc, code=code) from None


# A \uD800-\uDFFF escape without its partner decodes to a lone surrogate, which json.loads accepts but no
# UTF-8 writer can write: an architecture name or shard name holding one broke the JSON response, the database
# and the 422 body quoting it; the safetensors library refuses such a header outright.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(text: str, value: Any) -> bool:
    if _SURROGATE_ESCAPE.search(text) is None:  # only an escape can make one: the text itself is UTF-8
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _load_json(name: str, path: Path, *, code: str) -> Any:
    """Parse a JSON file already scanned by :func:`_scan_json_file` (so its size and shape are capped).

    UTF-8 only, no BOM, as transformers reads these files: ``json.loads(bytes)`` would also take UTF-16/32,
    which the byte scan cannot read."""
    try:
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except UnicodeDecodeError as exc:
        raise _fail(code, f"{name} is not UTF-8: {exc}", filename=name) from None
    except (ValueError, RecursionError) as exc:
        raise _fail(code, f"{name} is not valid JSON: {exc}", filename=name) from None
    if _has_lone_surrogate(text, value):
        raise _fail(
            code, f"{name} is not valid JSON: a \\u escape encodes a lone UTF-16 surrogate.", filename=name
        )
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; the safetensors library refuses the file ("duplicate
    # field"), so a header that passed here would not load there.
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


# The library reads sizes as usize and multiplies them with checked arithmetic: a dimension past 2**64 - 1 is
# "invalid type", and a shape whose running product overflows is refused even when a later 0 would make the
# total 0 ([2**32, 2**32, 0]).
_U64_MAX = 2**64 - 1


def _checked_numel(shape: list[int]) -> int:
    """The element count as the library computes it, or -1 where its running product overflows."""
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _U64_MAX:
            return -1
    return numel


def read_safetensors_header(
    name: str, path: str | os.PathLike[str]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse and check one safetensors file's header; return ``{tensor_name: (dtype, shape)}``.

    Raises ``ValidationFailed`` with code ``invalid_safetensors`` naming the file and the problem.
    """

    def bad(why: str) -> ValidationFailed:
        return _fail("invalid_safetensors", f"{name} is not a valid safetensors file: {why}.", filename=name)

    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > file_size:
            raise bad(f"header length {n} runs past the end of the file ({file_size} bytes)")
        raw = f.read(n)
    if len(raw) != n:
        raise bad("truncated header")
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")
    try:
        scan_json(raw, max_depth=HEADER_CAPS.max_depth, max_nodes=HEADER_CAPS.max_nodes)
    except JsonStructureError as exc:
        raise _structure_failure(name, exc, code="invalid_safetensors") from None
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if _has_lone_surrogate(text, header):
        raise bad("the header holds a \\u escape of a lone UTF-16 surrogate")
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")

    data_len = file_size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict):
            raise bad(f"tensor {key!r}: expected an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(f"tensor {key!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _U64_MAX for d in shape):
            raise bad(f"tensor {key!r}: shape must be a list of 64-bit non-negative integers, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int and 0 <= o <= _U64_MAX for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise bad(f"tensor {key!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
        numel = _checked_numel(shape)
        nbits = numel * DTYPE_BITS[dtype]
        if numel < 0 or nbits > _U64_MAX:
            raise bad(f"tensor {key!r}: shape {shape} overflows a 64-bit element or bit count")
        if nbits % 8:
            raise bad(f"tensor {key!r}: {numel} elements of {dtype} do not fill whole bytes")
        if offsets[1] - offsets[0] != nbits // 8:
            raise bad(
                f"tensor {key!r}: {dtype} {shape} needs {nbits // 8} bytes, "
                f"data_offsets span {offsets[1] - offsets[0]}"
            )
        tensors[key] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], key))

    # The tensors must tile the data area exactly: no gaps, no overlaps, nothing past the end (and no
    # trailing bytes), as the safetensors library checks on load.
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise bad(f"tensor {key!r}: data starts at {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise bad(f"the tensors cover {pos} bytes of data but the file holds {data_len}")
    return tensors


def _json_code(name: str) -> str:
    """The code for an uploaded JSON file that is not JSON."""
    if name.endswith(INDEX_SUFFIX):
        return "invalid_index"
    if name in (CONFIG_FILE, "tokenizer_config.json"):
        return "invalid_config"
    return "invalid_json"


def _check_index(
    name: str, path: Path, uploaded: set[str], headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]]
) -> None:
    index = _load_json(name, path, code="invalid_index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _fail(
            "invalid_index", f'{name} must have a "weight_map" of tensor names to file names.', filename=name
        )
    for shard in sorted(set(weight_map.values())):
        if shard not in uploaded:
            raise _fail(
                "missing_shard",
                f"{name} refers to {shard!r}, which was not uploaded.",
                filename=name,
                shard=shard,
            )
    for tensor, shard in weight_map.items():
        shard_header = headers.get(shard)
        if shard_header is None or tensor not in shard_header:
            raise _fail(
                "invalid_index",
                f"{name} places tensor {tensor!r} in {shard!r}, which does not contain it.",
                filename=name,
                shard=shard,
            )


def check_model_files(files: Iterable[tuple[str, str | os.PathLike[str]]]) -> ModelCheck:
    """Check an uploaded model folder given as ``(file name, local path)`` pairs.

    Raises ``ValidationFailed`` (422) with one of the codes in the module docstring; returns a
    :class:`ModelCheck` with the architecture, parameter count and total size.
    """
    entries: dict[str, Path] = {}
    for raw_name, local in files:
        name = _check_filename(raw_name)
        if name in entries:
            raise _fail("invalid_filename", f"File {name!r} was uploaded twice.", filename=name)
        entries[name] = Path(local)

    # Refuse by name first: cheapest, and a pickle is refused even when everything else is wrong.
    for name in entries:
        suffix = _suffix(name)
        if suffix in UNSAFE_WEIGHT_SUFFIXES or name.lower().endswith(".bin.index.json"):
            raise _fail(
                "unsafe_weights",
                f"{name}: only safetensors weights are accepted (pickle-based formats can run code on load).",
                filename=name,
            )
        if suffix in UNSAFE_FILE_SUFFIXES:
            raise _fail(
                "unsafe_file",
                f"{name}: executable files are not accepted (custom model code is never run).",
                filename=name,
            )

    if CONFIG_FILE not in entries:
        raise _fail("missing_config", "The model folder has no config.json.")
    for name, path in entries.items():
        if name.lower().endswith(".json"):
            _scan_json_file(name, path, code=_json_code(name))
    config = _load_json(CONFIG_FILE, entries[CONFIG_FILE], code="invalid_config")
    if not isinstance(config, dict):
        raise _fail("invalid_config", "config.json must be a JSON object.", filename=CONFIG_FILE)
    for conf_name in (CONFIG_FILE, "tokenizer_config.json"):
        if conf_name not in entries:
            continue
        conf = (
            config
            if conf_name == CONFIG_FILE
            else _load_json(conf_name, entries[conf_name], code="invalid_config")
        )
        if isinstance(conf, dict) and "auto_map" in conf:
            raise _fail(
                "remote_code_not_allowed",
                f'{conf_name} has "auto_map": this model needs custom code, which alignd never runs.',
                filename=conf_name,
            )

    architecture: str | None = None
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str) and archs[0]:
        architecture = archs[0]
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    if architecture is None:
        architecture = model_type
    if not architecture:
        raise _fail(
            "invalid_config",
            'config.json names neither "architectures" nor "model_type".',
            filename=CONFIG_FILE,
        )

    weight_files = sorted(n for n in entries if _suffix(n) == ".safetensors")
    if not weight_files:
        raise _fail("missing_weights", "The model folder has no *.safetensors weights.")

    headers = {name: read_safetensors_header(name, entries[name]) for name in weight_files}
    uploaded = set(entries)
    for name in sorted(entries):
        if name.endswith(INDEX_SUFFIX):
            _check_index(name, entries[name], uploaded, headers)

    # A tensor stored in two shards (it happens with re-sharded checkpoints) counts once.
    seen: dict[str, tuple[int, ...]] = {}
    for header in headers.values():
        for tensor, (_dtype, shape) in header.items():
            seen.setdefault(tensor, shape)
    num_parameters = sum(math.prod(shape) for shape in seen.values())
    size_bytes = sum(p.stat().st_size for p in entries.values())
    return ModelCheck(
        architecture=architecture,
        model_type=model_type,
        num_parameters=num_parameters,
        size_bytes=size_bytes,
        weight_files=tuple(weight_files),
        files=tuple(sorted(entries)),
    )


# The name the API routes use.
inspect_model_files = check_model_files
