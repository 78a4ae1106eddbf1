"""Batched evaluation: prompts of one length go together, answers come back in row order."""

from __future__ import annotations

from slmflow.generate import generate_answers, length_batches


def test_length_batches_group_equal_lengths_only():
    lengths = [5, 3, 5, 5, 3, 7, 5]
    batches = length_batches(lengths, size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 2 and len({lengths[i] for i in b}) == 1
    assert batches == [[1, 4], [0, 2], [3, 6], [5]]


def test_generate_answers_keeps_row_order_and_times_each_batch():
    seen = []

    def fake(batch, max_new):  # answers the prompt's first token, max_new times
        assert len({len(p) for p in batch}) == 1  # never a padded batch
        seen.append(len(batch))
        return [[p[0]] * max_new for p in batch]

    prompts = [[1, 0], [2, 0, 0], [3, 0], [4], [5, 0, 0]]
    new, waited = generate_answers(fake, prompts, max_new=2, batch_size=16)
    assert new == [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]
    assert sorted(seen) == [1, 2, 2] and len(waited) == 5 and all(w >= 0 for w in waited)
    new1, _ = generate_answers(fake, prompts, max_new=2, batch_size=1)
    assert new1 == new
