"""A decoding batch: the rows of running generations of one policy version,
advanced together, one token per row per forward pass (continuous batching).

Generations join at a step boundary (their prompts are prefilled in one
forward and their rows added to the batch) and each row leaves the moment it
finishes, so a long sample never holds a short one back.

Chunked prefill: with ``prefill_chunk_tokens`` set, a step prefills at most
that many prompt tokens (rows x padded columns) besides decoding the running
rows, so long prompts joining cost the running rows a bounded delay per
token instead of one long stall: the joiners of a step form groups whose
left-padded prompts go through the model a chunk of columns per step, into a
cache of their own, and join the batch when their last column is done
(with ``prefill_group_cost_tokens`` set, prompts of very different lengths
go in separate groups, so a short one is not padded to a long one).
Chunks give the same keys, values and logits as one forward, up to float
rounding. Rows with the same prompt (a request's n samples; requests that
repeat a prompt) share its prefill: each distinct prompt of a group goes
through the model once, and its keys, values and last logits are copied to
every row that has it (n=4 samples of a prompt: a quarter of the prefill).
With a prefix cache (``arbiter.policy.prefix_cache``, one per version), a
group's prefill starts after the columns every one of its prompts finds
cached: those keys and values are copied in, not computed; when the group
joins, its prompts' blocks are added to the cache. A beginning that several
prompts of a step share and the cache lacks is computed once, first, as a
prompt of its own (into the cache only), when that saves more than it costs.

The KV cache is preallocated: per layer, keys and values of shape
(row slots, heads, columns, head dim), grown and compacted by copying only
when rows join or leave, never per token (a ``DynamicCache`` re-concatenates
the whole cache at every step, which on a CPU costs as much as the forward).
All rows write their next token into the same column, so every row's
sequence ends at that column and is left-padded before it (masked out; each
row's position ids are its own, so padding changes nothing it computes). The
attention window is the columns from the longest row's start to that column.
Rows live in slots 0..B-1: a leaving row's slot is refilled from the end.

A batch of NLPO-masked generations (one masking-policy version) runs the
masking policy's forward in lock-step with the policy's: same rows, same
tokens, same columns, its layers' buffers after the policy's in the same
slot lists, so growing, compacting and leaving treat both alike.

Each row samples with its own parameters and its own uniform stream
(``arbiter.policy.sampling``), so a row's tokens depend on nothing but its
own distributions. What sharing a forward can change is float rounding of the
logits (batched kernels may sum in another order): log-probs then differ in
the last bits, and a token only if a uniform lands within that rounding of a
CDF boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

from arbiter.lm import forward_step
from arbiter.policy.model import Generation, PolicyModel, Row
from arbiter.policy.prefix_cache import PrefixCache
from arbiter.policy.sampling import draw, sampling_logprobs, top_p_set

# Columns allocated past what the rows in the batch can still use, so a few
# later joiners do not force a copy at once.
_SLACK_COLUMNS = 16
_MIN_ROW_SLOTS = 4


class DecodeBatch:
    """Not thread-safe: ``step`` runs on the model thread, one call at a time."""

    def __init__(self, policy: PolicyModel, max_rows: int, mask_policy: PolicyModel | None = None,
                 prefill_chunk_tokens: int = 0, prefix_caches: tuple[PrefixCache, ...] | None = None,
                 prefill_group_cost_tokens: int = 0):
        self.policy = policy
        # The fixed cost of a prefill forward in prompt-token columns, for
        # splitting a step's joiners by length (0: one group a step).
        self.prefill_group_cost_tokens = prefill_group_cost_tokens
        # The policy's prefix cache and the masking policy's, if any; None: no prefix caching.
        self.prefix_caches = prefix_caches
        # Prompt tokens of the distinct prompts prefill started on, and those found cached (not computed).
        self.prompt_tokens = 0
        self.cached_tokens = 0
        # Tokens computed ahead for prefixes a step's joiners share, not yet
        # charged against the tokens they find cached.
        self._shared_cost = 0
        # The masking policy (NLPO) of every row here, or None: no second forward.
        self.mask_policy = mask_policy
        self._policy_layers = 0  # layers [0, this) of the buffers are the policy's, the rest the mask's
        self.max_rows = max_rows
        # Prompt tokens prefilled per step, over all groups (0: no bound).
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.rows: list[Row] = []
        # Groups of joiners whose prompts are still being prefilled, oldest first.
        self._prefilling: list[_Prefill] = []
        self.device = next(policy.model.parameters()).device
        self._keys: list = []
        self._values: list = []
        self._mask = None
        self._start = 0  # first column of the attention window
        self._end = 0  # the column the next token of every row goes to

    @property
    def empty(self) -> bool:
        return not self.rows and not self._prefilling

    @property
    def members(self) -> dict[int, Generation]:
        """Every generation here, decoding or still prefilling, by id."""
        found = {id(row.generation): row.generation for row in self.rows}
        for group in self._prefilling:
            found.update((id(row.generation), row.generation) for row in group.rows)
        return found

    @property
    def generations(self) -> int:
        return len(self.members)

    @property
    def prefilling_rows(self) -> int:
        return sum(len(group.rows) for group in self._prefilling)

    @property
    def prefilling_prompts(self) -> int:
        """Distinct prompts being prefilled (rows with the same prompt share one)."""
        return sum(group.prompts for group in self._prefilling)

    @property
    def allocated_tokens(self) -> int:
        """Token slots the cache holds now (rows x columns)."""
        return 0 if self._mask is None else self._mask.shape[0] * self._mask.shape[1]

    def step(self, joining: Sequence[Generation] = ()) -> list[Row]:
        """One forward for the rows already here (their next token), one per
        group of joiners prefilled this step (``joining`` starts a group),
        one sampled token for each row decoded and each row whose prompt is
        now complete. Rows of cancelled generations leave first; finished
        rows leave after. Returns the rows that sampled a token."""
        import torch

        # The buffers are inference tensors: every update of them in here.
        with torch.inference_mode():
            self._leave([row for row in self.rows if row.generation.cancelled])
            self._drop_cancelled_prefills()
            joined = [row for generation in joining for row in generation.rows]
            if joined:
                self._prefilling.extend(self._groups(joined))
            outputs = []
            if self.rows:
                outputs.append(self._decode())
            outputs.extend(self._advance_prefills())
            if not outputs:
                return []
            stepped = list(self.rows)
            logits = _joined([policy for policy, _ in outputs])
            mask_logits = None if self.mask_policy is None else _joined([mask for _, mask in outputs])
            tokens, logprobs = _sample(logits, mask_logits, stepped)
            for row, token, logprob in zip(stepped, tokens, logprobs, strict=True):
                row.next_token = token
                row.generation.record(row, token, logprob)
            self._leave([row for row in stepped if row.finish is not None])
        return stepped

    def release(self) -> None:
        """Everything out: rows, groups still prefilling and the cache."""
        self.rows.clear()
        self._prefilling.clear()
        self._shared_cost = 0
        self._free_cache()

    def _free_cache(self) -> None:
        self._keys, self._values, self._mask = [], [], None
        self._start = self._end = 0

    # -- forward passes --------------------------------------------------

    def _decode(self):
        import torch

        count = len(self.rows)
        self._ensure(count, 0, 1)
        self._mask[:count, self._end] = 1
        ids = torch.tensor([[row.next_token] for row in self.rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=self.device)
        window = self._mask[:count, self._start : self._end + 1]
        logits, _ = forward_step(self.policy.model, ids, window, positions,
                                 cache=_SlotCache(self, count, 0, self._policy_layers))
        mask_logits = None
        if self.mask_policy is not None:
            mask_logits, _ = forward_step(self.mask_policy.model, ids, window, positions,
                                          cache=_SlotCache(self, count, self._policy_layers, len(self._keys)))
            mask_logits = mask_logits[:, -1, :]
        self._end += 1
        for row in self.rows:
            row.position += 1
        return logits[:, -1, :], mask_logits

    def _groups(self, joined: list[Row]) -> list[_Prefill]:
        """The joiners' prefill groups, in order: first, with prefix caching,
        the beginnings their prompts share and the caches lack, when
        computing them once saves more than it spends (into the caches
        only; the groups after find them there); then the prompts, split by
        the columns each has left to compute when a group's padding to its
        longest would cost more than another forward."""
        prompts: dict[tuple[int, ...], list[Row]] = {}
        for row in joined:
            prompts.setdefault(tuple(row.prompt_ids), []).append(row)
        distinct = [list(prompt) for prompt in prompts]
        remaining = [len(prompt) for prompt in distinct]
        groups = []
        if self.prefix_caches is not None:
            shared, remaining, cost = _shared_prefixes(self.prefix_caches, distinct, self.prefill_group_cost_tokens)
            if shared:
                groups.append(_Prefill(self, [], prompts=shared))
                self._shared_cost += cost
        if self.prefill_group_cost_tokens > 0:
            parts, _ = _partition(remaining, self.prefill_group_cost_tokens)
        else:
            parts = [list(range(len(distinct)))]
        rows = list(prompts.values())
        groups.extend(_Prefill(self, [row for p in part for row in rows[p]]) for part in parts)
        return groups

    def _advance_prefills(self) -> list:
        """A chunk of each group's prompts, oldest group first, within the
        step's token budget (the oldest group always advances a column);
        the groups whose last column is done join the batch. Returns their
        (logits, mask logits) at the last prompt position, in joining order."""
        budget = self.prefill_chunk_tokens or None
        outputs = []
        for group in list(self._prefilling):
            if budget is not None and budget <= 0:
                break
            if not group.started:
                if any(earlier.shared_only for earlier in self._prefilling[: self._prefilling.index(group)]):
                    break  # its shared prefixes are not all cached yet
                group.start()
            remaining = group.width - group.done
            columns = remaining if budget is None else min(remaining, max(1, budget // group.prompts))
            if budget is not None:
                budget -= columns * group.prompts
            logits = group.advance(columns)
            if group.done == group.width:
                self._prefilling.remove(group)
                if group.shared_only:
                    group.remember()
                else:
                    outputs.append(self._join(group, *logits))
        return outputs

    def _drop_cancelled_prefills(self) -> None:
        for group in list(self._prefilling):
            if group.shared_only:
                continue  # short, and the cache keeps what it computes
            kept = [r for r, row in enumerate(group.rows) if not row.generation.cancelled]
            if not kept:
                self._prefilling.remove(group)
            elif len(kept) < len(group.rows):
                group.select(kept)

    def _join(self, group: _Prefill, logits, mask_logits):
        """A group whose prompts are prefilled: its cache columns copied into
        slots ending at the write column, its rows into the batch."""
        joined, width, source = group.rows, group.width, group.source
        mask = group.mask[source]
        layers = list(group.cache.layers)
        if group.mask_cache is not None:
            layers += group.mask_cache.layers
        first, count = len(self.rows), len(self.rows) + len(joined)
        if self._mask is None:
            self._policy_layers = len(group.cache.layers)
            self._allocate(layers, count, width, _ahead(joined))
        else:
            self._ensure(count, width, _ahead([*self.rows, *joined]))
        if self.prefix_caches is not None:
            group.remember()
        lo, hi = self._end - width, self._end
        for layer, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            keys[first:count, :, lo:hi] = layers[layer].keys[source]
            values[first:count, :, lo:hi] = layers[layer].values[source]
        self._mask[first:count] = 0
        self._mask[first:count, lo:hi] = mask
        for row in joined:
            row.position = len(row.prompt_ids)
            row.start_col = lo
        self._start = min(self._start, lo) if self.rows else lo
        self.rows.extend(joined)
        return logits, mask_logits

    # -- the slots ---------------------------------------------------------

    def _allocate(self, layers, rows: int, width: int, ahead: int) -> None:
        import torch

        slots = _row_slots(rows, self.max_rows)
        columns = width + ahead + _SLACK_COLUMNS
        self._keys, self._values = [], []
        for layer in layers:
            for store, like in ((self._keys, layer.keys), (self._values, layer.values)):
                batch, heads, _, dim = like.shape
                store.append(torch.zeros((slots, heads, columns, dim), dtype=like.dtype, device=like.device))
        self._mask = torch.zeros((slots, columns), dtype=torch.long, device=self.device)
        self._start = self._end = width

    def _ensure(self, rows: int, left: int, ahead: int) -> None:
        """Room for ``rows`` rows, ``left`` columns before the write column and
        ``ahead`` from it on; else copies the window into new buffers sized
        for the rows' remaining tokens (shrinking them as well as growing)."""
        slots, columns = self._mask.shape
        if rows <= slots and self._end >= left and self._end + ahead <= columns:
            return
        import torch

        window = self._end - self._start
        end = max(window, left)
        start = end - window
        remaining = max(ahead, _ahead(self.rows))
        new_slots = _row_slots(rows, self.max_rows) if rows > slots or 4 * rows < slots else slots
        new_columns = end + remaining + _SLACK_COLUMNS
        count = len(self.rows)
        for store in (self._keys, self._values):
            for layer, old in enumerate(store):
                new = old.new_zeros((new_slots, old.shape[1], new_columns, old.shape[3]))
                new[:count, :, start:end] = old[:count, :, self._start : self._end]
                store[layer] = new
        mask = torch.zeros((new_slots, new_columns), dtype=torch.long, device=self.device)
        mask[:count, start:end] = self._mask[:count, self._start : self._end]
        self._mask = mask
        shift = start - self._start
        for row in self.rows:
            row.start_col += shift
        self._start, self._end = start, end

    def _leave(self, leaving: list[Row]) -> None:
        """Rows out; the last rows move into the slots they free."""
        if not leaving:
            return
        import torch

        gone = {id(row) for row in leaving}
        kept = len(self.rows) - len(gone)
        holes = [i for i in range(kept) if id(self.rows[i]) in gone]
        movers = [i for i in range(kept, len(self.rows)) if id(self.rows[i]) not in gone]
        if movers:
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            for store in (self._keys, self._values):
                for layer in store:
                    layer[dst, :, self._start : self._end] = layer[src, :, self._start : self._end]
            self._mask[dst] = self._mask[src]
            for h, m in zip(holes, movers, strict=True):
                self.rows[h] = self.rows[m]
        del self.rows[kept:]
        if self.rows:
            self._start = min(row.start_col for row in self.rows)
        else:
            self._free_cache()


