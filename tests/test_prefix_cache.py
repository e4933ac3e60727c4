"""Prefix caching in the policy engine (``arbiter.policy.prefix_cache``):
the cache's bookkeeping (blocks, exact keys, leaf-first eviction) on small
tensors; prompts that reuse cached prefixes in a real decoding batch, and
prompts of one step that share a beginning, with hand-derived token counts, sampling what they sample without it; the
service's counters and settings."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decoding_checks import assert_as_alone
from helpers import BackgroundServer, sample_value
from lm_fixtures import perturbed

from arbiter.config import ConfigError
from arbiter.policy.batch import DecodeBatch
from arbiter.policy.model import PolicyModel, ResolvedMask
from arbiter.policy.prefix_cache import PrefixCache
from arbiter.policy.scheduler import DecodingConfig
from arbiter.policy.types import ResolvedSampling
from arbiter.types import Prompt
from services.policy.client import PolicyClient
from services.policy.server import create_server
from services.policy.settings import PolicySettings

# 6 and 29 tokens with the tiny tokenizer; MEDIUM's are LONG's first 6.
MEDIUM = "The quick brown"
LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps"


# -- the cache's bookkeeping ---------------------------------------------------

def states(prompts: int, columns: int, fill) -> list[tuple]:
    """One layer's (keys, values) of a prefill cache, 1 head x 1 dim: the
    value at (prompt r, column c) is ``fill(r, c)`` (values: its negative)."""
    keys = torch.tensor([[fill(r, c) for c in range(columns)] for r in range(prompts)], dtype=torch.float32)
    keys = keys[:, None, :, None]
    return [(keys, -keys)]


def test_blocks_are_keyed_by_their_whole_prefix_and_gathered_into_place():
    """Blocks of 2: [1,2,3,4,5] holds [1,2] and [3,4] ([5] is no whole
    block). [1,2,3,4,9] finds both (its last token is never taken: its
    logits must be computed); [7,2,3,4,9] finds none ([3,4] after [7,2] is
    another prefix than after [1,2]); [1,2,3] finds 1 block, [1,2] none
    (its only block holds its last token). Gathered into a 5-column
    prefill cache, each prompt's cached tokens land from its first column."""
    cache = PrefixCache(capacity_tokens=8, block_tokens=2)
    assert cache.match([1, 2, 3, 4, 5]) == [] and cache.layers == 0
    # Column c of prompt 0 holds 10 + c; its tokens start at column 1.
    added = cache.insert([[1, 2, 3, 4, 5]], [1], states(1, 6, lambda r, c: 10.0 + c))
    assert added == 2 and cache.held_tokens == 4 and cache.layers == 1
    chain = cache.match([1, 2, 3, 4, 9])
    assert len(chain) == 2
    assert cache.match([7, 2, 3, 4, 9]) == []
    assert cache.match([1, 2, 3]) == chain[:1]
    assert cache.match([1, 2]) == []
    # Row 0 from column 0 (4 cached tokens fill columns 0-3), row 1 from column 3 (1 column before 4).
    keys, values = cache.gather(0, [chain, chain[:1]], [0, 3], 4)
    assert keys.shape == (2, 1, 4, 1)
    assert keys[0, 0, :, 0].tolist() == [11.0, 12.0, 13.0, 14.0]
    assert keys[1, 0, :, 0].tolist() == [0.0, 0.0, 0.0, 11.0]
    assert torch.equal(values, -keys)
    # A second insert of the same prompt adds nothing.
    assert cache.insert([[1, 2, 3, 4, 5]], [0], states(1, 5, lambda r, c: 99.0)) == 0
    assert cache.gather(0, [chain], [0], 1)[0].flatten().tolist() == [11.0]


