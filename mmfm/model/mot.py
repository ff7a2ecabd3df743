"""Mixture-of-Transformers routing (Liang et al. 2024, arXiv 2411.04996).

Each group of modalities (`model.mot.groups`) has its own norms, feed-forward and (unless
`share_attention`) q/k/v/o projections; attention runs over every token of the row with the
usual document masks, so modalities still see each other. A token's group follows from the
vocabulary range of its input id (`token_groups`). Once per forward the tokens are sorted
into contiguous group blocks (`Routing`): the residual stream stays in that order through
every block (`mmfm.model.transformer.MotBlock`), each group's weights run on a slice of it,
and only the attention's q/k/v (and its output) travel back to row order and forth, one
gather each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmfm.model.attention import permute_rows


def token_groups(id_groups: list[tuple[int, int]], tokens: torch.Tensor) -> torch.Tensor:
    """The group index of every token id, `[batch, seq]`, from (first id, group) ranges."""
    groups = torch.full_like(tokens, id_groups[0][1])
    for start, group in id_groups[1:]:
        groups = torch.where(tokens >= start, group, groups)
    return groups


@dataclass(frozen=True)
class Routing:
    """Where every token of a batch sits once the tokens are sorted by group."""

    counts: list[int]
    """Tokens of each group, in group order."""
    perm: torch.Tensor | None
    """Flat token indices (into batch*seq) in group order; None with one group."""
    inverse: torch.Tensor | None
    """The permutation that puts grouped tokens back in row order."""

    @staticmethod
    def of(groups: torch.Tensor, n_groups: int) -> Routing:
        """The routing of per-token group indices `groups` (one host sync: the counts)."""
        if n_groups == 1:
            return Routing([groups.numel()], None, None)
        flat = groups.flatten()
        perm = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_groups).tolist()
        assert len(counts) == n_groups, f"a token's group is outside the {n_groups} groups"
        return Routing(counts, perm, torch.argsort(perm))

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Row-order tokens `[..., C]` -> grouped `[tokens, C]` (identity with one group)."""
        if self.perm is None:
            return x
        return permute_rows(x.reshape(-1, x.shape[-1]), self.perm, self.inverse)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped tokens -> row order, `[tokens, C]` (identity with one group)."""
        if self.perm is None:
            return x
        return permute_rows(x.reshape(-1, x.shape[-1]), self.inverse, self.perm)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Grouped tokens -> one slice per group (the whole tensor with one group)."""
        if self.perm is None:
            return [x]
        return list(x.reshape(-1, x.shape[-1]).split(self.counts))


def upcycled_name(name: str) -> str:
    """The dense parameter that MoT parameter `name` starts from when a dense checkpoint is
    upcycled: a group's weights are the dense block's (`layers.3.groups.vision.attention.wq`
    <- `layers.3.attention.wq`); every other name is the dense one."""
    parts = name.split(".")
    if len(parts) > 4 and parts[0] == "layers" and parts[2] == "groups":
        return ".".join([*parts[:2], *parts[4:]])
    return name


def upcycle_rounds(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A MoT model's state dict as dicts keyed by dense names, one load of a dense checkpoint
    each (DCP fills one tensor per name and load): the first holds every weight outside the
    groups and the first group's, each next one another group's. The tensors are the state's
    own, so the loads fill the model in place, whatever its sharding."""
    rounds: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        group = parts[3] if upcycled_name(name) != name else ""
        rounds.setdefault(group, {})[upcycled_name(name)] = tensor
    first = rounds.pop("", {})
    groups = list(rounds.values())
    return [{**first, **groups[0]}, *groups[1:]] if groups else [first]
