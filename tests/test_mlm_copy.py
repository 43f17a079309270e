"""bench.mlm_copy's grouping of masked positions: copyable from their own sequence or not."""

from __future__ import annotations

import torch

from bench.mlm_copy import GROUPS, copy_groups
from hypermixer.heads import IGNORE_INDEX

MASK = 4
X = IGNORE_INDEX  # not a target


def test_positions_are_grouped_by_whether_their_token_is_visible_elsewhere_in_the_sequence():
    frequent = torch.zeros(50, dtype=torch.bool)
    frequent[10] = True  # token 10 is "frequent"
    # sequence 0: 20 masked at 1 and visible at 3 (repeated, rare); 10 masked at 2, visible at 4 (frequent);
    # 30 masked at 5, nowhere else (not repeated); 21 masked at 0 and kept as itself (10% rule): only its own
    # position shows it, so it is not repeated.
    # sequence 1: 20 masked at 0 only: the 20 in sequence 0 does not count.
    input_ids = torch.tensor([[21, MASK, MASK, 20, 10, MASK], [MASK, 7, 8, 9, 11, 12]])
    labels = torch.tensor([[21, 20, 10, X, X, 30], [20, X, X, X, X, X]])
    groups = copy_groups(input_ids, labels, frequent)
    named = [GROUPS[g] for g in groups.tolist()]
    assert named == ["not repeated", "repeated, rare", "repeated, frequent", "not repeated", "not repeated"]


def test_a_masked_copy_elsewhere_is_not_visible():
    frequent = torch.zeros(50, dtype=torch.bool)
    input_ids = torch.tensor([[MASK, MASK, 5]])
    labels = torch.tensor([[20, 20, X]])  # both 20s masked: neither can be copied
    assert copy_groups(input_ids, labels, frequent).tolist() == [2, 2]
