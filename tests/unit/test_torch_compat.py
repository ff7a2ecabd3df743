"""Each shim of `mmfm.core.torch_compat` against its public equivalent or a reference, the torch
version against the pin in setup.py, and no private torch API used anywhere else in mmfm."""

from __future__ import annotations

import ast
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard, _StridedShard, distribute_tensor

from mmfm.core import torch_compat as tc
from mmfm.testing import run_distributed
from mmfm.train.dcp_reader import SafeFileSystemReader, load_tensors

ROOT = Path(__file__).resolve().parents[2]
# Methods of torch objects with a private name, which an attribute chain rooted at a torch
# import does not reveal (the object is a local variable).
PRIVATE_METHODS = {"_flatten", "_unflatten", "_local_tensor", "_spec"}


def _torch_requirement() -> SpecifierSet:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            for item in node.value.elts:
                name = item.value.split(">")[0].split("<")[0].split("=")[0].strip()
                if name == "torch":
                    return SpecifierSet(item.value[len("torch") :])
    raise AssertionError("setup.py install_requires has no torch requirement")


def test_torch_is_in_the_range_setup_py_pins():
    pinned = _torch_requirement()
    version = Version(str(torch.__version__)).public  # 2.13.0+cpu -> 2.13.0
    assert pinned.contains(version, prereleases=True), (
        f"torch {torch.__version__} is outside setup.py's torch{pinned}, the range the shims of "
        "mmfm/core/torch_compat.py are tested on: run tests/unit/test_torch_compat.py and the "
        "parallel tests on this torch, fix the shims, then move the pin"
    )
    assert any(s.operator in ("<", "<=", "==", "~=") for s in pinned), "the pin needs a ceiling"


def _private_torch_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    torch_names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            torch_names.update(a.asname or a.name for a in node.names)
            names = [node.module, *(a.name for a in node.names)]
            if any(p.startswith("_") for n in names for p in n.split(".")):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:  # m = dcp_metadata
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torch_names:
                torch_names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr.startswith("__"):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        private = node.attr.startswith("_")
        if (private and isinstance(root, ast.Name) and root.id in torch_names) or (
            node.attr in PRIVATE_METHODS
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_no_private_torch_api_outside_torch_compat():
    compat = ROOT / "mmfm" / "core" / "torch_compat.py"
    assert _private_torch_uses(compat), "the scanner finds nothing even in torch_compat.py"
    found = [
        use
        for path in sorted((ROOT / "mmfm").rglob("*.py"))
        if path != compat
        for use in _private_torch_uses(path)
    ]
    assert not found, f"private torch APIs outside mmfm/core/torch_compat.py: {found}"


# -- DCP metadata --------------------------------------------------------------------------------


class _RecordingUnpickler(pickle.Unpickler):
    """A plain unpickler (the checkpoint is this test's own) that notes every global."""

    def __init__(self, f):
        super().__init__(f)
        self.globals: dict[tuple[str, str], object] = {}

    def find_class(self, module, name):
        self.globals[(module, name)] = obj = super().find_class(module, name)
        return obj


def test_dcp_private_globals_are_those_a_real_checkpoint_pickles(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2, dtype=torch.half)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, checkpoint_id=tmp_path)
    with open(tmp_path / ".metadata", "rb") as f:
        unpickler = _RecordingUnpickler(f)
        metadata = unpickler.load()
    private = {k: v for k, v in unpickler.globals.items() if k[1].startswith("_")}
    assert private == tc.dcp_private_pickle_globals()
    assert metadata.storage_data
    assert all(isinstance(info, tc.DcpStorageInfo) for info in metadata.storage_data.values())
    assert tc.DcpMemoryFormat in unpickler.globals.values() and list(tc.DcpMemoryFormat)

    reader = SafeFileSystemReader(tmp_path)  # the shims at work: the untrusting reader
    assert set(reader.read_metadata().state_dict_metadata) == set(tensors)
    loaded = {k: torch.zeros_like(v) for k, v in tensors.items()}
    load_tensors(loaded, reader)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


