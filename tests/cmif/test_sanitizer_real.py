"""One check on the bundled model's real 49152-token table, only when the model and table are cached."""

from __future__ import annotations

import time

import numpy as np
import pytest

from veil.cmif.neighbours import CandidateSet, Metric, cache_dir, table_key


def test_real_table_sanitizes_quickly_and_never_emits_special_or_byte_tokens():
    loader = pytest.importorskip("veil.model.loader")
    if not (loader.cache_root() / "models" / loader.BUNDLED_NAME / ".veil-complete").exists():
        pytest.skip("the bundled model is not converted yet")
    loaded = loader.load_model()
    from veil.cmif.sanitizer import Sanitizer
    from veil.cmif.vocabulary import Vocabulary

    embeddings = loaded.model.embed_tokens.weight.detach().numpy()
    vocabulary = Vocabulary.from_tokenizer(loaded.tokenizer, size=embeddings.shape[0])
    key = table_key(embeddings, vocabulary.eligible, kind=CandidateSet.GROUPS, k=20, metric=Metric.COSINE,
                    seed_order=None)
    if not (cache_dir() / f"groups-k20-{key}.npz").exists():
        pytest.skip("the real neighbour table is not cached (it takes about a minute to build)")
    sanitizer = Sanitizer.for_model(loaded, epsilon=1.0, rng=0)
    prompt = loaded.tokenizer.encode("Call John Smith at 555-1234 about the gorgeous film. " * 12,
                                     add_special_tokens=False)[:128]
    sanitizer.sanitize(prompt)
    started = time.perf_counter()
    out = sanitizer.sanitize(prompt)
    elapsed = time.perf_counter() - started
    emitted = np.array([out.token_ids[p] for p in out.replaced_positions])
    assert out.replaced_positions and vocabulary.eligible[emitted].all()
    assert elapsed < 0.05  # a forward pass over 128 tokens takes hundreds of milliseconds here

