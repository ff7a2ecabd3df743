"""Peak memory of `mmfm convert hf` against the size of the checkpoint it reads.

Writes a checkpoint of a Llama-shaped model with several hundred MB of weights (hidden 1024,
12 layers, vocabulary 32000, untied: 219M parameters, 0.88 GB fp32) plus its AdamW state, the
way training saves it (2.6 GB in all), then exports it to Hugging Face (bf16, 200 MB shards)
in a fresh process. The export's memory is its peak resident set (VmHWM) minus what the
process held before the export started (Python, torch, transformers).

    python bench/convert.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPORT = """
import sys, time
from mmfm.convert.hf import export_hf
import transformers  # noqa: F401  (imported before the baseline, like the command does)

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

base = kib("VmRSS")
start = time.perf_counter()
export_hf(sys.argv[1], sys.argv[2], dtype="bf16", max_shard="200MB")
print(base, kib("VmHWM"), time.perf_counter() - start)
"""


def write_checkpoint(path: Path) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from mmfm.config import Config, DataConfig, ModelConfig, to_yaml
    from mmfm.model import build_model, init_weights
    from mmfm.train.checkpoint import Checkpointer

    model_cfg = ModelConfig(
        vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=16, max_seq_len=2048
    )
    model = build_model(model_cfg)
    model.to_empty(device="cpu")
    init_weights(model, model_cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    optim = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    tensors = {
        "model": get_model_state_dict(model),
        "optim": {k: v for k, v in optim.items() if k.startswith("state.")},
    }
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=2048))
    Checkpointer(path.parent, keep=1).save(0, tensors, {"step": 0}, to_yaml(cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="write into this directory and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp())
    ckpt = root / "checkpoints" / "step_0"
    if not ckpt.is_dir():
        write_checkpoint(ckpt)
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", EXPORT, str(ckpt), str(root / "hf")],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak, seconds = run.stdout.split()
    used = (int(peak) - int(base)) * 1024
    shard = max(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
    weights = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
    print(f"checkpoint {size / 2**30:.2f} GiB (model + AdamW state)", end="; ")
    print(f"export {weights / 2**30:.2f} GiB bf16")
    print("| measure | MiB | x checkpoint |")
    print("|---|---|---|")
    print(f"| export peak RSS over baseline | {used / 2**20:.0f} | {used / size:.3f} |")
    print(f"| largest output shard | {shard / 2**20:.0f} | {shard / size:.3f} |")
    budget = 0.3 * size + shard
    print(f"| budget: 0.3x checkpoint + one shard | {budget / 2**20:.0f} | {budget / size:.3f} |")
    wall = time.perf_counter() - start
    print(f"export took {float(seconds):.1f} s ({wall:.1f} s with the imports)")
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
