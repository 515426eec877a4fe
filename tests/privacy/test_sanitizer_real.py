"""The bundled model's real 49152-token table: built in blocks (or loaded from the cache), then used."""

from __future__ import annotations

import numpy as np

from veil.privacy.sanitizer import Sanitizer
from veil.privacy.vocabulary import Vocabulary


def test_real_table_never_emits_special_or_byte_tokens_and_groups_share_outputs(bundled) -> None:
    sanitizer = Sanitizer.for_model(bundled, epsilon=1.0, rng=0)  # about a minute the first time
    vocabulary = Vocabulary.from_tokenizer(bundled.tokenizer, size=bundled.config.vocab_size)
    prompt = bundled.tokenizer.encode(
        "Call John Smith at 555-1234 about the gorgeous film. " * 12, add_special_tokens=False
    )[:128]
    out = sanitizer.sanitize(prompt)
    emitted = np.array([out.token_ids[p] for p in out.replaced_positions])
    digits = np.array([t.isdigit() for t in vocabulary.texts])
    assert out.replaced_positions and (vocabulary.eligible[emitted] | digits[emitted]).all()
    assert out.epsilon_spent == sanitizer.privacy_map(len(out.replaced_positions))
    special = set(bundled.tokenizer.all_special_ids)
    assert not special & set(emitted.tolist())
    assert len(out.token_ids) == len(prompt)