# -- activation checkpointing --------------------------------------------------------------------


def test_checkpoint_wrapper_recomputes_and_matches_the_plain_module():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
    inner = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
    calls = []
    inner[0].register_forward_hook(lambda *_: calls.append(1))
    wrapped = tc.checkpoint_wrapper(inner, preserve_rng_state=False)
    assert set(wrapped.state_dict()) == set(plain.state_dict())  # names survive the wrapper
    wrapped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6)
    out_plain, out_wrapped = plain(x), wrapped(x)
    torch.testing.assert_close(out_wrapped, out_plain, rtol=0, atol=0)
    out_plain.square().sum().backward()
    out_wrapped.square().sum().backward()
    assert len(calls) == 2, "the forward is run again in the backward pass"
    for name, p in plain.named_parameters():
        torch.testing.assert_close(wrapped.get_parameter(name).grad, p.grad, rtol=1e-6, atol=1e-7)


# -- kernels -------------------------------------------------------------------------------------


def _reference_attention(q, k, v, causal, mask):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("case", ["full", "causal", "masked"])
def test_cpu_flash_attention_matches_sdpa_and_its_gradients(case):
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(4))
    causal = case == "causal"
    mask = None
    if case == "masked":
        mask = torch.rand(6, 6, generator=g) > 0.4
        mask |= torch.eye(6, dtype=torch.bool)  # every row sees something
    bias = None if mask is None else torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
    out, lse = tc.cpu_flash_attention(q, k, v, causal, attn_mask=bias)
    ref_out, ref_lse = _reference_attention(q, k, v, causal, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)

    grads = tc.cpu_flash_attention_backward(dout, q, k, v, out, lse, causal, attn_mask=bias)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, sdpa.detach(), rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(sdpa, leaves, dout)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_foreach_norm_and_mul_match_per_tensor_ops():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g), torch.zeros(2)]
    norms = tc.foreach_norm(tensors)
    for n, t in zip(norms, tensors, strict=True):
        torch.testing.assert_close(n, torch.linalg.vector_norm(t))
    total = torch.stack(norms).square().sum().sqrt()
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(tensors))

    expected = [t * 0.25 for t in tensors]
    storage = [t.data_ptr() for t in tensors]
    tc.foreach_mul_(tensors, torch.tensor(0.25))
    assert [t.data_ptr() for t in tensors] == storage  # in place
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sharded_mesh_dims_counts_strided_shards():
    placements = [Replicate(), Shard(0), Partial(), _StridedShard(0, split_factor=2), Shard(1)]
    assert tc.sharded_mesh_dims(placements) == (1, 3, 4)
    assert tc.sharded_mesh_dims([Replicate(), Partial()]) == ()


# -- collectives and meshes (2 gloo ranks, one spawn) --------------------------------------------


def _distributed_shims() -> dict:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {}

    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    dp_tp = tc.flatten_mesh(mesh["dp", "tp"], "dp_tp")
    pp_tp = tc.flatten_mesh(mesh["pp", "tp"], "pp_tp")
    total = torch.tensor(float(rank + 1))
    dist.all_reduce(total, group=dp_tp.get_group())
    out["flatten"] = (
        dist.get_process_group_ranks(dp_tp.get_group()),
        dist.get_process_group_ranks(pp_tp.get_group()),
        dp_tp.mesh_dim_names,
        total.item(),
    )

    full = torch.arange(15.0).reshape(5, 3)  # 5 rows over 2 ranks: uneven shards
    line = init_device_mesh("cpu", (2,))
    out["shards"] = []
    for placements in ([Shard(0)], [Shard(1)], [Replicate()]):
        shape, offset = tc.compute_local_shape_and_global_offset(full.shape, line, placements)
        piece = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        public = distribute_tensor(full, line, placements).to_local()
        out["shards"].append(torch.equal(piece, public))

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, generator=g, requires_grad=True)
    w = torch.randn(4, 3, generator=g)  # a different loss on each rank
    gathered = tc.all_gather_single_autograd(x, 0, dist.group.WORLD)
    (gathered * w).sum().backward()
    pieces = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(pieces, x.detach())
    # d(sum over ranks of the loss)/dx: the rows of w that multiply x, summed over ranks.
    dist.all_reduce(w)
    expected = w[2 * rank : 2 * rank + 2]
    out["gather"] = (torch.equal(gathered, torch.cat(pieces)), torch.allclose(x.grad, expected))
    return out


