"""QuRating selection from score columns and annotations; annotation with a tiny local model."""

import os

import numpy as np
import pytest

from dwm_stream.select.budget import domain_budgets, select_to_budget
from dwm_stream.cli import main as cli_main
from dwm_stream.select.qurating import (CRITERIA, annotate_qurating, qurating_logits, select_qurating,
                                 token_weighted_mean, window_bounds)
from dwm_stream.data.selection import read_selection, write_selection
from dwm_stream.demo.loopback_s3 import upload_dir
from dwm_stream.testing.synthetic import SYNTHETIC_DOMAINS

N = 400
SEQ_LEN = 32


@pytest.fixture(scope='module')
def rated_corpus(synthetic_mds):
    """A synthetic corpus with the four QuRating score columns (sample i scores i / N)."""
    return synthetic_mds('rated', N, seq_len=SEQ_LEN, vocab_size=2048, seed=1, size_limit=1 << 12,
                         score_names=CRITERIA)


def _uids(path):
    return sorted(read_selection(path).uids.tolist())


def test_tau_to_zero_equals_top_k(rated_corpus, tmp_path):
    budget = 100 * SEQ_LEN
    for per_domain in (False, True):
        cold = select_qurating(rated_corpus, 'educational_value', str(tmp_path / f'cold{per_domain}.parquet'),
                               budget, tau=1e-6, sample=True, per_domain=per_domain, seed=5)
        topk = select_qurating(rated_corpus, 'educational_value', str(tmp_path / f'topk{per_domain}.parquet'),
                               budget, sample=False, per_domain=per_domain)
        assert _uids(cold.out) == _uids(topk.out)
    # top-k without domains: exactly the highest-scoring samples that fit the budget
    plain = select_qurating(rated_corpus, 'educational_value', str(tmp_path / 'plain.parquet'), budget,
                            sample=False)
    assert plain.scores[plain.selected].min() >= np.sort(plain.scores)[-len(plain.selected)]
    # a warm temperature samples: seeded, different from top-k, still tilted toward high scores
    warm = select_qurating(rated_corpus, 'educational_value', str(tmp_path / 'warm.parquet'), budget, tau=0.2,
                           zscore=True, seed=5)
    again = select_qurating(rated_corpus, 'educational_value', str(tmp_path / 'warm2.parquet'), budget, tau=0.2,
                            zscore=True, seed=5)
    assert _uids(warm.out) == _uids(again.out) != _uids(plain.out)
    assert warm.scores[warm.selected].mean() > warm.scores.mean() + 0.1


def test_per_domain_follows_token_shares(rated_corpus, tmp_path):
    budget = 200 * SEQ_LEN
    report = select_qurating(rated_corpus, 'writing_style', str(tmp_path / 'dom.parquet'), budget, tau=1.0,
                             per_domain=True)
    corpus_share, sel_share = report.shares()
    for name in SYNTHETIC_DOMAINS:
        assert sel_share[name] == pytest.approx(corpus_share[name], abs=2 * SEQ_LEN / budget)
    assert sum(domain_budgets(np.array([0, 0, 1]), np.array([10, 10, 10]), 7).values()) == 7


def test_select_to_budget_is_gumbel_top_k():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    counts = np.zeros(3)
    for seed in range(3000):
        counts[select_to_budget(logits, np.ones(3, np.int64), 1, sample=True, seed=seed)[0]] += 1
    np.testing.assert_allclose(counts / 3000, [0.6, 0.3, 0.1], atol=0.03)
    assert qurating_logits(np.array([1.0, np.nan]), 0.5).tolist()[0] == 2.0


def test_cli_and_bad_input(rated_corpus, converted_mds, tmp_path):
    out = str(tmp_path / 'cli.parquet')
    assert cli_main(['select', 'qurating', '--corpus', rated_corpus, '--criterion', 'educational_value',
                     '--tau', '2.0', '--budget-tokens', str(50 * SEQ_LEN), '--per-domain', '--out', out,
                     '--no-progress']) == 0
    assert read_selection(out).info['criterion'] == 'educational_value'
    with pytest.raises(ValueError, match=rf'{os.path.basename(converted_mds)}.*score_educational_value'):
        select_qurating(converted_mds, 'educational_value', str(tmp_path / 'a.parquet'), 1000)
    with pytest.raises(ValueError, match=r'--budget-tokens .* exceeds'):
        select_qurating(rated_corpus, 'educational_value', str(tmp_path / 'b.parquet'), 10**9)
    with pytest.raises(ValueError, match='--tau'):
        select_qurating(rated_corpus, 'educational_value', str(tmp_path / 'c.parquet'), 1000, tau=0.0)
    # the CLI prints the error naming the input and exits 2
    assert cli_main(['select', 'qurating', '--corpus', converted_mds, '--budget-tokens', '1000',
                     '--out', str(tmp_path / 'd.parquet'), '--no-progress']) == 2


