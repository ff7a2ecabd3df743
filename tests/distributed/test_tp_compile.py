"""Tensor parallelism with compiled blocks against one uncompiled process (gloo on CPU).

`parallel.tp=2 parallel.compile=true` crashed at the first backward (the compiled first block
returned no gradient for the embedding's output); now both steps' losses and gradient norms
must equal the single-process run within 1e-5 relative, like every layout in test_parity.
The compared run reads its compiled graphs from a cache a first run filled (as every run
after a job's first does): AOTAutograd's cache gave wrong gradients there (parallelize.py).
"""

import pytest

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics

REL = 1e-5
BASE = [
    *tiny_demo_model(n_layers=2),
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.steps=2",
    "optim.warmup_steps=1",
    "checkpoint.at_end=false",
    "logging.progress=false",
    "logging.tensorboard=false",
]


@pytest.mark.slow  # inductor compiles the blocks on every rank: about a minute on 2 cores
def test_tp2_compiled_blocks_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    base = [*BASE, f"data.cache_dir={tmp_path / 'cache'}"]
    want = train_metrics([*base, f"train.run_dir={tmp_path / 'one'}"])
    layout = ["parallel.tp=2", "parallel.compile=true"]
    warm = [*base, *layout, "train.steps=1", f"train.run_dir={tmp_path / 'warm'}"]
    run_distributed(train_metrics, 2, args=(warm,))  # fills the compile caches
    got = run_distributed(
        train_metrics, 2, args=([*base, *layout, f"train.run_dir={tmp_path / 'tp2'}"],)
    )[0]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key, g[key], w[key])
