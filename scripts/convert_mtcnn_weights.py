"""Convert the MTCNN weights of the facenet-pytorch wheel into the .safetensors files this package ships.

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/fnp
    python scripts/convert_mtcnn_weights.py /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl

reads ``facenet_pytorch/data/{pnet,rnet,onet}.pt`` from the wheel (a zip file; nothing of facenet-pytorch
is imported or installed) and writes ``codeformer_lightning/inference/weights/mtcnn/{pnet,rnet,onet}.safetensors``
with the same tensor names, shapes and float32 values. Each file's metadata names its source file and that
file's SHA-256, and the licence (MIT, notice in ``NOTICE.md`` next to the weights).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

NETS = ("pnet", "rnet", "onet")
OUT_DIR = Path(__file__).resolve().parents[1] / "codeformer_lightning" / "inference" / "weights" / "mtcnn"


def convert(wheel: Path, out_dir: Path = OUT_DIR) -> list[Path]:
    """Write one .safetensors per network of ``wheel``; returns the written paths."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for net in NETS:
            member = f"facenet_pytorch/data/{net}.pt"
            data = archive.read(member)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            state = {name: tensor.contiguous() for name, tensor in state.items()}
            metadata = {
                "source": f"{wheel.name}:{member}",
                "source_sha256": hashlib.sha256(data).hexdigest(),
                "license": "MIT (see NOTICE.md next to this file)",
            }
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{net}.safetensors"
            save_file(state, str(path), metadata=metadata)
            path.chmod(0o644)  # safetensors writes 0600; installed package data must be world-readable
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="facenet_pytorch-2.6.0-py3-none-any.whl")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for path in convert(args.wheel, args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