@pytest.mark.slow  # two spawned ranks that import torch and build meshes: 40 s on 2 loaded cores
def test_collective_and_mesh_shims_match_public_equivalents():
    results = run_distributed(_distributed_shims, 2)
    for rank, r in enumerate(results):
        assert r["flatten"] == ([0, 1], [rank], ("dp_tp",), 3.0)
        assert r["shards"] == [True, True, True]
        assert r["gather"] == (True, True)


# -- DataLoader workers ---------------------------------------------------------------------------


class _Slow(torch.utils.data.IterableDataset):
    """Yields one item, then waits until the file `go` exists, which the test writes once it
    has the first item ("die": then exits its worker, a killed one) or once it has seen the
    timeout ("stall": a stalled shard, until then)."""

    def __init__(self, then: str, go: Path):
        self.then, self.go = then, go

    def __iter__(self):
        import os
        import time

        yield 1
        while not self.go.exists():
            time.sleep(0.01)
        if self.then == "die":
            os._exit(3)
        yield 2


@pytest.mark.parametrize("then", ["stall", "die"])
def test_dataloader_worker_shims_see_the_workers_and_their_failures(then, tmp_path):
    # a death is seen by torch's SIGCHLD handler, or at the end of the wait where mmfm's loader
    # took the handler away (iter_without_sigchld_handler) earlier in this process
    timeout = 1 if then == "stall" else 5
    go = tmp_path / "go"
    loader = torch.utils.data.DataLoader(
        _Slow(then, go), batch_size=None, num_workers=1, timeout=timeout
    )
    items = iter(loader)
    assert next(items) == 1
    (worker,) = tc.dataloader_workers(items)
    if then == "die":
        go.touch()
    with pytest.raises(RuntimeError) as error:
        next(items)
    go.touch()
    assert tc.dataloader_failure(error.value) == ("timeout" if then == "stall" else "worker_died")
    tc.shutdown_dataloader_workers(items)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert tc.dataloader_failure(RuntimeError("something else")) is None
    assert tc.dataloader_workers(iter(torch.utils.data.DataLoader([1, 2]))) == []


def test_an_iterator_without_the_sigchld_handler_leaves_none_installed(monkeypatch):
    import signal

    def torchs(handler) -> bool:
        return getattr(handler, "__module__", "") == "torch.utils.data._utils.signal_handling"

    # As in a fresh process: torch sets its handler once (a module flag), so a worker that ran
    # mmfm's loader earlier (which takes the handler away) would not get it back below.
    monkeypatch.setattr(torch.utils.data._utils.signal_handling, "_SIGCHLD_handler_set", False)
    loader = torch.utils.data.DataLoader([1, 2], batch_size=None, num_workers=1)
    plain = iter(loader)  # torch installs its handler here, once per process
    assert torchs(signal.getsignal(signal.SIGCHLD)) or torch.utils.data._utils.IS_WINDOWS
    items = tc.iter_without_sigchld_handler(loader)
    assert list(items) == [1, 2]
    assert not torchs(signal.getsignal(signal.SIGCHLD))
    tc.shutdown_dataloader_workers(plain)


def test_disable_autograd_cache_turns_off_the_config_dynamo_reads():
    import torch._functorch.config as functorch_config

    with functorch_config.patch(enable_autograd_cache=True):  # restored after the test
        tc.disable_autograd_cache()
        assert functorch_config.enable_autograd_cache is False
