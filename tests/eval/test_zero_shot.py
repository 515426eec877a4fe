"""The zero-shot scorer's shared-prefix cache and right padding give the logits of a plain forward pass."""

from __future__ import annotations

import numpy as np
import torch

from engine.support import random_llama, tiny_config
from veil.eval.utility import ZeroShot
from veil.model.llama import Llama

CONFIG = tiny_config(
    vocab_size=50, hidden_size=32, intermediate_size=48, head_dim=8, max_position_embeddings=256
)
PREFIX, SUFFIX, POSITIVE, NEGATIVE = [3, 4, 5, 6], [7, 8], 11, 12


@torch.inference_mode()
def plain_score(model: Llama, sentence: list[int]) -> float:
    logits = model(torch.tensor([PREFIX + sentence + SUFFIX]))[0, -1]
    return float(logits[POSITIVE] - logits[NEGATIVE])


def test_scores_match_a_plain_forward_pass_per_prompt():
    model = random_llama(CONFIG, std=0.3)
    scorer = ZeroShot(model, prefix=PREFIX, suffix=SUFFIX, positive=POSITIVE, negative=NEGATIVE, batch_size=3)
    rng = np.random.default_rng(0)
    sentences = [rng.integers(13, 50, size=n).tolist() for n in (1, 7, 3, 12, 5, 2, 9)]  # ragged batches
    scores = scorer.scores(sentences)
    expected = [plain_score(model, s) for s in sentences]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    again = scorer.scores([sentences[3], sentences[0], sentences[3]])  # memoized, same values
    np.testing.assert_array_equal(again, scores[[3, 0, 3]])


def test_threshold_is_the_median_clean_score():
    model = random_llama(CONFIG, 1, std=0.3)
    scorer = ZeroShot(model, prefix=PREFIX, suffix=SUFFIX, positive=POSITIVE, negative=NEGATIVE)
    sentences = [[13 + i, 20 + i] for i in range(9)]
    scorer.calibrate(sentences)
    scores = scorer.scores(sentences)
    assert scorer.threshold == np.median(scores)
    assert scorer.accuracy(scores, (scores > np.median(scores)).astype(int)) == 1.0
