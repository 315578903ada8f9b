"""The DWM overhead benchmark runs end to end (``--quick``), writes valid JSON, and its RESULTS.md section is the one
the JSON produces (no hand-edited numbers); other sections of RESULTS.md are left alone."""

import math

import pytest
from bench_module import OTHER_SECTION
from bench_module import quick_run as run_bench


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    bench, results, _, results_md = run_bench('dwm_overhead', tmp_path_factory.mktemp('bench'), 'dwm_overhead.json')
    return bench, results, results_md


def _summary_ok(s, n=None):
    assert s['min'] <= s['median'] <= s['max']
    assert all(math.isfinite(x) for x in s['all'])
    if n is not None:
        assert s['n'] == n == len(s['all'])


@pytest.mark.slow
def test_json_schema(quick_run):
    bench, res, _ = quick_run
    assert res['benchmark'] == 'dwm_overhead' and res['schema_version'] == bench.SCHEMA_VERSION
    assert res['quick'] is True and res['command'] == 'python -m benchmarks.dwm_overhead --quick'
    machine = res['machine']
    assert machine['nproc'] > 0 and machine['ram_gb'] > 0 and machine['torch_threads'] >= 1 and machine['python']
    assert len(machine['load_avg_start']) == 3 and len(machine['load_avg_end']) == 3
    assert {'torch', 'mosaicml', 'transformers'} <= set(res['versions'])
    settings = res['settings']
    reps = settings['reps']
    assert reps >= 2 and settings['steps_per_rep'] >= 1 and settings['memory_reps'] >= 2
    assert {(c['ratio_target'], c['batch']) for c in res['configs']} == {(0.25, 8), (0.25, 32), (1.0, 8), (1.0, 32)}
    for cfg in res['configs']:
        assert 0.15 < cfg['weighter']['param_ratio'] < 0.4 if cfg['ratio_target'] == 0.25 else \
            0.7 < cfg['weighter']['param_ratio'] < 1.4
        assert 0 < cfg['flops']['weighter_forward_share'] < 1
        assert cfg['flops']['refit_over_plain_flops'] > 3
        for clock in ('wall', 'cpu'):
            for arm in ('plain', 'dwm'):
                _summary_ok(cfg['step_time_s'][arm][clock], reps)
                assert cfg['step_time_s'][arm][clock]['min'] > 0
            for arm in ('plain', 'jvp'):
                _summary_ok(cfg['refit_time_s'][arm][clock], reps)
            for name in ('weighting_overhead', 'refit_over_plain'):
                _summary_ok(cfg['ratios'][name][clock], reps)
    main = [c for c in res['configs'] if 'weighting_overhead_two_ce' in c['ratios']]
    assert len(main) == 1 and (main[0]['ratio_target'], main[0]['batch']) == (0.25, 8)
    for name in ('weighting_overhead_two_ce', 'refit_over_plain_jvp_eager', 'refit_over_plain_fd'):
        _summary_ok(main[0]['ratios'][name]['cpu'], reps)
    vocab = res['vocab_ablation']
    assert vocab['vocab'] > settings['llm']['vocab']
    for name in ('weighting_overhead', 'weighting_overhead_two_ce'):
        _summary_ok(vocab['ratios'][name]['cpu'], reps)
    names = [m['name'] for m in res['memory']]
    assert {c['name'] for c in res['configs']} < set(names) and len(names) == 6
    for mem in res['memory']:
        assert len(mem['plain_step']) == len(mem['refit_step']) == settings['memory_reps']
        for key in ('transient_ratio', 'peak_ratio', 'plain_transient_mib', 'refit_transient_mib'):
            _summary_ok(mem[key])
        assert mem['plain_transient_mib']['median'] > 0 and mem['peak_ratio']['median'] > 0.5
    assert [t['name'] for t in res['targets']] == [c['name'] for c in res['configs']]
    for t in res['targets']:
        assert t['overhead_ok'] == (t['weighting_overhead'] <= t['overhead_bound'])
        assert t['refit_ok'] == (t['refit_over_plain'] <= 4.0)
        assert t['memory_ok'] == (t['transient_memory_ratio'] <= 1.5)
        cfg = next(c for c in res['configs'] if c['name'] == t['name'])
        assert t['weighting_overhead'] == cfg['ratios']['weighting_overhead']['cpu']['median']


@pytest.mark.slow
def test_results_md_is_made_from_the_json(quick_run):
    bench, res, results_md = quick_run
    text = results_md.read_text()
    section = bench.read_section(str(results_md))
    assert section == bench.render_section(res, res['command'])
    assert 'stale 9.99' not in text and text.count('## DWM overhead') == 1
    assert OTHER_SECTION in text and text.endswith('trailing text\n')  # other sections untouched
    # Every number of the targets table comes from the JSON.
    for t in res['targets']:
        assert f'{100 * t["weighting_overhead"]:+.1f}%' in section
        assert f'{t["refit_over_plain"]:.2f}x' in section


def test_model_shapes_for_the_gpu():
    """``--model 124m|370m`` are the GPU benchmark's Llama shapes (built on the meta device here: no memory), and the
    weighter for a parameter ratio is found without allocating one."""
    from bench_module import load_bench
    bench = load_bench('dwm_overhead')
    import torch
    from transformers import LlamaForCausalLM
    for name, low, high in (('124m', 110e6, 135e6), ('370m', 330e6, 420e6)):
        shape = bench._llm_shape(False, name)
        with torch.device('meta'):
            n = sum(p.numel() for p in LlamaForCausalLM(bench._llama_config(shape)).parameters())
        # untied embeddings here (the overhead bench's Llama): subtract the LM head to compare with the YAML's size
        assert low < n - shape['vocab'] * shape['hidden'] < high, (name, n)
    shape = bench._llm_shape(False, '124m')
    wcfg = bench._weighter_config(shape, 124e6, 0.25, shape['seq_len'])
    from algorithms.dwm import Weighter
    with torch.device('meta'):
        assert 0.2 < Weighter(wcfg).num_parameters() / 124e6 < 0.3
    flops = bench._flops(shape, wcfg, 8, shape['seq_len'])  # the FFN width is the shape's, not 4 x hidden
    assert flops['llm_matmul_params'] == 12 * (4 * 768 ** 2 + 3 * 768 * 2048) + 768 * 50304


def test_cuda_without_a_gpu_is_a_clear_error():
    import pytest
    import torch
    from bench_module import load_bench
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is here')
    with pytest.raises(ValueError, match='--device cuda'):
        load_bench('dwm_overhead').run_benchmark(quick=True, device='cuda')
