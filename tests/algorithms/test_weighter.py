"""Weighter invariants: exactly uniform at init, positive, mean 1, permutation-equivariant, global-batch split."""

import pytest
import torch

from algorithms.dwm.weighter import Weighter, WeighterConfig


def _trained_like(weighter: Weighter) -> Weighter:
    """Give the zero-initialised head non-zero parameters, as after a refit."""
    with torch.no_grad():
        torch.manual_seed(7)
        weighter.score_head.weight.normal_(std=3.0)
    return weighter


def _batch(n=12, length=10, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # some padded rows
    return ids, mask


def test_uniform_at_init():
    weighter = Weighter(WeighterConfig(vocab_size=64, d_model=32, n_heads=4))
    ids, mask = _batch()
    w = weighter(ids, mask)
    assert torch.equal(w, torch.full_like(w, w[0].item()))  # exactly equal
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-6)


@pytest.mark.parametrize('batch_layers', [1, 2])
def test_positive_mean_one_and_bounded_below(batch_layers):
    lam = 0.2
    weighter = _trained_like(Weighter(WeighterConfig(vocab_size=64, d_model=32, batch_layers=batch_layers,
                                                     mix_uniform=lam, tau=0.5)))
    w = weighter(*_batch())
    assert w.std() > 0.05  # not uniform any more
    assert (w >= lam - 1e-6).all() and (w > 0).all()
    torch.testing.assert_close(w.mean(), torch.tensor(1.0), rtol=0, atol=1e-6)


def test_permutation_equivariant():
    weighter = _trained_like(Weighter(WeighterConfig(vocab_size=64, d_model=32, batch_layers=2)))
    ids, mask = _batch()
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(1))
    w = weighter(ids, mask)
    w_perm = weighter(ids[perm], mask[perm])
    torch.testing.assert_close(w_perm, w[perm], rtol=1e-5, atol=1e-6)


def test_weights_depend_on_the_rest_of_the_batch():
    weighter = _trained_like(Weighter(WeighterConfig(vocab_size=64, d_model=32)))
    ids, mask = _batch()
    other, other_mask = _batch(seed=5)
    a = weighter(ids, mask)[:4] / weighter(ids, mask)[0]
    mixed_ids = torch.cat([ids[:4], other[4:]])
    b = weighter(mixed_ids, torch.cat([mask[:4], other_mask[4:]]))[:4]
    assert not torch.allclose(a, b / b[0])


def test_split_api_equals_forward_and_padding_is_ignored():
    weighter = _trained_like(Weighter(WeighterConfig(vocab_size=64, d_model=32)))
    ids, mask = _batch()
    emb = torch.cat([weighter.embed(ids[:5], mask[:5]), weighter.embed(ids[5:], mask[5:])])
    torch.testing.assert_close(weighter.weights_from_embeddings(emb), weighter(ids, mask))
    garbage = ids.clone()
    garbage[mask == 0] = 3
    torch.testing.assert_close(weighter.embed(garbage, mask), weighter.embed(ids, mask), rtol=1e-5, atol=1e-6)


def test_same_seed_same_init_and_rng_untouched():
    state = torch.random.get_rng_state()
    a = Weighter(WeighterConfig(vocab_size=64, d_model=32, seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = Weighter(WeighterConfig(vocab_size=64, d_model=32, seed=3))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match='bogus'):
        WeighterConfig.from_any({'bogus': 1})
    with pytest.raises(ValueError, match='vocab_size'):
        Weighter(WeighterConfig())


def test_hf_backbone_from_local_path(tmp_path):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaModel(cfg).save_pretrained(tmp_path / 'backbone')
    weighter = Weighter(WeighterConfig(backbone=str(tmp_path / 'backbone'), d_model=16, n_heads=2))
    ids, mask = _batch()
    assert weighter.embed(ids, mask).shape == (12, 16)
    w = weighter(ids, mask)
    assert torch.equal(w, torch.full_like(w, w[0].item()))
