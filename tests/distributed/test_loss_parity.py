"""loss.normalize=modality_mean with the z-loss at 2-rank layouts against one process (gloo).

One run per layout (TP2, PP2, CP2, FSDP2; one process runs the step as 4 micro-batches),
each with modality_mean, per-modality weights, data.loss_weights and a z-loss large enough to
matter (1e-2): the loss, loss/z, the per-modality losses and the gradient norm of 2 steps
must equal the single-process run within 1e-5 relative (step 2 starts from the updated
weights, so the gradients themselves must agree, not only their norm). The TP2 run also
checks the vocabulary-parallel z-loss directly against a dense logsumexp, in value and
gradient, before training. Last, NEFTune's training noise at TP2 (replicated embeddings)
against one process.
"""

import os

import pytest
import torch

from mmfm.testing import run_distributed, tiny_demo_model, train_metrics

REL = 1e-5
LOSS = [
    "loss.normalize=modality_mean",
    "loss.modality_weights={text: 1.0, image: 2.0, dna: 0.5}",
    "loss.z_loss=1e-2",
    "data.loss_weights={image: 0.5}",
]
MODEL = [
    *tiny_demo_model(n_layers=2),
    *LOSS,
    "train.global_batch_size=4",  # one process: 4 micro-batches of one row
    "train.micro_batch_size=1",
    "train.steps=2",
    "optim.warmup_steps=1",
    "checkpoint.at_end=false",
    "logging.progress=false",
    "logging.tensorboard=false",
]
LAYOUTS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "parallel.pp_schedule=1f1b"],
    "cp2": ["parallel.cp=2"],
    "fsdp2": ["parallel.dp_shard=2"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_cache) -> tuple[list[str], list[dict]]:
    base = [*MODEL, f"data.cache_dir={demo_cache}"]
    return base, train_metrics([*base, f"train.run_dir={tmp_path_factory.mktemp('ref')}"])


def test_one_process_logs_the_z_loss(reference):
    _, rows = reference
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # ~ 1e-2 x log(vocab)^2 = 0.3: a term that the comparisons below see
        assert 0.05 < r["loss/z"] < r["loss"]
        assert {"loss/text", "loss/image", "loss/dna"} <= r.keys()


def vocab_parallel_z_loss_error() -> tuple[float, float]:
    """Largest difference of the TP2 z-loss and its gradient from a dense logsumexp^2."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from mmfm.train.loss import token_losses

    dist.init_process_group("gloo")  # mmfm train then runs in this group (and closes it)
    gen = torch.Generator().manual_seed(0)
    full = 4 * torch.randn(2, 5, 16, generator=gen)
    labels = torch.randint(0, 16, (2, 5), generator=gen)
    weights = torch.rand(2, 5, generator=gen)
    sharded = distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(2)]).requires_grad_()
    with loss_parallel():
        _, lse = token_losses(sharded, labels, with_lse=True)
        (weights * lse.square()).sum().backward()
    dense = full.clone().requires_grad_()
    want = torch.logsumexp(dense, dim=-1)
    (weights * want.square()).sum().backward()
    value = (lse.square() - want.square()).abs().max() / want.square().abs().max()
    grad = (sharded.grad.full_tensor() - dense.grad).abs().max() / dense.grad.abs().max()
    return value.item(), grad.item()


def run_layout(overrides: list[str], check_tp: bool):
    errors = vocab_parallel_z_loss_error() if check_tp else None
    rows = train_metrics(overrides)
    return (errors, rows) if int(os.environ["RANK"]) == 0 else (errors, None)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_modality_mean_and_z_loss_match_one_process(name, reference, tmp_path):
    base, want = reference
    overrides = [*base, *LAYOUTS[name], f"train.run_dir={tmp_path}"]
    results = run_distributed(run_layout, 2, args=(overrides, name == "tp2"))
    got = results[0][1]
    if name == "tp2":
        for errors, _ in results:
            assert max(errors) < 1e-6, errors
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "loss/z", "grad_norm", "loss/text", "loss/image", "loss/dna"):
            assert g[key] == pytest.approx(w[key], rel=REL), (name, g["step"], key)


def test_neftune_noise_under_tp2_is_the_noise_of_one_process(reference, tmp_path):
    # Tensor-parallel ranks without sequence parallelism hold the whole embedding output and
    # draw the same noise from the same seed: the run is one process's, noise included.
    base, plain = reference
    noisy = [*base, "model.neftune_alpha=5", "parallel.sequence_parallel=false", "train.steps=1"]
    want = train_metrics([*noisy, f"train.run_dir={tmp_path / 'one'}"])
    got = run_distributed(
        train_metrics, 2, args=([*noisy, "parallel.tp=2", f"train.run_dir={tmp_path / 'tp2'}"],)
    )[0]
    assert len(got) == len(want) == 1
    for g, w, p in zip(got, want, plain[:1], strict=True):
        assert abs(w["loss"] - p["loss"]) > 1e-3  # the noise is on in training
        for key in ("loss", "loss/z", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=REL), (g["step"], key)