class _Prefill:
    """Rows that joined in one step, their distinct prompts left-padded to
    the longest (``width`` columns) and prefilled ``done`` columns so far,
    into a plain full-length cache of their own (and the masking policy's)
    whatever the model's config says: its columns are copied into the
    batch's slots when the last one is done, each row's from its prompt's
    (``source``: row -> prompt index)."""

    def __init__(self, batch: DecodeBatch, rows: list[Row], prompts: list[list[int]] | None = None):
        """``prompts`` instead of rows: prefixes that several prompts of a
        group share, computed only into the prefix caches (no row joins)."""
        import torch
        from transformers import DynamicCache

        self.batch = batch
        self.rows = rows
        self.shared_only = prompts is not None
        if prompts is None:
            index: dict[tuple[int, ...], int] = {}
            source = [index.setdefault(tuple(row.prompt_ids), len(index)) for row in rows]
            prompts = [list(prompt) for prompt in index]
        else:
            source = []
        self.source = torch.tensor(source, dtype=torch.long, device=batch.device)
        self.width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), self.width), batch.policy.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.width), dtype=torch.long)
        for r, prompt in enumerate(prompts):
            ids[r, self.width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[r, self.width - len(prompt) :] = 1
        self.ids, self.mask = ids.to(batch.device), mask.to(batch.device)
        # A left-padded row's first real token is position 0, as unpadded.
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.done = 0
        self.cache = DynamicCache()
        self.mask_cache = None if batch.mask_policy is None else DynamicCache()
        self.prompt_ids = prompts
        self.starts = [self.width - len(prompt) for prompt in prompts]
        self.started = False

    def start(self) -> None:
        """Its prefill begins (at its first step, when the prefixes it shares
        with others are cached): after the columns its prompts find cached."""
        self.started = True
        if not self.shared_only:
            self.batch.prompt_tokens += sum(len(prompt) for prompt in self.prompt_ids)
        if self.batch.prefix_caches is not None:
            self._reuse(self.batch.prefix_caches)

    def _reuse(self, caches: tuple[PrefixCache, ...]) -> None:
        """Starts after the columns every prompt has cached (in each model's
        cache): a prompt whose cached prefix ends later recomputes the rest
        of it, one whose starts later (a shorter prompt) is padding there."""
        size = caches[0].block_tokens
        # Per cache, per prompt: the slots of its cached blocks.
        chains = [[cache.match(prompt) for prompt in self.prompt_ids] for cache in caches]
        cached = [min(len(per_cache[p]) for per_cache in chains) * size for p in range(len(self.prompt_ids))]
        start = min(begin + tokens for begin, tokens in zip(self.starts, cached, strict=True))
        if start == 0:
            return
        for cache, per_cache, seeded in zip(caches, chains, (self.cache, self.mask_cache), strict=False):
            for layer in range(cache.layers):
                keys, values = cache.gather(layer, per_cache, self.starts, start)
                seeded.update(keys, values, layer)
        self.done = start
        if not self.shared_only:
            copied = sum(max(0, start - begin) for begin in self.starts)
            charged = min(copied, self.batch._shared_cost)
            self.batch._shared_cost -= charged
            self.batch.cached_tokens += copied - charged

    def remember(self) -> None:
        """The prompts' blocks into the prefix caches (the prefill is done)."""
        for cache, computed in zip(self.batch.prefix_caches, (self.cache, self.mask_cache), strict=False):
            cache.insert(self.prompt_ids, self.starts,
                         [(layer.keys, layer.values) for layer in computed.layers])

    @property
    def prompts(self) -> int:
        """Distinct prompts: the rows the model computes."""
        return self.ids.shape[0]

    def advance(self, columns: int):
        """The next ``columns`` prompt columns through the model(s); per row
        (its prompt's), the (logits, mask logits) at the last one (only
        meaningful once it is the prompt's last)."""
        lo, hi = self.done, self.done + columns
        ids, window, positions = self.ids[:, lo:hi], self.mask[:, :hi], self.positions[:, lo:hi]
        logits, self.cache = forward_step(self.batch.policy.model, ids, window, positions, cache=self.cache,
                                          last_only=True)
        mask_logits = None
        if self.mask_cache is not None:
            mask_logits, self.mask_cache = forward_step(self.batch.mask_policy.model, ids, window, positions,
                                                        cache=self.mask_cache, last_only=True)
            mask_logits = mask_logits[:, -1, :][self.source]
        self.done = hi
        return logits[:, -1, :][self.source], mask_logits

    def select(self, kept: list[int]) -> None:
        """Only rows ``kept`` (indices) go on (the others' generations were
        cancelled), and only the prompts they have; the padded width stays,
        so what is done stays valid."""
        import torch

        sources = self.source.tolist()
        prompts = sorted({sources[r] for r in kept})
        renumbered = {prompt: i for i, prompt in enumerate(prompts)}
        self.source = torch.tensor([renumbered[sources[r]] for r in kept], dtype=torch.long,
                                   device=self.source.device)
        index = torch.tensor(prompts, dtype=torch.long, device=self.ids.device)
        self.rows = [self.rows[r] for r in kept]
        self.prompt_ids = [self.prompt_ids[p] for p in prompts]
        self.starts = [self.starts[p] for p in prompts]
        self.ids, self.mask, self.positions = self.ids[index], self.mask[index], self.positions[index]
        for cache in (self.cache, self.mask_cache):
            if cache is not None and cache.get_seq_length() > 0:
                cache.batch_select_indices(index)


def _shared_prefixes(caches: tuple[PrefixCache, ...], prompts: list[list[int]],
                     forward_cost: int) -> tuple[list[list[int]], list[int], int]:
    """(prefixes, remaining, cost): the longest block-aligned beginnings
    two or more of ``prompts`` share (short of each one's last token) that
    the caches do not hold whole, and per prompt the columns it would have
    left to compute once they are cached, if computing them once (``cost``
    tokens) makes the prefill cheaper (``_partition``'s measure); else no
    prefixes, the columns left with what the caches hold now, and 0. A
    prompt set with one system prompt gives that system prompt, to its last
    whole block."""
    size = caches[0].block_tokens
    # A trie of whole blocks: (parent node, block tokens) -> node; per node, prompts through it.
    nodes: dict[tuple[int, tuple[int, ...]], int] = {}
    count: list[int] = []
    parent_of: list[int] = []
    example: list[tuple[int, int]] = []  # node -> (a prompt through it, its end in tokens)
    paths: list[list[int]] = []  # per prompt, its nodes
    for p, prompt in enumerate(prompts):
        parent, path = -1, []
        for begin in range(0, len(prompt) - 1 - size + 1, size):
            key = (parent, tuple(prompt[begin : begin + size]))
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = len(count)
                count.append(0)
                parent_of.append(parent)
                example.append((p, begin + size))
            count[node] += 1
            parent = node
            path.append(node)
        paths.append(path)
    held = [min(cache.held_blocks(prompt[: len(prompt) - 1]) for cache in caches) * size for prompt in prompts]
    now = [len(prompt) - h for prompt, h in zip(prompts, held, strict=True)]
    shared = {node for node in range(len(count)) if count[node] >= 2}
    extended = {parent_of[node] for node in shared}
    prefixes = []
    for node in sorted(shared - extended):  # the deepest: a longer shared prefix contains the others
        p, end = example[node]
        prefix = prompts[p][:end]
        if any(cache.held_blocks(prefix) < end // size for cache in caches):
            prefixes.append(prefix)
    if not prefixes:
        return [], now, 0
    # A prompt's shared nodes are its first ones (a node has at least its children's prompts).
    after = [len(prompt) - max(h, size * sum(1 for node in path if node in shared))
             for prompt, h, path in zip(prompts, held, paths, strict=True)]
    cost = sum(len(prefix) for prefix in prefixes)
    # Their own forward counts too.
    if _partition(after, forward_cost)[1] + forward_cost + cost >= _partition(now, forward_cost)[1]:
        return [], now, 0
    return prefixes, after, cost


def _partition(remaining: Sequence[int], forward_cost: int) -> tuple[list[list[int]], int]:
    """Prompts (by index) into prefill groups, and what they cost: a group
    computes its prompts x the most columns any of them has left (the others
    are left-padded to it), plus ``forward_cost`` per group (0: one group,
    costed so). The cheapest split groups prompts of neighbouring lengths:
    found over the prompts sorted by columns left, shortest group first (it
    joins and decodes soonest)."""
    order = sorted(range(len(remaining)), key=remaining.__getitem__)
    count = len(order)
    if forward_cost <= 0:
        return [order], count * max(remaining, default=0)
    # best[i]: the least cost of the first i prompts; cut[i]: where its last group begins.
    best = [0] + [0] * count
    cut = [0] * (count + 1)
    for i in range(1, count + 1):
        longest = remaining[order[i - 1]]
        best[i], cut[i] = min((best[j] + forward_cost + (i - j) * longest, j) for j in range(i))
    groups = []
    i = count
    while i > 0:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1], best[count]


def _joined(parts: list):
    import torch

    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _ahead(rows: Sequence[Row]) -> int:
    """Columns the rows may still fill: their most remaining tokens."""
    return max((row.generation.params.max_new_tokens - len(row.ids) for row in rows), default=0)


def _row_slots(rows: int, max_rows: int) -> int:
    """Doubling, so rows joining one request at a time copy rarely."""
    slots = _MIN_ROW_SLOTS
    while slots < rows:
        slots *= 2
    return max(rows, min(slots, max_rows))


def _distribution(logits, mask_logits, key: tuple):
    """A group's sampling distribution; with a mask top-p (NLPO), restricted
    to the masking policy's nucleus at temperature 1."""
    *sampling, mask_top_p = key
    allowed = None if mask_top_p is None else top_p_set(mask_logits.double(), mask_top_p)
    return sampling_logprobs(logits, *sampling, allowed=allowed)


def _sample(logits, mask_logits, rows: Sequence[Row]) -> tuple[list[int], list[float]]:
    """One token per row, each from its own generation's sampling
    distribution (rows with equal parameters processed together) and its own
    next uniform; returns the tokens and their log-probs under that distribution.
    ``mask_logits``: the masking policy's, row for row (None: no mask)."""
    import torch

    uniforms = torch.tensor([row.uniforms[len(row.ids)] for row in rows], dtype=torch.float64)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.generation.sampling_key, []).append(i)
    if len(groups) == 1:
        [key] = groups
        dist = _distribution(logits, mask_logits, key)
        tokens = draw(dist, uniforms)
        return tokens.tolist(), dist.gather(-1, tokens[:, None])[:, 0].tolist()
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    logprobs = torch.empty(len(rows), dtype=torch.float64, device=logits.device)
    for key, members in groups.items():
        index = torch.tensor(members, dtype=torch.long, device=logits.device)
        dist = _distribution(logits.index_select(0, index),
                             None if mask_logits is None else mask_logits.index_select(0, index), key)
        chosen = draw(dist, uniforms[members])
        tokens[index] = chosen
        logprobs[index] = dist.gather(-1, chosen[:, None])[:, 0]
    return tokens.tolist(), logprobs.tolist()


