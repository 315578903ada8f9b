"""Per-sample and weighted losses against HuggingFace's own causal-LM loss."""

import math

import torch
from dwm_testing import tiny_llama
from scipy.stats import spearmanr

from algorithms.dwm.functional import (logits_of, loss_contributions, per_sample_loss, per_sample_loss_sums, spearman,
                                       weighted_loss)


def _logits_and_labels():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 12), generator=gen)
    labels = ids.clone()
    labels[1, 7:] = -100
    labels[2, :5] = -100
    out = model(input_ids=ids, labels=labels)
    return out.logits.detach(), labels, out.loss.detach()


def test_all_ones_weights_equal_hf_loss():
    logits, labels, hf_loss = _logits_and_labels()
    ours = weighted_loss(logits, labels, torch.ones(4))
    torch.testing.assert_close(ours.loss, hf_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.per_sample, per_sample_loss(logits, labels))


def test_per_sample_loss_matches_single_sample_hf_loss():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 4:] = -100
    logits = model(input_ids=ids).logits.detach()
    per_sample = per_sample_loss(logits, labels)
    for i in range(3):
        single = model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss.detach()
        torch.testing.assert_close(per_sample[i], single, rtol=1e-5, atol=1e-6)


def test_shifted_labels_and_ignored_tokens():
    logits, labels, _ = _logits_and_labels()
    a = per_sample_loss_sums(logits, labels)
    b = per_sample_loss_sums(logits[:, :-1], labels[:, 1:], shifted=True)
    torch.testing.assert_close(a, b)
    assert a[1][1] == 6 and a[1][0] > 0  # 7 real labels -> 6 predicted tokens
    no_tokens = torch.full_like(labels, -100)
    s, c = per_sample_loss_sums(logits, no_tokens)
    assert torch.equal(s, torch.zeros(4)) and torch.equal(c, torch.zeros(4))
    assert torch.equal(per_sample_loss(logits, no_tokens), torch.zeros(4))


def test_weights_scale_sample_contributions():
    logits, labels, _ = _logits_and_labels()
    loss_sum, count = per_sample_loss_sums(logits, labels)
    w = torch.tensor([0.0, 2.0, 1.0, 1.0])
    expected = (w * loss_sum).sum() / count.sum()
    torch.testing.assert_close(weighted_loss(logits, labels, w).loss, expected)
    sample = weighted_loss(logits, labels, w, normalization='sample').loss
    torch.testing.assert_close(sample, (w * loss_sum / count).mean())
    torch.testing.assert_close(loss_contributions(loss_sum, count, total_tokens=100.0), loss_sum / 100.0)


def test_spearman_matches_scipy_with_ties_and_is_nan_when_undefined():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, 5, (40,), generator=g).double()  # many ties
        y = torch.randn(40, generator=g, dtype=torch.float64) + x
        assert abs(spearman(x, y) - float(spearmanr(x.numpy(), y.numpy()).statistic)) < 1e-12
    assert math.isnan(spearman(torch.ones(10), torch.randn(10)))
    assert math.isnan(spearman(torch.randn(2), torch.randn(2)))


def test_logits_of_reads_dict_and_object_outputs():
    logits = torch.randn(2, 3, 5)
    assert logits_of({'logits': logits}) is logits
    assert logits_of(type('Out', (), {'logits': logits})()) is logits
