"""``dwm-stream bench gpu --dry-run`` (through the CLI) runs every part on CPU and its JSON says what happened: both
YAML runs trained, DWM refitted inside its run, every ratio is real and positive, the chunked JVP used less memory than
the unchunked one; its RESULTS.md section is what the JSON renders. Without CUDA, ``bench gpu`` runs the dry run (with a note) and
never writes into the committed results."""

import math
import os

import pytest
from bench_module import OTHER_SECTION, ROOT, load_bench


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    bench = load_bench('gpu')
    root = tmp_path_factory.mktemp('gpu-bench')
    results_md = root / 'RESULTS.md'
    results_md.write_text('# Benchmark results\n\n' + OTHER_SECTION + '\n' + bench.BEGIN_MARK + '\nstale 9.99\n' +
                          bench.END_MARK + '\n')
    out = root / 'results'
    from dwm_stream.cli import main as cli  # as a user runs it: `dwm-stream bench gpu --dry-run`
    assert cli(['bench', 'gpu', '--dry-run', '--out', str(out), '--data-dir', str(root / 'data')]) == 0
    import json
    with open(out / 'gpu.json') as f:
        return bench, json.load(f), results_md


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_trains_both_yamls_and_refits(dry_run):
    _, res, _ = dry_run
    assert res['benchmark'] == 'gpu' and res['source'] == 'measured' and res['dry_run'] is True
    assert res['device'] == 'cpu' and {'torch', 'mosaicml', 'transformers'} <= set(res['versions'])
    settings = res['settings']
    uniform, dwm = res['train']['uniform'], res['train']['dwm']
    assert uniform['yaml'] == 'slimpajama-370m-random.yaml' and dwm['yaml'] == 'slimpajama-370m-random-dwm.yaml'
    for run in (uniform, dwm):  # both trained every batch, timed after the warm-up
        assert len(run['all_steps_s']) == settings['batches'] - 1  # intervals between BATCH_ENDs
        assert run['steps_timed'] >= 3 and all(_positive(s) for s in run['all_steps_s'])
        assert _positive(run['tokens_per_s']) and run['memory']['peak_mib'] > 0
        assert run['params'] > 0 and run['attn_implementation'] == 'sdpa'
    assert uniform['refits_done'] == 0 and not uniform['refits']
    # DWM refits at step 0 and at each stage boundary: at least 2 inside the run, each timed by DWM itself
    assert dwm['refits_done'] == settings['stages'] >= 2
    assert len(dwm['refits']) == dwm['refits_done']
    assert all(_positive(r['dwm/refit/wall_time']) and r['dwm/refit/steps'] == settings['refit_steps']
               for r in dwm['refits'])
    assert len(dwm['refit_steps_marked']) == dwm['refits_done'] - 1  # the boundary refits, not the one at step 0
    assert dwm['weighter_params'] > 0
    ratios = res['train']['ratios']
    assert _positive(ratios['dwm_step_over_uniform']) and _positive(ratios['dwm_memory_over_uniform'])
    assert ratios['refit_wall_s_total'] == pytest.approx(sum(r['dwm/refit/wall_time'] for r in dwm['refits']))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_plain_pytorch_jvp_memory_and_loader(dry_run):
    _, res, _ = dry_run
    plain = res['plain']
    reps = res['settings']['reps']
    for arm in ('plain', 'weighted', 'weighter_forward', 'refit_fp32'):
        assert len(plain['all_seconds'][arm]) == reps and all(_positive(s) for s in plain['all_seconds'][arm])
    r = plain['ratios']
    for name in ('weighted_over_plain', 'refit_fp32_over_plain'):
        assert r[name]['min'] <= r[name]['median'] <= r[name]['max'] and _positive(r[name]['median'])
    # a refit step does a look-ahead fwd/bwd, a validation fwd/bwd and a JVP: more work than one plain step
    assert r['refit_fp32_over_plain']['median'] > 1.0
    assert _positive(r['refit_memory_over_plain']) and _positive(r['weighted_memory_over_plain'])
    assert len(res['jvp_memory']) == 1
    jvp = res['jvp_memory'][0]
    assert jvp['seq_len'] == 2048 and jvp['query_block'] < jvp['seq_len']  # vocab 1024 / 4 heads: blocks of 256
    # attention over blocks of query rows needs less memory than the [B, H, T, T] scores
    assert 0 < jvp['chunked']['transient_mib'] < jvp['unchunked']['transient_mib']
    assert jvp['model_mib']['attention'] < jvp['model_mib']['attention_unchunked']
    loader = res['loader']
    assert [x['name'] for x in loader['ratios']][:len(loader['workers'])] == [
        f'{w} worker(s): DWMDataset / do-nothing DataLoader' for w in loader['workers']]
    assert all(_positive(x['median']) for x in loader['ratios'])
    assert _positive(res['data']['convert']['tokens_per_s'])
    names = [t['name'] for t in res['targets']]
    assert len(names) == 5 and all(t['met'] in (True, False, None) for t in res['targets'])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_section_is_made_from_the_json(dry_run):
    bench, res, results_md = dry_run
    text = results_md.read_text()
    assert bench.read_section(str(results_md)) == bench.render_section(res)
    assert 'stale 9.99' not in text and OTHER_SECTION.strip() in text and text.count('## GPU') == 1
    assert 'CPU dry run' in text


