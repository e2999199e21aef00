#!/usr/bin/env python3
"""Convert a Learn-to-Steer relation-classifier checkpoint (.pth) to the safetensors file that
every `steer` command taking `--classifier` reads.

    python scripts/convert_classifier.py final_model.pth classifier.safetensors

The input is what the reference implementation's `save_model` writes (sapir1779/learn-to-steer,
train_relation_classifier/model_utils.py): a `torch.save`d dict with `model_state_dict`,
`rel_name_to_idx`, `idx_to_rel_name`, `input_channels` (N, the maps per word), `config` (the
yaml's `model` section) and `training_config` (its `training` section).

The output holds every `model_state_dict` entry under its own name, as float32 (the positional
encoding buffers `*.positional_encoding.pe` included), and string metadata:

    format               "steer-relation-classifier"
    format_version       "1"
    classes              JSON list of the class names, ordered by class index
    input_channels       N, as a decimal string
    config               JSON of `config`
    training_config      JSON of `training_config` (`null` when the checkpoint has none)
    source               the checkpoint's file name

Only torch is needed (the safetensors file is written by this script, with sorted keys, so the
same checkpoint always gives the same bytes). The checkpoint is loaded with
`torch.load(weights_only=True)`; a checkpoint that needs arbitrary unpickling is refused unless
`--trust-pickle` is given (only for files you trust: unpickling can run code).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import torch

FORMAT = "steer-relation-classifier"
FORMAT_VERSION = "1"

# Names every EnhancedRelationClassifier checkpoint has (anything else is checked by steer's loader).
REQUIRED = (
    "object_extractor.input_projection.weight",
    "object_extractor.query_vector",
    "object_extractor.layer_attention.in_proj_weight",
    "object_extractor.output_projection.weight",
    "relation_classifier.projection.weight",
)

_ST_DTYPES = {torch.float32: "F32"}


def _plain(obj):
    """The checkpoint's config as plain JSON types (tuples to lists, tensors/numbers to Python)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise SystemExit(f"config value {obj!r} ({type(obj).__name__}) cannot be written as JSON")


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format: 8-byte little-endian header length, JSON header (keys sorted,
    padded with spaces to 8-byte alignment), then the tensors' bytes in name order."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def class_list(rel_name_to_idx: dict, idx_to_rel_name: dict | None, num_outputs: int) -> list[str]:
    """Class names ordered by index; the two maps in the checkpoint must agree."""
    by_idx: dict[int, str] = {}
    for name, idx in rel_name_to_idx.items():
        i = int(idx)
        if i in by_idx:
            raise SystemExit(f"rel_name_to_idx maps both {by_idx[i]!r} and {name!r} to {i}")
        by_idx[i] = str(name)
    if sorted(by_idx) != list(range(len(by_idx))):
        raise SystemExit(f"class indices {sorted(by_idx)} are not 0..{len(by_idx) - 1}")
    for idx, name in (idx_to_rel_name or {}).items():
        if by_idx.get(int(idx)) != name:
            raise SystemExit(f"idx_to_rel_name[{idx}] = {name!r} disagrees with rel_name_to_idx "
                             f"({by_idx.get(int(idx))!r})")
    if len(by_idx) != num_outputs:
        raise SystemExit(f"{len(by_idx)} classes in rel_name_to_idx, but the last layer has "
                         f"{num_outputs} outputs")
    return [by_idx[i] for i in range(len(by_idx))]


def convert(checkpoint: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    for key in ("model_state_dict", "rel_name_to_idx", "config"):
        if key not in checkpoint:
            raise SystemExit(f"not a relation-classifier checkpoint: no `{key}` "
                             f"(has: {', '.join(map(str, checkpoint))})")
    state = dict(checkpoint["model_state_dict"])
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise SystemExit(f"model_state_dict lacks {missing}: not an EnhancedRelationClassifier "
                         "with the attention extractor")
    tensors = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SystemExit(f"state entry `{name}` is not a float tensor")
        tensors[name] = t.detach().to("cpu", torch.float32).contiguous()

    # The reference's load_model falls back to 57 * 24 (FLUX.1-dev) when input_channels is absent.
    n = int(checkpoint.get("input_channels", 57 * 24))
    pe = tensors.get("object_extractor.positional_encoding.pe")
    if pe is not None and pe.shape[1] != n:
        raise SystemExit(f"input_channels = {n}, but the extractor's positional encoding has "
                         f"max_len {pe.shape[1]}")
    fc_last = max((k for k in tensors if k.startswith("relation_classifier.fc.")
                   and k.endswith(".weight")), key=lambda k: int(k.split(".")[2]))
    classes = class_list(checkpoint["rel_name_to_idx"], checkpoint.get("idx_to_rel_name"),
                         tensors[fc_last].shape[0])
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": json.dumps(classes),
        "input_channels": str(n),
        "config": json.dumps(_plain(checkpoint["config"]), sort_keys=True),
        "training_config": json.dumps(_plain(checkpoint.get("training_config")), sort_keys=True),
        "source": source,
    }
    return tensors, metadata


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Convert a Learn-to-Steer relation-classifier checkpoint (.pth, as the "
                    "reference train.py saves it) to steer's safetensors format.")
    ap.add_argument("checkpoint", type=Path, help="the .pth file (e.g. final_model.pth)")
    ap.add_argument("out", type=Path, help="the .safetensors file to write")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="load with weights_only=False if the safe loader refuses the file "
                         "(unpickling can run code: only for checkpoints you trust)")
    args = ap.parse_args(argv)

    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling refusal the same way
        if not args.trust_pickle:
            print(f"error: {args.checkpoint}: the safe loader refused it ({e}).\n"
                  "If you trust this file, rerun with --trust-pickle.", file=sys.stderr)
            return 1
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict):
        print(f"error: {args.checkpoint} holds a {type(ckpt).__name__}, not a checkpoint dict",
              file=sys.stderr)
        return 1

    tensors, metadata = convert(ckpt, args.checkpoint.name)
    data = serialize(tensors, metadata)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)  # atomic: never a half-written file under the final name

    config = json.loads(metadata["config"])
    params = sum(t.numel() for k, t in tensors.items() if not k.endswith(".pe"))
    print(f"wrote {args.out}: {len(tensors)} tensors, {params} parameters, "
          f"N = {metadata['input_channels']}, d_model = {config.get('d_model')}, "
          f"classes = {json.loads(metadata['classes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
