"""Sampling filters, seeds and stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from spark_setup.engine.sampling import Sampler, SamplingParams, StopMatcher


def draws(logits, n=2000, **kw):
    s = Sampler(SamplingParams(seed=1, **kw))
    return np.bincount([s(logits) for _ in range(n)], minlength=len(logits))


LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.04, 0.01]))


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(np.array([0.1, 3.0, 2.9])) == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    c = draws(LOGITS, min_p=0.05)
    assert c[4] == 0 and c[3] > 0  # 0.01 < 0.05*0.5 ; 0.04 >= 0.025
    assert draws(LOGITS, min_p=0.0)[4] > 0


def test_top_k_and_top_p():
    assert set(np.nonzero(draws(LOGITS, top_k=2, min_p=0))[0]) == {0, 1}
    assert set(np.nonzero(draws(LOGITS, top_p=0.7, min_p=0))[0]) == {0, 1}
    assert set(np.nonzero(draws(LOGITS, top_p=0.5, min_p=0))[0]) == {0}


def test_temperature_flattens_and_sharpens():
    hot, cold = draws(LOGITS, temperature=2.0, min_p=0), draws(LOGITS, temperature=0.3, min_p=0)
    assert hot[0] < 1000 < cold[0]


def test_same_seed_same_sequence_and_different_seed_differs():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=50) for _ in range(40)]
    run = lambda seed: [Sampler(SamplingParams(seed=seed, min_p=0))(l) for l in logits]  # noqa: E731
    assert run(7) == run(7) and run(7) != run(8)


def test_invalid_params():
    for kw in ({"top_p": 0}, {"temperature": -1}, {"max_tokens": 0}, {"min_p": 2}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**kw).validate()


def feed(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = m.push(p)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, out


def test_stop_string_split_across_tokens_is_caught_and_not_emitted():
    text, stopped, parts = feed(["END"], ["Hello E", "N", "D and more"])
    assert (text, stopped) == ("Hello ", True)
    assert parts[0] == "Hello "  # "E" was held back, not emitted


def test_held_back_text_is_released_when_it_is_not_a_stop():
    text, stopped, parts = feed(["END"], ["Hello E", "N", "x"])
    assert (text, stopped) == ("Hello ENx", False)


def test_earliest_of_several_stops_wins_and_no_stops_passes_through():
    assert feed(["b", "a"], ["xxab"])[:2] == ("xx", True)
    assert feed([], ["a", "b"])[:2] == ("ab", False)


def test_logit_bias_bans_and_boosts():
    logits = np.array([5.0, 1.0, 0.0])
    assert Sampler(SamplingParams(temperature=0, logit_bias={0: -100}))(logits) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={2: 6.0}))(logits) == 2
    assert draws(logits, n=300, logit_bias={0: -100.0})[0] == 0


def test_top_p_on_a_wide_distribution_keeps_exactly_the_nucleus():
    logits = -np.arange(1000) / 400.0  # slowly decaying: the 0.5 nucleus spans hundreds of tokens
    probs = np.exp(logits) / np.exp(logits).sum()
    n = int(np.searchsorted(np.cumsum(probs), 0.5) + 1)
    c = draws(logits, n=4000, top_p=0.5, min_p=0.0)
    assert c[n:].sum() == 0 and c[n - 1] > 0 and n > 200


def test_presence_and_frequency_penalties_count_what_was_generated():
    logits = np.array([5.0, 4.0, 3.9])
    greedy = Sampler(SamplingParams(temperature=0))
    assert [greedy(logits) for _ in range(3)] == [0, 0, 0]  # no penalty: the same token every time
    pres = Sampler(SamplingParams(temperature=0, presence_penalty=1.5))
    assert [pres(logits) for _ in range(4)] == [0, 1, 2, 0]  # each seen token loses 1.5 once
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.75))
    # token 0 loses 0.75 per use: 5.0 -> 4.25 (still first) -> 3.5, where token 1 (4.0) wins
    assert [freq(logits) for _ in range(3)] == [0, 0, 1]
    assert list(logits) == [5.0, 4.0, 3.9]  # the caller's logits are not touched
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5).validate()