def test_the_least_recently_used_leaf_goes_first_and_never_a_block_others_extend():
    """4 slots of 2 tokens. A = [1,2,3,4,5] takes 2 ([1,2] -> [3,4]); B =
    [1,2,7,8,9] shares [1,2] and adds [7,8]; C = [5,6,5] adds [5,6]: full. A is used again, so B's leaf [7,8] is the oldest block: inserting
    D = [9,9,9] takes its slot, not [1,2] (older than [7,8] by insertion,
    but extended by A's [3,4] and used with it). B then finds only [1,2]."""
    cache = PrefixCache(capacity_tokens=8, block_tokens=2)
    layer = states(1, 5, lambda r, c: float(c))
    for prompt in ([1, 2, 3, 4, 5], [1, 2, 7, 8, 9], [5, 6, 5]):
        cache.insert([prompt], [0], layer)
    assert cache.held_tokens == 8
    assert len(cache.match([1, 2, 3, 4, 5])) == 2
    cache.insert([[9, 9, 9]], [0], layer)
    assert cache.held_tokens == 8
    assert len(cache.match([1, 2, 7, 8, 9])) == 1
    assert len(cache.match([1, 2, 3, 4, 5])) == 2
    assert len(cache.match([5, 6, 5])) == 1
    assert len(cache.match([9, 9, 9])) == 1


