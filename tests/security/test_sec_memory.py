"""Memory: a source of a few huge documents must not fill the stream's buffers with copies.

The stream runs in a subprocess under an address-space limit (`RLIMIT_AS`, set after the
imports), so an overrun is a `MemoryError` there, not a dead test run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmfm.core.types import Document
from mmfm.data.shards import write_shard

# One worker runs this file (make test: --dist loadgroup), so its module fixtures are built once.
pytestmark = pytest.mark.xdist_group("test_sec_memory")

DOCS, TOKENS = 3, 2_000_000  # 18 MB each once decoded (int64 ids, uint8 modality)
SEQ = 1 << 16
ROWS = 200  # about two epochs of the three documents
HEADROOM = 512 << 20
"""Address space allowed beyond what the imports took: the old buffers (64 + 32 decoded
copies, 1.7 GB) do not fit, three documents (54 MB) fit many times over."""

CHILD = """
import json, resource, sys
import numpy as np
from mmfm.config.schema import DataConfig, SourceConfig
from mmfm.data.settings import SourceSpec, StreamSettings
from mmfm.data.stream import VirtualStream

url, seq, headroom, rows = sys.argv[1], *map(int, sys.argv[2:5])
tokens_limit = sys.argv[5]
extra = {} if tokens_limit == "default" else {"shuffle_buffer_tokens": int(tokens_limit)}
data = DataConfig(seq_len=seq, **extra)  # buffers 64 and 32 docs
settings = StreamSettings.from_config(data, n_streams=1, seed=0, steps=1, vocab_size=0)
source = SourceSpec.from_config(SourceConfig(name="huge", paths=[url]), [url])
stream = VirtualStream(0, [source], settings)
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
seen = {}
for _ in range(rows):
    row, stats, skipped = stream.next_row()
    ids, counts = np.unique(row["tokens"][row["tokens"] > 0], return_counts=True)
    for i, n in zip(ids.tolist(), counts.tolist()):
        seen[i] = seen.get(i, 0) + n
held = [id(p.doc) for p in (*stream.shuffle, *stream.packer.buffer)]
print(json.dumps({"seen": seen, "held": len(held), "distinct": len(set(held))}))
"""


@pytest.fixture(scope="module")
def huge_shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge-000000.tar"
    docs = [
        Document(np.full(TOKENS, 100 + i, np.int64), np.zeros(TOKENS, np.uint8), f"d{i}")
        for i in range(DOCS)
    ]
    write_shard(path, docs)
    return str(path)


@pytest.mark.parametrize("tokens_limit", ["default", str(1 << 40)], ids=["default", "no_limit"])
def test_huge_documents_are_held_once_within_a_memory_limit(huge_shard, tokens_limit):
    # no_limit: the token bound out of the way, only "one copy per document" holds memory down
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    args = [huge_shard, str(SEQ), str(HEADROOM), str(ROWS), tokens_limit]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["held"] == out["distinct"] <= DOCS
    # every document came out as often as the others (give or take the one being read)
    seen = {int(k): v for k, v in out["seen"].items()}
    assert sorted(seen) == [100 + i for i in range(DOCS)]
    assert sum(seen.values()) > 0.9 * ROWS * SEQ  # a document's last piece pads its row
    assert max(seen.values()) - min(seen.values()) <= TOKENS