def _slot_cache_class():
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer's view of the slot buffers for one forward: new keys and
        values are written into the write column, attention reads the window."""

        def __init__(self, batch: DecodeBatch, layer: int, rows: int):
            super().__init__()
            self.batch, self.layer, self.rows = batch, layer, rows
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            batch, rows = self.batch, self.rows
            end = batch._end + key_states.shape[-2]
            keys, values = batch._keys[self.layer], batch._values[self.layer]
            keys[:rows, :, batch._end : end] = key_states
            values[:rows, :, batch._end : end] = value_states
            return keys[:rows, :, batch._start : end], values[:rows, :, batch._start : end]

        def get_seq_length(self) -> int:
            return self.batch._end - self.batch._start

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.get_seq_length() + query_length, 0

    class SlotCache(DynamicCache):
        def __init__(self, batch: DecodeBatch, rows: int, first: int, end: int):
            Cache.__init__(self, layers=[SlotLayer(batch, i, rows) for i in range(first, end)])

    return SlotCache


_SLOT_CACHE = None


def _SlotCache(batch: DecodeBatch, rows: int, first: int, end: int):  # noqa: N802 - a class, built once transformers is imported
    """The buffers' layers [first, end): the policy's, or the masking policy's."""
    global _SLOT_CACHE
    if _SLOT_CACHE is None:
        _SLOT_CACHE = _slot_cache_class()
    return _SLOT_CACHE(batch, rows, first, end)