def test_a_prompt_longer_than_the_cache_keeps_its_first_blocks():
    """2 slots, a prompt of 4 blocks: it holds its first 2 and does not
    evict its own chain for the rest."""
    cache = PrefixCache(capacity_tokens=4, block_tokens=2)
    assert cache.insert([[1, 2, 3, 4, 5, 6, 7, 8, 9]], [0], states(1, 9, lambda r, c: float(c))) == 2
    assert len(cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 2


# -- in the decoding batch -------------------------------------------------------

@pytest.fixture(scope="module")
def policy(policy_dir):
    return PolicyModel.load(policy_dir)


def start(policy: PolicyModel, prompts, max_new_tokens=8, temperature=1.0, n=1, seed=0, mask=None):
    params = ResolvedSampling(max_new_tokens, temperature, 1.0, 0, n, (), seed)
    ids = [p if isinstance(p, list) else policy.encode([Prompt(text=p)], max_new_tokens)[0] for p in prompts]
    return policy.start(ids, params, mask=mask)


def test_prompts_start_their_prefill_after_the_blocks_a_version_has_cached(policy):
    """Blocks of 4. a = LONG (29 tokens) x 2 samples: nothing cached; its
    7 whole blocks (28 tokens) are kept when it joins. b = LONG again (another
    request): 7 blocks found, 28 tokens copied, 1 computed. c = LONG + 6
    tokens (35) beside MEDIUM (6, LONG's first 6): c finds LONG's 7 blocks,
    MEDIUM 1 block; left-padded to 35 columns, MEDIUM starts at column 29,
    so the prefill starts at column min(0 + 28, 29 + 4) = 28 (28 tokens of
    c copied, MEDIUM's all computed), and c's 8th block joins the cache. d,
    prefilled a chunk of 2 prompt tokens a step: LONG's 28 cached tokens
    leave 1 column, done in its first step. Every sample is what its request
    gives alone."""
    cache = PrefixCache(capacity_tokens=64, block_tokens=4)
    batch = DecodeBatch(policy, max_rows=16, prefix_caches=(cache,))
    counts = []

    def join(generation):
        batch.step([generation])
        counts.append((batch.prompt_tokens, batch.cached_tokens, cache.held_tokens))
        batch.prompt_tokens = batch.cached_tokens = 0

    a = start(policy, [LONG], n=2, seed=1)
    join(a)
    b = start(policy, [LONG], temperature=0.7, seed=2)
    join(b)
    long_ids = a.rows[0].prompt_ids
    c = start(policy, [long_ids + [73, 74, 75, 76, 77, 78], MEDIUM], seed=3)
    join(c)
    assert counts == [(29, 0, 28), (29, 28, 28), (35 + 6, 28, 32)]
    while not batch.empty:
        batch.step()

    chunked = DecodeBatch(policy, max_rows=16, prefill_chunk_tokens=2, prefix_caches=(cache,))
    d = start(policy, [LONG], seed=4)
    chunked.step([d])
    assert len(d.rows[0].ids) == 1 and chunked.cached_tokens == 28
    while not chunked.empty:
        chunked.step()
    for generation in (a, b, c, d):
        assert_as_alone(policy, generation)


def test_prompts_joining_in_one_step_compute_their_shared_beginning_once(policy):
    """Blocks of 4, nothing cached. One request of 3 prompts: P1 = LONG (29
    tokens), P2 = LONG's first 20 + 5 others (25), P3 = MEDIUM (LONG's first
    6). Counting only blocks short of each prompt's last token (P1 7, P2 6,
    P3 1), LONG's first 5 blocks are shared (P2's 6th differs): those 20
    tokens go through the model once, as a prompt of their own, into the
    cache. Then the 3 prompts, left-padded to 29 columns (P2 from column 4,
    P3 from 23), start at column min(0 + 20, 4 + 20, 23 + 4) = 20: 20 + 16
    tokens copied for 20 computed (36 columns saved > 20 spent, so it is
    done), counted as 36 - 20 = 16 found cached of 60 prompt tokens; the
    cache ends with P1's 7 blocks and P2's 6th (32 tokens). Had P3 been
    LONG's first 5 tokens and 24 others (29, from column 0, sharing 1
    block), the start would be 4 at best: 3 x 4 - 4 saved for 20 spent, so
    the 3 prompts prefill from column 0 with nothing computed ahead.

    Prefilled 8 prompt tokens a step (a fresh cache): the shared 20 take 8,
    8 and 4 columns (steps 1-3); the 3 prompts then start at column 20 with
    the 4 tokens left (1 column), then 8 // 3 = 2 columns a step: 21, 23,
    25, 27, 29; the rows sample first in step 7. Every sample is what its
    request gives alone."""
    long_ids = policy.encode([Prompt(text=LONG)], 8)[0]
    prompts = [long_ids, long_ids[:20] + [80, 81, 82, 83, 84], MEDIUM]
    cache = PrefixCache(capacity_tokens=64, block_tokens=4)
    batch = DecodeBatch(policy, max_rows=16, prefix_caches=(cache,))
    a = start(policy, prompts, n=2, seed=8)
    batch.step([a])
    assert (batch.prompt_tokens, batch.cached_tokens, cache.held_tokens) == (60, 16, 32)
    while not batch.empty:
        batch.step()

    chunked = DecodeBatch(policy, max_rows=16, prefill_chunk_tokens=8,
                          prefix_caches=(PrefixCache(capacity_tokens=64, block_tokens=4),))
    b = start(policy, prompts, temperature=0.8, seed=9)
    chunked.step([b])
    assert (chunked.prefilling_rows, chunked.prefilling_prompts) == (3, 1 + 3)
    steps = 1
    while not b.rows[0].ids:
        chunked.step()
        steps += 1
    assert steps == 7 and chunked.cached_tokens == 16
    while not chunked.empty:
        chunked.step()

    unshared = DecodeBatch(policy, max_rows=16, prefix_caches=(PrefixCache(capacity_tokens=64, block_tokens=4),))
    c = start(policy, [long_ids, prompts[1], long_ids[:5] + list(range(100, 124))], seed=10)
    unshared.step([c])
    assert (unshared.prefilling_prompts, unshared.prompt_tokens, unshared.cached_tokens) == (0, 29 + 25 + 29, 0)
    while not unshared.empty:
        unshared.step()
    for generation in (a, b, c):
        assert_as_alone(policy, generation)


def test_a_masked_batch_reuses_what_both_models_have_cached(policy, policy_dir, tmp_path):
    """NLPO: the masking policy's layers have a cache of their own (its
    version's), and a prompt reuses only what both hold: LONG prefilled by
    the policy alone leaves the mask's cache empty, so a masked LONG
    computes all 29 columns (and fills the mask's cache); the next masked
    LONG copies 28 from each."""
    mask_policy = PolicyModel.load(perturbed(policy_dir, tmp_path / "mask", version="mask", scale=0.5))
    mask = ResolvedMask(mask_policy, 0.05)
    policy_cache, mask_cache = PrefixCache(64, 4), PrefixCache(64, 4)
    plain = DecodeBatch(policy, max_rows=8, prefix_caches=(policy_cache,))
    plain.step([start(policy, [LONG], seed=1)])
    assert policy_cache.held_tokens == 28 and mask_cache.held_tokens == 0
    masked = DecodeBatch(policy, max_rows=8, mask_policy=mask_policy, prefix_caches=(policy_cache, mask_cache))
    first = start(policy, [LONG], n=2, seed=5, mask=mask)
    masked.step([first])
    assert masked.cached_tokens == 0 and mask_cache.held_tokens == 28
    second = start(policy, [LONG], seed=6, mask=mask)
    masked.step([second])
    assert masked.cached_tokens == 28
    while not masked.empty:
        masked.step()
    for generation in (first, second):
        assert_as_alone(policy, generation)


def test_each_version_has_its_own_cache(policy_dir, tmp_path):
    config = DecodingConfig(prefix_cache_tokens=64, prefix_cache_block_tokens=4)
    one, other = PolicyModel.load(policy_dir), PolicyModel.load(perturbed(policy_dir, tmp_path / "v2", version="v2"))
    [cache] = config.prefix_caches(one, None)
    assert config.prefix_caches(one, None) == (cache,)
    assert config.prefix_caches(other, None)[0] is not cache
    assert DecodingConfig(prefix_cache_tokens=0).prefix_caches(one, None) is None


# -- through the service ---------------------------------------------------------

def test_the_service_counts_prompt_tokens_and_those_found_cached(policy_dir):
    """Blocks of 16: LONG (29 tokens) prefilled once, then again: 29 + 29
    prompt tokens, 16 of the second found cached, 16 held. Both requests are seeded
    alike and draw the same samples."""
    settings = PolicySettings(model_dir=str(policy_dir), port=0, metrics_port=0,
                              decoding=DecodingConfig(prefix_cache_block_tokens=16))
    with BackgroundServer(lambda: create_server(settings)) as server, PolicyClient(server.target) as client:
        registry = server.running.registry
        first = client.generate([LONG], max_new_tokens=8, temperature=1.0, seed=3)
        assert sample_value(registry, "arbiter_policy_prefix_cache_hit_tokens_total") == 0
        second = client.generate([LONG], max_new_tokens=8, temperature=1.0, seed=3)
        assert sample_value(registry, "arbiter_policy_prefill_prompt_tokens_total") == 58
        assert sample_value(registry, "arbiter_policy_prefix_cache_hit_tokens_total") == 16
        assert sample_value(registry, "arbiter_policy_prefix_cache_tokens") == 16  # LONG's one whole block
        [a], [b] = first.samples, second.samples
        assert list(a.completion_token_ids) == list(b.completion_token_ids)
        assert list(a.logprobs) == pytest.approx(list(b.logprobs), abs=1e-5)


@pytest.mark.parametrize("fields, needle", [
    (dict(prefix_cache_tokens=8, prefix_cache_block_tokens=16),
     "prefix_cache_tokens=8 is invalid: must be 0 (off) or at least one block (prefix_cache_block_tokens=16)"),
    (dict(prefix_cache_block_tokens=0), "prefix_cache_block_tokens=0 is invalid: must be >= 1"),
])
def test_prefix_cache_settings_are_checked_up_front(fields, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        DecodingConfig(**fields)


def test_the_cli_refuses_a_cache_smaller_than_a_block(policy_dir):
    """The flag is the field: refused at start-up, exit 2, naming it."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "policy", "--model", str(policy_dir), "--port", "0",
         "--prefix-cache-tokens", "3"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stderr
    assert "prefix_cache_tokens=3 is invalid: must be 0 (off) or at least one block" in done.stderr