@pytest.fixture(scope='module')
def tiny_rater(small_tokenizer, tmp_path_factory):
    """A randomly initialised 4-output LlamaForSequenceClassification sharing the fixture tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dwm_stream.convert.tokenizer import load_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         num_labels=4)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = str(tmp_path_factory.mktemp('rater') / 'qurater-tiny')
    model.save_pretrained(path)
    load_tokenizer(small_tokenizer).save_pretrained(path)
    return path


def test_annotate_then_select(tiny_rater, converted_mds, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification

    from dwm_stream.format.reader import CorpusReader
    annotations = str(tmp_path / 'ratings.parquet')
    assert cli_main(['annotate', 'qurating', '--model', tiny_rater, '--corpus', converted_mds, '--out',
                     annotations, '--window', '100', '--batch-size', '64', '--device', 'cpu', '--no-progress']) == 0
    table = pq.read_table(annotations)
    reader = CorpusReader(converted_mds)
    assert table.column_names == ['uid'] + [f'score_{c}' for c in CRITERIA]
    np.testing.assert_array_equal(table.column('uid').to_numpy(), reader.uids)
    ratings = np.stack([table.column(f'score_{c}').to_numpy() for c in CRITERIA], 1)
    assert np.isfinite(ratings).all() and ratings.std(0).min() > 0

    # one sample by hand: 100-token windows, rated separately, averaged by token count
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rater).eval()
    records = reader.read_shard(0)
    k = int(np.argmin(records['num_tokens']))  # a padded final sample: uneven windows
    ids = records['tokens'][k][:records['num_tokens'][k]].astype(np.int64)
    bounds = window_bounds(len(ids), 100)
    with torch.no_grad():
        logits = np.stack([model(input_ids=torch.tensor(ids[b:e])[None]).logits[0].numpy() for b, e in bounds])
    expected = token_weighted_mean(logits, [e - b for b, e in bounds])
    np.testing.assert_allclose(ratings[k], expected, rtol=1e-4, atol=1e-5)

    out = str(tmp_path / 'sel.parquet')
    report = select_qurating(converted_mds, 'facts_and_trivia', out, 20_000, tau=0.5, annotations=annotations)
    selection = read_selection(out)
    assert sorted(selection.scores) == sorted(CRITERIA)  # carried for DWM's Spearman analysis
    assert report.scores[report.selected].mean() > report.scores.mean()

    bad = str(tmp_path / 'bad.parquet')
    write_selection(bad, np.array([12345, int(reader.uids[0])]), scores={'facts_and_trivia': np.ones(2)})
    with pytest.raises(ValueError, match=r'bad\.parquet.*12345'):
        select_qurating(converted_mds, 'facts_and_trivia', str(tmp_path / 'x.parquet'), 1000, annotations=bad)
    with pytest.raises(ValueError, match=r'bad\.parquet.*score_writing_style'):
        select_qurating(converted_mds, 'writing_style', str(tmp_path / 'y.parquet'), 1000, annotations=bad)
    with pytest.raises(ValueError, match='outputs but 3 labels'):
        annotate_qurating(tiny_rater, converted_mds, str(tmp_path / 'z.parquet'), labels=CRITERIA[:3])


@pytest.mark.slow
def test_selects_from_s3_as_from_local(rated_corpus, loopback_s3, tmp_path):
    upload_dir(loopback_s3.client(), rated_corpus, 'dwm-test', 'qurating-test/mds')
    local = select_qurating(rated_corpus, 'required_expertise', str(tmp_path / 'local.parquet'), 60 * SEQ_LEN,
                            tau=0.5, seed=2)
    remote = select_qurating('s3://dwm-test/qurating-test/mds', 'required_expertise',
                             str(tmp_path / 'remote.parquet'), 60 * SEQ_LEN, tau=0.5, seed=2, workers=2)
    assert _uids(local.out) == _uids(remote.out)
