"""Prefix caching: the keys and values of prompt prefixes a policy version
has prefilled, kept for later prompts that begin the same way.

RLHF prompts repeat their beginnings: a chat template and system prompt
before every question, and PPO's epochs over the same prompt set. A prompt
that finds its first blocks here starts its prefill after them: those
columns' keys and values are copied into its prefill cache instead of
computed (``arbiter.policy.batch``), as vLLM's automatic prefix caching and
SGLang's radix cache do.

The unit is a block of ``block_tokens`` prompt tokens, keyed by its parent
block (the one before it, or none) and its own tokens, so a block stands for
the whole prefix up to its end and a lookup is exact (no hash can collide).
A prompt uses at most its tokens but the last: the last position's logits
are what its first sample is drawn from, so at least one column is always
computed. Keys and values are stored per layer in one pool of
``capacity_tokens`` token slots, allocated at the first insert with the
model's dtype and device; when full, the least recently used block whose
prefix no other block extends goes first (each use or insert of a chain
touches it from its last block to its first, so a block is never older than
the blocks after it, and the oldest is always a leaf).

Keys and values depend only on the tokens before them and their positions
(a prompt's first token is position 0 however it is padded), so a prompt's
cached prefix is the one it would compute, up to float rounding (another
batch's kernels may sum in another order).

One per model (version): the cache goes with the version. Not thread-safe:
the model thread uses it, one decoding step at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

_ROOT = -1  # the parent of a prompt's first block


class PrefixCache:
    def __init__(self, capacity_tokens: int, block_tokens: int):
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        # (parent slot, the block's tokens) -> its slot; least recently used first.
        self._slots: OrderedDict[tuple[int, tuple[int, ...]], int] = OrderedDict()
        self._free: list[int] = []
        self._keys: list = []  # per layer: (capacity_blocks * block_tokens, heads, head dim)
        self._values: list = []

    @property
    def layers(self) -> int:
        """Layers held (0 until the first insert)."""
        return len(self._keys)

    @property
    def held_tokens(self) -> int:
        return len(self._slots) * self.block_tokens

    def match(self, prompt: Sequence[int]) -> list[int]:
        """The slots of ``prompt``'s longest cached prefix of whole blocks,
        short of its last token (touched: used now)."""
        chain = self._held(prompt[: len(prompt) - 1])
        self._touch([key for key, _ in chain])
        return [slot for _, slot in chain]

    def held_blocks(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens``' whole blocks, from the first, are held (not touched)."""
        return len(self._held(tokens))

    def gather(self, layer: int, chains: Sequence[Sequence[int]], starts: Sequence[int], width: int):
        """Layer ``layer``'s (keys, values) for a prefill cache of
        ``width`` columns: row r's prompt starts at column ``starts[r]``
        (left padding before it, zeros) and its cached tokens follow,
        ``chains[r]``'s slots, as many as fit before ``width``. Shape
        (rows, heads, width, head dim) each."""
        import torch

        size = self.block_tokens
        rows, cols, tokens = [], [], []
        for r, (chain, start) in enumerate(zip(chains, starts, strict=True)):
            count = max(0, width - start)
            rows.extend([r] * count)
            cols.extend(range(start, start + count))
            for b in range(0, count, size):
                first = chain[b // size] * size
                tokens.extend(range(first, first + min(size, count - b)))
        pool_keys, pool_values = self._keys[layer], self._values[layer]
        device = pool_keys.device
        rows_t, cols_t, tokens_t = (torch.tensor(x, dtype=torch.long, device=device) for x in (rows, cols, tokens))
        out = []
        for pool in (pool_keys, pool_values):
            states = pool.new_zeros((len(chains), pool.shape[1], width, pool.shape[2]))
            # (tokens, heads, dim) into (row, :, column): advanced indices around a slice put theirs first.
            states[rows_t, :, cols_t] = pool[tokens_t]
            out.append(states)
        return out[0], out[1]

    def insert(self, prompts: Sequence[Sequence[int]], starts: Sequence[int], layers: Sequence[tuple]) -> int:
        """Every whole block of each of ``prompts`` not held yet, from a
        prefill cache: ``layers`` per layer (keys, values), each of shape
        (prompts, heads, columns, head dim), prompt r's tokens from column
        ``starts[r]``. Returns the blocks added."""
        import torch

        if self.capacity_blocks == 0:
            return 0
        if not self._keys:
            self._allocate(layers)
        size = self.block_tokens
        rows, cols, tokens = [], [], []
        for r, (prompt, start) in enumerate(zip(prompts, starts, strict=True)):
            chain: list[int] = []
            chain_keys = []
            parent = _ROOT
            for begin in range(0, len(prompt) - size + 1, size):
                key = (parent, tuple(prompt[begin : begin + size]))
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._take_slot(protected=chain)
                    if slot is None:
                        break  # the cache holds nothing but this prompt's chain
                    self._slots[key] = slot
                    rows.extend([r] * size)
                    cols.extend(range(start + begin, start + begin + size))
                    tokens.extend(range(slot * size, slot * size + size))
                else:
                    self._slots.move_to_end(key)
                chain.append(slot)
                chain_keys.append(key)
                parent = slot
            self._touch(chain_keys)
        if tokens:
            device = self._keys[0].device
            rows_t, cols_t, tokens_t = (torch.tensor(x, dtype=torch.long, device=device)
                                        for x in (rows, cols, tokens))
            for layer, (keys, values) in enumerate(layers):
                self._keys[layer][tokens_t] = keys[rows_t, :, cols_t]
                self._values[layer][tokens_t] = values[rows_t, :, cols_t]
        return len(tokens) // size

    def _allocate(self, layers: Sequence[tuple]) -> None:
        slots = self.capacity_blocks * self.block_tokens
        for keys, values in layers:
            self._keys.append(keys.new_zeros((slots, keys.shape[1], keys.shape[3])))
            self._values.append(values.new_zeros((slots, values.shape[1], values.shape[3])))
        self._free = list(range(self.capacity_blocks - 1, -1, -1))

    def _take_slot(self, protected: Sequence[int]) -> int | None:
        """A free slot, else the least recently used block's, unless that is
        one of ``protected`` (the chain being inserted: then the cache is full of it)."""
        if self._free:
            return self._free.pop()
        if not self._slots:
            return None
        key, slot = next(iter(self._slots.items()))
        if slot in protected:
            return None
        del self._slots[key]
        return slot

    def _held(self, tokens: Sequence[int]) -> list[tuple[tuple[int, tuple[int, ...]], int]]:
        """(key, slot) of each of ``tokens``' whole blocks held, from the first."""
        chain, parent, size = [], _ROOT, self.block_tokens
        for start in range(0, len(tokens) - size + 1, size):
            key = (parent, tuple(tokens[start : start + size]))
            slot = self._slots.get(key)
            if slot is None:
                break
            chain.append((key, slot))
            parent = slot
        return chain

    def _touch(self, chain: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        """A chain's blocks (keys, first block first) used now, its last block
        first, so every block stays at least as recent as those after it."""
        for key in reversed(chain):
            self._slots.move_to_end(key)
