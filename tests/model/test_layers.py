"""The model's building blocks: KV cache, layer-at-a-time execution, split embed/stack/head."""

from __future__ import annotations

import pytest
import torch

from veil.model.kv_cache import KVCache
from veil.model.llama import LayerWeights


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)


def test_cached_decode_equals_full_recomputation(bundled) -> None:
    model = bundled.model
    ids = torch.tensor(
        [bundled.tokenizer("Secure channels seal every chunk with a fresh IV so that").input_ids]
    )
    full = full_logits(model, ids)
    cache = KVCache(model.config, batch_size=1, max_tokens=ids.shape[1])
    with torch.inference_mode():
        prefix = 5
        pieces = [model(ids[:, :prefix], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(prefix, ids.shape[1])]
    stepwise = torch.cat(pieces, dim=1)
    assert cache.length == ids.shape[1]
    assert (stepwise - full).abs().max().item() <= 1e-4


def test_chunked_prefill_equals_full(bundled) -> None:
    model = bundled.model
    ids = torch.tensor([bundled.tokenizer("one two three four five six seven eight nine ten").input_ids])
    cache = KVCache(model.config, batch_size=1, max_tokens=ids.shape[1])
    with torch.inference_mode():
        a = model(ids[:, :4], cache=cache)
        b = model(ids[:, 4:], cache=cache)
    assert (torch.cat([a, b], dim=1) - full_logits(model, ids)).abs().max().item() <= 1e-4


def test_cache_overflow_is_an_error(bundled) -> None:
    cache = KVCache(bundled.config, batch_size=1, max_tokens=3)
    with pytest.raises(ValueError, match="KV cache full"), torch.inference_mode():
        bundled.model(torch.tensor([[1, 2, 3, 4]]), cache=cache)


def test_layer_at_a_time_with_streamed_weights_equals_forward(bundled) -> None:
    """Weights handed in from outside (a separate flat buffer per layer) give the same logits."""
    model, config = bundled.model, bundled.config
    ids = torch.tensor([bundled.tokenizer("Weights arrive one layer at a time.").input_ids])
    expected = full_logits(model, ids)
    staging = torch.empty(LayerWeights.numel(config))
    with torch.inference_mode():
        hidden = model.embed(ids)
        ctx = model.context(1, ids.shape[1], cache=None)
        for index, layer in enumerate(model.layers):
            layer.weights().copy_to_flat(staging)  # as if it came over the bus
            streamed = LayerWeights.view_flat(staging, config)
            assert streamed.wqkv.data_ptr() != layer.wqkv.data_ptr()
            hidden = model.run_layer(index, hidden, ctx, streamed)
        logits = model.head(hidden)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_flat_layout_round_trip(bundled) -> None:
    weights = bundled.model.layers[3].weights()
    flat = torch.empty(LayerWeights.numel(bundled.config))
    weights.copy_to_flat(flat)
    view = LayerWeights.view_flat(flat, bundled.config)
    for a, b in zip(weights.tensors(), view.tensors()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        LayerWeights.view_flat(flat[:-1], bundled.config)


def test_embed_stack_head_split_equals_forward(bundled) -> None:
    """Split inference embeds on the client and runs the rest on the server: same logits."""
    model = bundled.model
    ids = torch.tensor([bundled.tokenizer("The client embeds, the server runs the rest.").input_ids])
    with torch.inference_mode():
        client_side = model.embed(ids).clone()
        server_side = model.head(model.run_layers(client_side, model.context(1, ids.shape[1], None)))
    assert torch.equal(server_side, full_logits(model, ids))
