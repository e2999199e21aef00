"""Helpers shared by the fixture scripts in tests/reference/.

A fixture is one safetensors file tests/fixtures/<name>.safetensors holding named tensors (inputs
and PyTorch's expected outputs, `<case>.<role>`) and string metadata that records what wrote it
(torch/diffusers/transformers versions, the script, the seed). The Rust tests read these files
with `steer::safetensors_io::SafetensorsFile`; nothing at test or CI time needs Python.

Determinism: every case draws its inputs from its own generator, seeded from the case name
(`case_generator`), so adding or changing one case leaves the others' bytes unchanged, and the
oracle runs single-threaded (`setup_determinism`) so reductions happen in one order.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

# Fixtures are committed: every file under tests/fixtures/ together must stay under 4 MiB (the
# tiny diffusers folders, about 1 MiB each, are most of it).
# save_fixture refuses one file above MAX_FILE_BYTES and warns when the folder passes
# WARN_TOTAL_BYTES.
MAX_FILE_BYTES = 512 * 1024
WARN_TOTAL_BYTES = 4 * 1024 * 1024


def setup_determinism(seed: int = 0) -> None:
    """Seed torch's global generator and make PyTorch's CPU results reproducible."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def case_generator(case: str, seed: int = 0) -> torch.Generator:
    """A generator whose stream depends only on the case name (and the global seed)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(case.encode()))


_DRAWN: set[str] = set()


def randn(case: str, *shape: int, role: str = "", scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Standard-normal values (times `scale`) for `case`'s input `role`; never exactly zero.

    The stream is seeded by (case, role, shape): the same three give the same values, so give
    every input of a case its own role (a warning says when a draw repeats)."""
    key = case + (f"/{role}" if role else "") + "/" + "x".join(map(str, shape))
    if key in _DRAWN:
        print(f"warning: randn({key}) drawn twice: identical values; pass role=", file=sys.stderr)
    _DRAWN.add(key)
    x = torch.randn(*shape, generator=case_generator(key), dtype=dtype)
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x * scale


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("diffusers", "transformers", "safetensors", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
              torch.float16: "F16", torch.int64: "I64"}


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format, with the header's keys sorted and the data laid out in name
    order, so that the same tensors always give the same bytes (safetensors' own writer orders
    the metadata by a hash map: the bytes change from run to run)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        data = t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def fixtures_size() -> int:
    """Bytes of every file under tests/fixtures/ (temporary files excluded)."""
    return sum(p.stat().st_size for p in FIXTURES.rglob("*")
               if p.is_file() and ".tmp" not in p.name and not any(".tmp" in q.name for q in p.parents))


def save_fixture(name: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    """Write tests/fixtures/<name>.safetensors: contiguous CPU copies of `tensors`, metadata with
    the library versions, the writing script and anything in `meta` (values made strings)."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.safetensors"
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: `{key}` is {type(t).__name__}, not a tensor")
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: `{key}` has dtype {t.dtype}; store floats or int64")
        out[key] = t.detach().to("cpu").contiguous().clone()
    metadata = {f"version.{k}": v for k, v in versions().items()}
    metadata["generator"] = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    for k, v in (meta or {}).items():
        metadata[str(k)] = str(v)
    tmp = path.with_suffix(".safetensors.tmp")
    data = _serialize(out, metadata)
    if len(data) > MAX_FILE_BYTES:
        raise SystemExit(f"{name}: {len(data)} bytes > {MAX_FILE_BYTES}: use smaller shapes")
    tmp.write_bytes(data)
    with safe_open(str(tmp), framework="pt") as f:  # read it back with the reference reader
        assert f.metadata() == metadata
        for key, t in out.items():
            assert torch.equal(f.get_tensor(key), t), key
    os.replace(tmp, path)
    size = path.stat().st_size
    print(f"wrote {path.relative_to(REPO)}: {len(out)} tensors, {size / 1024:.1f} KiB")
    total = fixtures_size()
    print(f"tests/fixtures/ now holds {total / 1024:.1f} KiB in all")
    if total > WARN_TOTAL_BYTES:
        print(f"WARNING: tests/fixtures/ holds {total / 1024:.0f} KiB; keep it under 4 MiB",
              file=sys.stderr)
    return path
