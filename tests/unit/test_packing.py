"""Packing rows: invariants of RowBuilder and both Packer modes."""

import numpy as np
import pytest

from mmfm.core.types import IGNORE_INDEX, Document
from mmfm.data.packing import Packer, Pending, RowBuilder, modality_weight_table

IGNORE = IGNORE_INDEX


def doc(tokens, modality=None, no_loss=()):
    tokens = np.asarray(tokens, dtype=np.int64)
    modality = (
        np.zeros(len(tokens), np.uint8) if modality is None else np.asarray(modality, np.uint8)
    )
    return Document(tokens, modality, "k", "test", tuple(no_loss))


def feeder(docs):
    queue = [Pending(d, (i,), source=i % 2) for i, d in enumerate(docs)]

    def pull():
        return queue.pop(0)

    return pull


def test_row_builder_positions_labels_and_padding():
    row = RowBuilder(8, modality_weight_table({}))
    row.add(doc([10, 11, 12]), 0, 3)
    row.add(doc([20]), 0, 1)
    out = row.finish()
    assert out["tokens"].tolist() == [10, 11, 12, 20, 0, 0, 0, 0]
    assert out["doc_ids"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert out["positions"].tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert out["labels"].tolist() == [11, 12, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
    assert out["loss_weights"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_target_modality_weights_and_no_loss_spans():
    # <s> prompt prompt | answer answer </s>: the prompt (tokens 1-2) is never a target.
    d = doc([1, 5, 6, 7, 8, 2], [0, 0, 0, 3, 3, 0], no_loss=[(1, 3)])
    row = RowBuilder(6, modality_weight_table({"dna": 0.5}))
    row.add(d, 0, 6)
    out = row.finish()
    assert out["modality"][:5].tolist() == [0, 0, 3, 3, 0]
    assert out["loss_weights"].tolist() == [0, 0, 0.5, 0.5, 1, 0]


def test_split_pieces_keep_predicting_the_next_token():
    packer = Packer(8, modality_weight_table({}), "best_fit", buffer=1)
    pull = feeder([doc(range(100, 120)), doc([1, 2]), doc([3] * 8)])
    rows = [packer.row(pull) for _ in range(3)]
    assert rows[0][0]["labels"].tolist() == list(range(101, 109))
    assert rows[1][0]["positions"].tolist() == list(range(8))
    assert rows[2][0]["tokens"][:4].tolist() == list(range(116, 120))
    assert rows[2][0]["labels"][3] == IGNORE
    assert rows[0][1].split == 1 and rows[1][1].split == 0


def test_best_fit_fills_gaps_that_greedy_pads():
    sizes = (6, 5, 2, 3, 8, 1, 8, 8, 8, 8)
    weights = modality_weight_table({})
    greedy = Packer(8, weights, "greedy")
    best = Packer(8, weights, "best_fit", buffer=6)
    g_pull, b_pull = feeder([doc([7] * n) for n in sizes]), feeder([doc([7] * n) for n in sizes])
    # greedy, arrival order: [6] [5 2] [3] [8] -> 2 + 1 + 5 + 0 tokens of padding;
    # best fit starts with the oldest, then the largest that fits: [6 2] [5 3] [8] [1 ...]
    assert [greedy.row(g_pull)[1].pad for _ in range(4)] == [2, 1, 5, 0]
    assert [best.row(b_pull)[1].pad for _ in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("mode", ["best_fit", "greedy"])
def test_long_documents_dropped_and_counted(mode):
    packer = Packer(4, modality_weight_table({}), mode, buffer=2, long_docs="drop")
    pull = feeder([doc([1] * 9), doc([2, 2]), doc([3] * 5), doc([4, 4]), doc([5])])
    out, stats = packer.row(pull)
    assert stats.dropped == 2
    assert 1 not in out["tokens"] and 3 not in out["tokens"]


def test_tokens_are_counted_by_source():
    packer = Packer(8, modality_weight_table({}), "best_fit", buffer=2)
    _, stats = packer.row(feeder([doc([1, 1, 1]), doc([2, 2, 2, 2, 2]), doc([3] * 9)]))
    assert stats.tokens_by_source == {0: 3, 1: 5} and stats.docs == 2
