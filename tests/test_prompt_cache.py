"""The prompt cache's own rules, with opaque byte states: the longest saved prefix is found,
RAM and disk stay within their bounds (least recently used out first), a state that another
one extends is dropped, and only intact files of the same signature are used.
(Real states of a real model: plugins/lllms_llamacpp/tests/test_prompt_cache.py.)"""

from __future__ import annotations

from lllms_core.prompt_cache import BLOCK, PromptCache

SIGNATURE = {"model_sha256": "ab" * 32, "engine": "test 1"}


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def test_the_longest_saved_prefix_is_found_and_a_longer_state_replaces_its_prefix():
    cache = PromptCache("m", ram_bytes=10_000, disk_bytes=0, directory=None)
    conversation = tokens(0, 3 * BLOCK)
    assert cache.put(conversation[: 2 * BLOCK], b"turn one", 8, key=("a",))
    assert cache.put(tokens(1000, 2 * BLOCK), b"another", 7)
    prompt = conversation + [5, 6, 7]
    entry, length = cache.lookup(prompt)
    assert entry.data == b"turn one" and length == 2 * BLOCK
    assert cache.lookup(prompt, better_than=2 * BLOCK) is None, "nothing longer than what the slot holds"
    assert cache.put(conversation, b"turn two", 8, key=("a", "b"))
    entry, length = cache.lookup(prompt)
    assert entry.data == b"turn two" and length == 3 * BLOCK
    assert cache.status()["ram"]["entries"] == 2, "turn one is a prefix of turn two: dropped"
    assert not cache.put(conversation[: 2 * BLOCK], b"again", 5), "turn two holds it already"
    assert cache.key_match(("a", "b", "c")) == 2 and cache.key_match(("z",)) == 0


def test_ram_keeps_the_most_recently_used_states_within_its_bound():
    cache = PromptCache("m", ram_bytes=250, disk_bytes=0, directory=None)
    for number in range(3):
        cache.put(tokens(number * 1000, BLOCK), bytes(100), 100)
    ram = cache.status()["ram"]
    assert ram["bytes"] == 200 and ram["entries"] == 2
    assert cache.lookup(tokens(0, BLOCK)) is None, "the least recently used state went first"
    assert cache.lookup(tokens(2000, BLOCK)) is not None


def test_states_written_to_disk_are_found_again_by_a_new_cache_of_the_same_signature(tmp_path):
    first = PromptCache("m", ram_bytes=10_000, disk_bytes=10_000, directory=tmp_path)
    first.attach(SIGNATURE)
    first.put(tokens(0, 2 * BLOCK), b"kv cells", 8, key=("a",))
    assert first.persist() == 1
    second = PromptCache("m", ram_bytes=10_000, disk_bytes=10_000, directory=tmp_path)
    second.attach(SIGNATURE)
    prompt = tokens(0, 2 * BLOCK) + [1]
    assert second.key_match(("a", "b")) == 1, "the pool can route by a state on disk"
    assert second.lookup(prompt) is None and second.needs_read(prompt)
    assert second.prefetch(prompt)
    entry, length = second.lookup(prompt)
    assert bytes(entry.data) == b"kv cells" and length == 2 * BLOCK
    second.restored(entry, length)
    assert second.status()["disk"]["restores"] == 1 and second.status()["disk"]["tokens_saved"] == 2 * BLOCK


def test_disk_keeps_the_most_recently_used_states_within_its_bound(tmp_path):
    cache = PromptCache("m", ram_bytes=10_000, disk_bytes=250, directory=tmp_path)
    cache.attach(SIGNATURE)
    for number in range(3):
        cache.put(tokens(number * 1000, BLOCK), bytes(100), 100)
        cache.persist()
    assert cache.status()["disk"]["entries"] == 2
    assert len(list(cache.directory.glob("*.state"))) == 2
