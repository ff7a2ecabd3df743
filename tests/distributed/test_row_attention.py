"""`data.attention: row` under context parallelism (gloo, 2 ranks, fp32, CPU).

A row packed in row mode (three documents and padding) is cut into each rank's zigzag slice,
as the loader cuts it, and run through the tiny model with ring attention (both kernels) and
the all-gather baseline; every rank's logits must equal the matching slice of one process's
plain causal forward over the documents' concatenation (one sequence, positions 0..n-1).
"""

import numpy as np
import torch

from mmfm.testing import run_distributed

LENGTHS = (10, 1, 30)  # 41 tokens, 23 of padding, in a row of 64 (divisible by 2 x cp)
SEQ_LEN, TOL = 64, 1e-5


def row_vs_plain_causal(cp: int) -> dict[str, float]:
    import torch.distributed as dist

    from mmfm.config import ModelConfig
    from mmfm.core.types import Document
    from mmfm.core.zigzag import zigzag_indices
    from mmfm.data.packing import RowBuilder, modality_weight_table
    from mmfm.model import build_model, init_weights
    from mmfm.parallel.context_parallel import AllGatherAttention, RingAttention, build_kernel

    dist.init_process_group("gloo")
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    init_weights(model, cfg, 0)
    gen = np.random.default_rng(0)
    builder = RowBuilder(SEQ_LEN, modality_weight_table({}), "row")
    for n in LENGTHS:
        ids = gen.integers(3, cfg.vocab_size, n).astype(np.int32)
        builder.add(Document(ids, np.zeros(n, np.uint8), ""), 0, n)
    row = {k: torch.from_numpy(v)[None] for k, v in builder.finish().items()}
    used = sum(LENGTHS)
    with torch.no_grad():
        tokens = row["tokens"][:, :used]
        plain = model(tokens, torch.arange(used)[None], torch.zeros_like(tokens))
    index = zigzag_indices(SEQ_LEN, cp, dist.get_rank())
    mine = index < used  # the real tokens among this rank's slice
    backends = {
        "ring_sdpa": RingAttention(dist.group.WORLD, build_kernel("sdpa", torch.device("cpu"))),
        "ring_math": RingAttention(dist.group.WORLD, build_kernel("math", torch.device("cpu"))),
        "allgather": AllGatherAttention(dist.group.WORLD),
    }
    diffs = {}
    for name, backend in backends.items():
        model.backend = backend
        with torch.no_grad():
            local = model(*(row[k][:, index] for k in ("tokens", "positions", "doc_ids")))
        diffs[name] = (local[:, mine] - plain[:, index[mine]]).abs().max().item()
    return diffs


def test_row_attention_at_cp2_equals_causal_attention_over_the_row():
    results = run_distributed(row_vs_plain_causal, 2, args=(2,))
    for rank, diffs in enumerate(results):
        assert max(diffs.values()) <= TOL, (rank, diffs)
