"""``BlockMask``: chosen lines -> the key blocks and single columns each query block visits.

Layout (MInference's, in CSR form, one row per ``(head, query block)`` pair,
row index ``h * n_qblocks + b``):

* ``block_indptr[H*nqb + 1]``, ``block_indices[nnz]``: the key blocks (of
  ``block_size`` keys, aligned at key 0) the pair visits, ascending.  Causality
  inside a block is the kernel's job (key position <= query position).
* ``col_indptr[H*nqb + 1]``, ``col_indices[ncols]``: single key columns
  outside the visited blocks, ascending.  They always lie before the query
  block's first position, so every row of the block sees all of them.

A diagonal ``delta`` crosses at most two key blocks within a query block; a
column falls in one key block.  A key block in which at least
``promote_columns`` columns were chosen is visited whole: one dense block is
cheaper than many gathered columns.  The query block's own diagonal blocks
are always visited, so each query sees itself.

Query block ``b`` holds new queries ``b*bs .. min((b+1)*bs, n_new) - 1`` at
positions ``n_ctx - n_new + row``.  The same CSR arrays feed the gather kernel,
the Triton kernel and FlashInfer's paged prefill (one request per pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .select import VerticalSlashLines


def query_block_span(n_new: int, n_ctx: int, block_size: int, device=None):
    """First and last absolute position of each query block: two ``[n_qblocks]`` tensors."""
    first = n_ctx - n_new + torch.arange(-(-n_new // block_size), device=device) * block_size
    return first, (first + block_size).clamp(max=n_ctx) - 1


def per_key_block(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """View ``[..., n_ctx]`` as ``[..., n_kblocks, block_size]``, zero-padding a ragged last block."""
    pad = -x.shape[-1] % block_size
    x = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return x.view(*x.shape[:-1], -1, block_size)


def _csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of a ``[R, C]`` bool matrix: ``indptr[R+1]`` and ascending column ids."""
    counts = mask.sum(-1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    indptr[1:] = counts.cumsum(0)
    return indptr, mask.nonzero()[:, 1].to(torch.int32)


@dataclass
class BlockMask:
    block_indptr: torch.Tensor
    block_indices: torch.Tensor
    col_indptr: torch.Tensor
    col_indices: torch.Tensor
    num_heads: int
    n_new: int
    n_ctx: int
    block_size: int

    @property
    def n_qblocks(self) -> int:
        return -(-self.n_new // self.block_size)

    @property
    def n_kblocks(self) -> int:
        return -(-self.n_ctx // self.block_size)

    @property
    def offset(self) -> int:
        """Position of the first new query."""
        return self.n_ctx - self.n_new

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_lines(cls, lines: VerticalSlashLines, promote_columns: int | None = None) -> "BlockMask":
        n_heads, n_qb, n_ctx = lines.columns.shape
        bs, n_new = lines.block_size, lines.n_new
        dev = lines.columns.device
        n_kb = -(-n_ctx // bs)
        promote = bs // 2 if promote_columns is None else promote_columns
        q_first, q_last = query_block_span(n_new, n_ctx, bs, dev)
        delta = torch.arange(n_ctx, device=dev)
        # Key block of the first and last key a diagonal touches; a diagonal
        # that lies wholly before key 0 goes to the dump slot n_kb.
        k_hi = q_last[:, None] - delta[None, :]
        k_lo = (q_first[:, None] - delta[None, :]).clamp(min=0)
        dump = torch.full_like(k_hi, n_kb)
        kb_hi = torch.where(k_hi >= 0, k_hi // bs, dump)
        kb_lo = torch.where(k_hi >= 0, k_lo // bs, dump)

        hits = torch.zeros(n_heads, n_qb, n_kb + 1, device=dev)
        diag = lines.diagonals.float()
        hits.scatter_add_(2, kb_lo.expand(n_heads, -1, -1), diag)
        hits.scatter_add_(2, kb_hi.expand(n_heads, -1, -1), diag)
        blocks = hits[..., :n_kb] > 0
        # The query block's own diagonal blocks, always.
        own = torch.arange(n_kb, device=dev)
        blocks |= (own[None, :] >= (q_first // bs)[:, None]) & (own[None, :] <= (q_last // bs)[:, None])

        # Columns strictly before the query block; later ones are in its own
        # (visited) diagonal blocks or in its future.
        cols = lines.columns & (delta[None, None, :] < q_first[None, :, None])
        blocks |= per_key_block(cols, bs).sum(-1) >= promote
        cols &= ~blocks.repeat_interleave(bs, dim=-1)[..., :n_ctx]

        return cls._from_dense(blocks, cols, n_new, n_ctx, bs)

    @classmethod
    def dense(cls, num_heads: int, n_new: int, n_ctx: int, block_size: int, device=None) -> "BlockMask":
        """Every causal block: attention over everything (``alpha == 1``)."""
        n_qb, n_kb = -(-n_new // block_size), -(-n_ctx // block_size)
        _, q_last = query_block_span(n_new, n_ctx, block_size, device)
        blocks = torch.arange(n_kb, device=device)[None, :] <= (q_last // block_size)[:, None]
        blocks = blocks.expand(num_heads, -1, -1)
        cols = torch.zeros(num_heads, n_qb, n_ctx, dtype=torch.bool, device=device)
        return cls._from_dense(blocks, cols, n_new, n_ctx, block_size)

    @classmethod
    def _from_dense(cls, blocks, cols, n_new, n_ctx, bs) -> "BlockMask":
        n_heads = blocks.shape[0]
        bi, bx = _csr(blocks.reshape(-1, blocks.shape[-1]))
        ci, cx = _csr(cols.reshape(-1, n_ctx))
        return cls(bi, bx, ci, cx, n_heads, n_new, n_ctx, bs)

    # ----------------------------------------------------------------- views
    def pair_blocks(self) -> torch.Tensor:
        """``[H, nqb, nkb]`` bool: key blocks visited per pair."""
        rows = torch.repeat_interleave(
            torch.arange(self.num_heads * self.n_qblocks, device=self.block_indptr.device),
            (self.block_indptr[1:] - self.block_indptr[:-1]).long())
        out = torch.zeros(self.num_heads * self.n_qblocks, self.n_kblocks, dtype=torch.bool,
                          device=self.block_indptr.device)
        out[rows, self.block_indices.long()] = True
        return out.view(self.num_heads, self.n_qblocks, self.n_kblocks)

    def pair_keys_dense(self) -> torch.Tensor:
        """``[H*nqb, n_ctx]`` bool: keys each pair visits, up to its last query's position."""
        bs, H, nqb = self.block_size, self.num_heads, self.n_qblocks
        dev = self.block_indptr.device
        keys = self.pair_blocks().repeat_interleave(bs, dim=-1)[..., : self.n_ctx]
        keys = keys.reshape(H * nqb, self.n_ctx).clone()
        rows = torch.repeat_interleave(torch.arange(H * nqb, device=dev),
                                       (self.col_indptr[1:] - self.col_indptr[:-1]).long())
        keys[rows, self.col_indices.long()] = True
        _, q_last = query_block_span(self.n_new, self.n_ctx, bs, dev)
        keys &= torch.arange(self.n_ctx, device=dev)[None, :] <= q_last.repeat(H)[:, None]
        return keys

    def key_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair, the ascending key positions it visits (CSR: ``indptr[H*nqb+1]``, ``keys``).

        Keys stop at the pair's last query position, so each list ends with
        the query block's own positions: a kernel that aligns causality to
        the bottom right of each list (FlashInfer) is then exact.
        """
        keys = self.pair_keys_dense()
        indptr = torch.zeros(keys.shape[0] + 1, dtype=torch.long, device=keys.device)
        indptr[1:] = keys.sum(-1).cumsum(0)
        return indptr, keys.nonzero()[:, 1]

    def to_dense(self) -> torch.Tensor:
        """``[H, n_new, n_ctx]`` bool: exactly the (query, key) pairs computed."""
        bs, H, nqb = self.block_size, self.num_heads, self.n_qblocks
        keys = self.pair_keys_dense().view(H, nqb, 1, self.n_ctx).expand(H, nqb, bs, self.n_ctx)
        keys = keys.reshape(H, nqb * bs, self.n_ctx)[:, : self.n_new]
        qpos = self.offset + torch.arange(self.n_new, device=keys.device)
        return keys & (torch.arange(self.n_ctx, device=keys.device)[None, :] <= qpos[:, None])

    def computed_pairs(self) -> torch.Tensor:
        """``[H]``: number of causal (query, key) pairs each head computes."""
        bs, nqb, nkb = self.block_size, self.n_qblocks, self.n_kblocks
        dev = self.block_indptr.device
        # Causal cells of query block b x key block c, in closed form per row.
        rows = torch.arange(self.n_new, device=dev)
        qpos = self.offset + rows
        k0 = torch.arange(nkb, device=dev) * bs
        k1 = (k0 + bs).clamp(max=self.n_ctx)
        per_row = ((qpos[:, None] + 1).minimum(k1[None, :]) - k0[None, :]).clamp(min=0)  # [n_new, nkb]
        cells = torch.zeros(nqb, nkb, dtype=torch.long, device=dev).index_add_(0, rows // bs, per_row)
        block_cells = (self.pair_blocks().long() * cells).sum((1, 2))
        rows_in_qb = torch.bincount(rows // bs, minlength=nqb)  # [nqb]
        ncols = (self.col_indptr[1:] - self.col_indptr[:-1]).view(self.num_heads, nqb).long()
        return block_cells + (ncols * rows_in_qb).sum(-1)

    def causal_pairs(self) -> int:
        return int(self.n_new * (self.offset + 1) + self.n_new * (self.n_new - 1) // 2)

    def head_density(self) -> torch.Tensor:
        return self.computed_pairs().double() / self.causal_pairs()

    def density(self) -> float:
        return float(self.head_density().mean())
