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

from . import cpu_loops
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
    def from_lines(cls, lines: VerticalSlashLines, promote_columns: int | None = None,
                   method: str = "auto") -> "BlockMask":
        """Map each segment's lines to the blocks and columns of every query block.

        Work: per distinct span of segments (at most ``2 G``; a query block
        takes the union of the segments its rows span) a pass over its lines,
        then the block matrix ``[H, n_qblocks, n_kblocks]`` and the columns
        each query block keeps; nothing of size ``n_qblocks x n_ctx``.
        ``method``: ``"loops"`` (CPU, numba: one loop nest per head and span),
        ``"tensor"`` (batched tensor ops, any device) or ``"auto"``; the same
        mask either way.
        """
        bs, n_new, n_ctx = lines.block_size, lines.n_new, lines.n_ctx
        n_heads, n_seg = lines.lines.shape[:2]
        dev = lines.lines.device
        n_qb, n_kb = -(-n_new // bs), -(-n_ctx // bs)
        offset = n_ctx - n_new
        promote = bs // 2 if promote_columns is None else promote_columns
        if method == "auto":
            method = "loops" if dev.type == "cpu" and cpu_loops.available() else "tensor"
        if method == "loops":
            blocks, col_indptr, col_indices = cpu_loops.block_mask_arrays(
                lines.lines, lines.counts, lines.block_segments(), n_new, n_ctx, bs, promote)
            block_indptr, block_indices = _csr(blocks)
            return cls(block_indptr, block_indices, col_indptr, col_indices, n_heads, n_new, n_ctx, bs)
        if method != "tensor":
            raise ValueError(f"method must be 'auto', 'loops' or 'tensor', got {method!r}")
        q_first, q_last = query_block_span(n_new, n_ctx, bs, dev)
        kb = torch.arange(n_kb, device=dev)

        # The lines of each distinct span of segments: union of its segments'
        # bitmaps, from counts cumulated over the segments.
        g_lo, g_hi = lines.block_segments()
        spans, span_of_block = torch.unique(g_lo * n_seg + g_hi, return_inverse=True)
        cols_seg, diags_seg = lines.bitmaps()
        bits = torch.cat([cols_seg, diags_seg], dim=-1)  # [H, G, 2n]
        cum = torch.zeros(n_heads, n_seg + 1, 2 * n_ctx, dtype=torch.int16, device=dev)
        torch.cumsum(bits, dim=1, dtype=torch.int16, out=cum[:, 1:])
        span_bits = cum[:, spans % n_seg + 1] > cum[:, spans // n_seg]  # [H, U, 2n]
        cols, diags = span_bits[..., :n_ctx], span_bits[..., n_ctx:]

        # Diagonals.  In every query block but a ragged last one, diagonal
        # ``d`` touches key blocks ``b + floor((offset - d) / bs)`` and
        # ``b + floor((offset + bs - 1 - d) / bs)``: offsets relative to the
        # block, the same for every block of a span (negative blocks lie
        # before key 0).  Indexed by ``v = offset - d``, the first is the
        # aligned group of ``bs`` values holding ``v``, the second the group
        # holding ``v + bs - 1``: two ``any`` over a flipped, padded bitmap.
        r_min = (offset - (n_ctx - 1)) // bs
        n_rel = (offset + bs - 1) // bs - r_min + 1
        lead = (offset - n_ctx + 1) - r_min * bs  # position of v = offset - (n_ctx - 1)
        by_v = torch.zeros(n_heads, spans.numel(), (n_rel + 1) * bs, dtype=torch.bool, device=dev)
        by_v[..., bs - 1 + lead: bs - 1 + lead + n_ctx] = diags.flip(-1)
        rel = (by_v[..., bs - 1: bs - 1 + n_rel * bs].view(*by_v.shape[:2], n_rel, bs).any(-1)
               | by_v[..., : n_rel * bs].view(*by_v.shape[:2], n_rel, bs).any(-1))
        r = kb[None, :] - torch.arange(n_qb, device=dev)[:, None] - r_min  # [nqb, nkb]
        blocks = rel[:, span_of_block].gather(2, r.clamp(0, n_rel - 1).expand(n_heads, -1, -1))
        blocks &= ((r >= 0) & (r < n_rel))[None]
        # The last query block exactly (its last query may stop short of a block).
        last = n_qb - 1
        d = torch.arange(n_ctx, device=dev)
        hit = diags[:, span_of_block[last]] & (int(q_last[last]) - d >= 0)[None]  # [H, n]
        lo_block = ((int(q_first[last]) - d).clamp(min=0) // bs).expand(n_heads, -1)
        hi_block = ((int(q_last[last]) - d).clamp(min=0) // bs).expand(n_heads, -1)
        last_blocks = torch.zeros(n_heads, n_kb + 1, dtype=torch.bool, device=dev)
        for key in (lo_block, hi_block):
            last_blocks.scatter_(1, torch.where(hit, key, n_kb), True)
        blocks[:, last] = last_blocks[:, :n_kb]
        # The query block's own diagonal blocks, always.
        blocks |= (kb[None, :] >= (q_first // bs)[:, None]) & (kb[None, :] <= (q_last // bs)[:, None])

        # Columns strictly before the query block (later ones are in its own,
        # visited, diagonal blocks or in its future).  A key block holding at
        # least ``promote`` of them is visited whole.
        per_block = per_key_block(cols, bs).sum(-1, dtype=torch.int32)  # [H, U, nkb]
        before = kb[None, :] < (q_first // bs)[:, None]  # [nqb, nkb]: wholly before the block
        blocks |= (per_block[:, span_of_block] >= promote) & before[None]

        # The other columns, per pair: the span's columns before the block,
        # minus those in visited blocks.  ``flat`` lists every (head, span,
        # column) ascending, so each pair's columns are one slice of it.
        n_span = spans.numel()
        flat = cols.reshape(-1).nonzero().squeeze(1)
        base = ((torch.arange(n_heads, device=dev)[:, None] * n_span + span_of_block[None, :]) * n_ctx).view(-1)
        lo = torch.searchsorted(flat, base)
        hi = torch.searchsorted(flat, base + q_first.repeat(n_heads))
        pair = torch.repeat_interleave(torch.arange(n_heads * n_qb, device=dev), hi - lo)
        start = torch.zeros_like(lo)
        start[1:] = (hi - lo).cumsum(0)[:-1]
        key = flat[lo[pair] + torch.arange(pair.numel(), device=dev) - start[pair]] % n_ctx
        keep = ~blocks.view(n_heads * n_qb, n_kb)[pair, key // bs]
        pair, key = pair[keep], key[keep]
        col_indptr = torch.zeros(n_heads * n_qb + 1, dtype=torch.int32, device=dev)
        col_indptr[1:] = torch.bincount(pair, minlength=n_heads * n_qb).cumsum(0)
        block_indptr, block_indices = _csr(blocks.view(n_heads * n_qb, n_kb))
        return cls(block_indptr, block_indices, col_indptr, key.to(torch.int32), n_heads, n_new, n_ctx, bs)

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

    def _block_entries(self):
        """Per stored key block: ``(pair, key block)``, two ``[nnz]`` int64 tensors."""
        dev = self.block_indptr.device
        counts = (self.block_indptr[1:] - self.block_indptr[:-1]).long()
        pair = torch.repeat_interleave(torch.arange(self.num_heads * self.n_qblocks, device=dev), counts)
        return pair, self.block_indices.long()

    def _col_entries(self):
        """Per single column: ``(pair, key)``, two ``[ncols]`` int64 tensors."""
        dev = self.col_indptr.device
        counts = (self.col_indptr[1:] - self.col_indptr[:-1]).long()
        pair = torch.repeat_interleave(torch.arange(self.num_heads * self.n_qblocks, device=dev), counts)
        return pair, self.col_indices.long()

    def key_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair, the ascending key positions it visits (CSR: ``indptr[H*nqb+1]``, ``keys``).

        Keys stop at the pair's last query position, so each list ends with
        the query block's own positions: a kernel that aligns causality to
        the bottom right of each list (FlashInfer) is then exact.  Built from
        the CSR: ``block_size`` keys per stored block, plus the columns.
        """
        bs, dev = self.block_size, self.block_indptr.device
        n_pairs = self.num_heads * self.n_qblocks
        _, q_last = query_block_span(self.n_new, self.n_ctx, bs, dev)
        pair, block = self._block_entries()
        key = (block[:, None] * bs + torch.arange(bs, device=dev)[None, :]).view(-1)
        pair = pair.repeat_interleave(bs)
        keep = key <= q_last[pair % self.n_qblocks]
        col_pair, col = self._col_entries()
        pair = torch.cat([pair[keep], col_pair])
        key = torch.cat([key[keep], col])
        order = torch.argsort(pair * self.n_ctx + key)
        indptr = torch.zeros(n_pairs + 1, dtype=torch.long, device=dev)
        indptr[1:] = torch.bincount(pair, minlength=n_pairs).cumsum(0)
        return indptr, key[order]

    def to_dense(self) -> torch.Tensor:
        """``[H, n_new, n_ctx]`` bool: exactly the (query, key) pairs computed."""
        bs, H, nqb = self.block_size, self.num_heads, self.n_qblocks
        keys = self.pair_keys_dense().view(H, nqb, 1, self.n_ctx).expand(H, nqb, bs, self.n_ctx)
        keys = keys.reshape(H, nqb * bs, self.n_ctx)[:, : self.n_new]
        qpos = self.offset + torch.arange(self.n_new, device=keys.device)
        return keys & (torch.arange(self.n_ctx, device=keys.device)[None, :] <= qpos[:, None])

    def computed_pairs(self) -> torch.Tensor:
        """``[H]``: number of causal (query, key) pairs each head computes (closed form per stored
        block and column; nothing dense)."""
        bs, nqb, dev = self.block_size, self.n_qblocks, self.block_indptr.device
        q_first, q_last = query_block_span(self.n_new, self.n_ctx, bs, dev)

        def reaching(pair, x):
            """``sum over the pair's queries q of max(q + 1 - x, 0)``: its causal cells at keys >= x."""
            qf, ql = q_first[pair % nqb], q_last[pair % nqb]
            lo = torch.maximum(qf, x)
            m = (ql - lo + 1).clamp(min=0)
            return m * ((lo + 1 - x) + (ql + 1 - x)) // 2

        pair, block = self._block_entries()
        k0 = block * bs
        cells = reaching(pair, k0) - reaching(pair, (k0 + bs).clamp(max=self.n_ctx))
        col_pair, _ = self._col_entries()
        rows = (q_last - q_first + 1)[col_pair % nqb]  # every row of the block sees its columns
        out = torch.zeros(self.num_heads, dtype=torch.long, device=dev)
        out.index_add_(0, pair // nqb, cells)
        out.index_add_(0, col_pair // nqb, rows)
        return out

    def causal_pairs(self) -> int:
        return int(self.n_new * (self.offset + 1) + self.n_new * (self.n_new - 1) // 2)

    def head_density(self) -> torch.Tensor:
        return self.computed_pairs().double() / self.causal_pairs()

    def density(self) -> float:
        return float(self.head_density().mean())