def _args(*argv):
    bench = load_bench('gpu')
    return bench, bench.build_parser().parse_args(list(argv))


def test_without_cuda_runs_the_dry_run_into_a_temporary_directory():
    bench, args = _args()
    notes = bench.resolve_run(args, cuda_available=False)
    assert args.dry_run is True
    assert 'no CUDA device' in notes[0]
    results = os.path.join(ROOT, 'benchmarks', 'results')
    assert os.path.abspath(args.out) != results and not args.out.startswith(os.path.join(ROOT, 'benchmarks'))
    assert args.results_md == os.path.join(args.out, 'RESULTS.md')
    os.rmdir(args.out)


def test_with_cuda_the_real_run_writes_the_committed_record():
    bench, args = _args()
    assert bench.resolve_run(args, cuda_available=True) == []
    assert args.dry_run is False and os.path.abspath(args.out) == os.path.join(ROOT, 'benchmarks', 'results')


def test_dry_run_honours_an_explicit_out(tmp_path):
    bench, args = _args('--quick', '--out', str(tmp_path / 'r'))
    bench.resolve_run(args, cuda_available=True)
    assert args.dry_run is True and args.out == str(tmp_path / 'r') and args.results_md is None


def test_jvp_memory_model_at_the_370m_yaml():
    """At the 370M YAML's shape, refit batch 16 x 2048 in fp32: the unchunked scores are 4 x 16 x 16 x 2048^2 x 4
    bytes (16 GiB) per layer, the LM head 4 x 16 x 2048 x 50304 x 4 bytes (24.6 GiB): the head bounds the JVP, and
    jvp_attention's rule runs one block. At seq 8192 the scores (256 GiB) would bound it; in blocks they do not."""
    bench = load_bench('gpu')
    m = bench.jvp_memory_model(bench.MODELS['370m'], 16, 2048)
    assert m['attention_unchunked'] == 16 * 2**30
    assert m['head'] == 4 * 16 * 2048 * 50304 * 4
    assert m['bound_unchunked'] == m['bound'] == 'LM head (logits)'
    assert m['query_block'] >= 2048 and m['blocks'] == 1 and m['attention'] == m['attention_unchunked']
    long = bench.jvp_memory_model(bench.MODELS['370m'], 16, 8192)
    assert long['bound_unchunked'] == 'attention scores' and long['bound'] == 'LM head (logits)'
    assert long['blocks'] == 3 and long['attention'] <= long['head']


@pytest.mark.parametrize('model', ['124m', '370m'])
def test_the_gpu_run_overrides_load_against_the_shipped_yamls(model, tmp_path):
    """The real run's overrides (which the CPU dry run does not use as they are: GPU device, workers, compile) are
    valid keys of the shipped YAMLs and give the sizes the module docstring budgets for; everything else is the
    YAML's own (amp_bf16, SDPA, compile_config, the 512-wide weighter)."""
    from dwm_stream.train.entry import load_config
    bench = load_bench('gpu')
    args = bench.build_parser().parse_args(['--model', model])
    budget = bench._budget(args, cuda=True)
    paths = {'tokenizer': str(tmp_path / 'tok'), 'train': str(tmp_path / 'train'),
             'lambada_fit': str(tmp_path / 'lambada.jsonl')}
    shape = bench.MODELS[model]
    for yaml, dwm in ((bench.YAML_UNIFORM, False), (bench.YAML_DWM, True)):
        cfg = load_config(str(yaml), bench._overrides(budget, paths, str(tmp_path / 'run'), 'gpu', dwm))
        assert cfg['device'] == 'gpu' and cfg['precision'] == 'amp_bf16' and cfg['compile_config'] == {}
        assert cfg['model']['attn_implementation'] == 'sdpa'
        assert cfg['model']['config_overrides']['hidden_size'] == shape['hidden']
        assert cfg['max_seq_len'] == shape['seq_len'] and cfg['max_duration'] == '60ba'
        assert cfg['global_train_batch_size'] == 32 and cfg['device_train_microbatch_size'] == 16
        assert cfg['train_loader']['num_workers'] == 4 and cfg['train_loader']['dataset']['local'] == paths['train']
        if dwm:
            d = cfg['algorithms']['dwm']
            assert d['num_stages'] == 3 and d['refit_steps'] == (20 if model == '124m' else 5)
            assert d['weighter']['d_model'] == 512 and d['validation']['lambada'] == paths['lambada_fit']
        else:
            assert not cfg.get('algorithms')
