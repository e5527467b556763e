"""A prefix trie over SIDs stored as tensors, for constrained decoding.

Nodes are numbered breadth-first: internal nodes `0 .. num_internal-1` (the root is 0), leaves after them. The
dense table `children[node, code]` holds the child node id or -1, so the codes allowed after a batch of
prefixes are one gather (`allowed(nodes)`) and advancing a batch of beams is another (`step(nodes, codes)`);
no Python lookups per beam.

>>> import numpy as np
>>> trie = SidTrie.build(np.array([[0, 1], [0, 2], [3, 1]]), item_ids=np.array([10, 11, 12]), codebook_size=4)
>>> trie.allowed(torch.tensor([0])).int().tolist()
[[1, 0, 0, 1]]
>>> node = trie.step(torch.tensor([0]), torch.tensor([0]))
>>> trie.allowed(node).int().tolist()
[[0, 1, 1, 0]]
>>> trie.item_ids_of(trie.step(node, torch.tensor([2]))).tolist()
[11]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SidTrie:
    children: torch.Tensor
    """[num_internal, codebook_size] int32: child node id, or -1 where the code is not allowed."""
    leaf_item_ids: torch.Tensor
    """[num_leaves] int64: the item id at leaf node `num_internal + i`."""
    depth: int
    """Number of codes per SID."""
    codebook_size: int

    @property
    def num_internal(self) -> int:
        return int(self.children.shape[0])

    @classmethod
    def build(cls, codes: np.ndarray, item_ids: np.ndarray, codebook_size: int) -> SidTrie:
        """Build from unique code tuples `codes` [items, depth] and their `item_ids` [items]."""
        codes = np.asarray(codes, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != item_ids.shape[0] or codes.shape[0] == 0:
            raise ValueError(f"codes must be [items, depth] matching item_ids; got {codes.shape}, {item_ids.shape}")
        if codes.min() < 0 or codes.max() >= codebook_size:
            raise ValueError(f"codes must lie in [0, {codebook_size}); got [{codes.min()}, {codes.max()}]")
        depth = codes.shape[1]
        order = np.lexsort(codes.T[::-1])
        codes, item_ids = codes[order], item_ids[order]
        if depth and (np.diff(codes, axis=0) == 0).all(axis=1).any():
            dup = np.flatnonzero((np.diff(codes, axis=0) == 0).all(axis=1))[0]
            raise ValueError(f"items {item_ids[dup]} and {item_ids[dup + 1]} share the SID {codes[dup].tolist()}")
        # node id of every prefix, level by level (prefix of length 0 is the root)
        prefix_node = np.zeros(len(codes), dtype=np.int64)
        parents, child_codes, child_nodes = [], [], []
        next_id = 1
        for level in range(depth):
            prefix = codes[:, : level + 1]
            is_new = np.ones(len(codes), dtype=bool)
            is_new[1:] = (prefix[1:] != prefix[:-1]).any(axis=1)
            group = np.cumsum(is_new) - 1
            if level < depth - 1:
                ids = next_id + group
                next_id += int(group[-1]) + 1
            else:
                ids = group  # leaves: numbered after the internal nodes below
            parents.append(prefix_node[is_new])
            child_codes.append(codes[is_new, level])
            child_nodes.append(ids[is_new] if level < depth - 1 else None)
            prefix_node = ids
        num_internal = next_id
        children = np.full((num_internal, codebook_size), -1, dtype=np.int32)
        for level in range(depth):
            nodes = child_nodes[level] if level < depth - 1 else num_internal + np.arange(len(codes))
            children[parents[level], child_codes[level]] = nodes
        return cls(
            children=torch.from_numpy(children),
            leaf_item_ids=torch.from_numpy(item_ids.copy()),
            depth=depth,
            codebook_size=codebook_size,
        )

    def allowed(self, nodes: torch.Tensor) -> torch.Tensor:
        """[batch, codebook_size] bool: codes allowed after each prefix node."""
        return self.children[nodes] >= 0

    def step(self, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Child node of each (node, code); -1 where that code was not allowed."""
        return self.children[nodes, codes].long()

    def item_ids_of(self, leaves: torch.Tensor) -> torch.Tensor:
        """Item id of each leaf node."""
        index = leaves - self.num_internal
        if (index < 0).any() or (index >= len(self.leaf_item_ids)).any():
            raise ValueError("item_ids_of expects leaf nodes (reached after `depth` steps)")
        return self.leaf_item_ids[index]

    def to(self, device: torch.device | str) -> SidTrie:
        return SidTrie(self.children.to(device), self.leaf_item_ids.to(device), self.depth, self.codebook_size)
