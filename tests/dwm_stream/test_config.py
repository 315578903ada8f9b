"""The YAML schema (``dwm_stream.train.config``): it matches what it configures, and it is strict.

The dataset, stream and loader sections are the signatures of what they configure, read from source so that a YAML
is checked before the heavy imports; the tests here check that reading against the imported signatures.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import types
import typing
from types import SimpleNamespace
from typing import Any

import pytest
from composer.core import Time, Timestamp
from streaming import Stream, StreamingDataset

from algorithms.dwm import DWMConfig, WeighterConfig
from dwm_stream.data.dataset import DWMDataset, DWMStream
from dwm_stream.data.loader import build_dataloader
from dwm_stream.train import builders, config, entry
from dwm_stream.schema import source_signature
from dwm_stream.train.config import ConfigError, check
from dwm_stream.train.foundry import DWMAlgorithm, build_dwm_dataloader


# ------------------------------------------------------------------------------------------------ signatures
@pytest.mark.parametrize('module, qualname, fn', [
    ('dwm_stream.data.dataset', 'DWMDataset.__init__', DWMDataset.__init__),
    ('dwm_stream.data.dataset', 'DWMStream.__init__', DWMStream.__init__),
    ('streaming.base.dataset', 'StreamingDataset.__init__', StreamingDataset.__init__),
    ('streaming.base.stream', 'Stream.__init__', Stream.__init__),
    ('dwm_stream.data.loader', 'build_dataloader', build_dataloader),
])
def test_a_signature_read_from_source_is_the_imported_one(module, qualname, fn):
    """The dataset, stream and loader schemas are these signatures, read without importing torch or streaming: the
    same names and kinds, the same defaults where the source writes a literal (another default reads as None, 'not
    given', as every default does in a schema), and the same types where the schema types a value."""
    read = {p.name: p for p in source_signature(module, qualname)}
    real = inspect.signature(fn).parameters
    assert list(read) == list(real)
    hints = typing.get_type_hints(fn)
    for name, p in real.items():
        assert read[name].kind == p.kind, name
        assert read[name].default in (p.default, None), name
        if name in hints and read[name].annotation not in (Any, inspect.Parameter.empty):
            assert read[name].annotation == hints[name], name
    assert sum(p.default == real[p.name].default for p in read.values()) >= len(real) - 2  # all but a name or two


def test_sections_are_the_signatures_of_what_they_configure():
    dataset = {f.name for f in dataclasses.fields(config.DatasetConfig)}
    assert dataset == (set(inspect.signature(StreamingDataset.__init__).parameters) - {'self', 'stream_name',
                                                                                       'stream_config'}
                       | set(inspect.signature(DWMDataset.__init__).parameters) - {'self', 'kwargs'})
    stream = {f.name for f in dataclasses.fields(config.StreamConfig)}
    assert stream == (set(inspect.signature(Stream.__init__).parameters)
                      | set(inspect.signature(DWMStream.__init__).parameters)) - {'self', 'kwargs'}
    loader = {f.name for f in dataclasses.fields(config.LoaderConfig)}
    assert loader == set(inspect.signature(build_dataloader).parameters) - {'dataset_cfg', 'device_batch_size',
                                                                            'where'} | {'name', 'dataset'}
    # An unset key is None: the callee's default applies, written once, in its signature.
    assert all(f.default is None for f in dataclasses.fields(config.DatasetConfig))


def test_dwm_section_is_dwms_own_config_plus_the_loaders():
    """The YAML's ``algorithms.dwm`` is DWM's own config (written once, beside DWM), plus the two loaders."""
    own = {f.name for f in dataclasses.fields(DWMConfig)}
    section = {f.name for f in dataclasses.fields(config.DWMSection)}
    assert issubclass(config.DWMSection, DWMConfig) and section - own == {'refit_loader', 'validation'}


# ------------------------------------------------------------------------------------------------ strictness
def _error(schema: type, cfg: Any, where: str = 'x') -> str:
    with pytest.raises(ConfigError) as info:
        check(schema, cfg, where)
    return str(info.value)


@pytest.mark.parametrize('value', ['false', 'true', 'no', 1, 0])
def test_bool_takes_only_a_bool(value):
    """OmegaConf alone would read "false", "no" or 0 as False and "true" or 1 as True."""
    message = _error(config.DatasetConfig, {'shuffle': value}, 'train_loader.dataset')
    assert message.startswith('train_loader.dataset.shuffle: expected bool'), message


@pytest.mark.parametrize('schema, cfg, key', [
    (config.DWMSection, {'weighter': {'d_model': 'big'}}, 'algorithms.dwm.weighter.d_model'),
    (config.DWMSection, {'weighter': {'tau': '1.0'}}, 'algorithms.dwm.weighter.tau'),
    (config.DWMSection, {'num_stages': 2.5}, 'algorithms.dwm.num_stages'),
    (config.DWMSection, {'num_stages': True}, 'algorithms.dwm.num_stages'),
    (config.DWMSection, {'stage_boundaries': '10ba'}, 'algorithms.dwm.stage_boundaries'),
    (config.DWMSection, {'refit_loader': {'dataset': {'shuffle_seed': 'x'}}},
     'algorithms.dwm.refit_loader.dataset.shuffle_seed'),
    (config.DWMSection, {'validation': {'dataset': {'streams': {'a': {'proportion': 'half'}}}}},
     'algorithms.dwm.validation.dataset.streams.a.proportion'),
])
def test_wrong_type_names_the_full_key(schema, cfg, key):
    message = _error(schema, cfg, 'algorithms.dwm')
    assert message.startswith(f'{key}: expected'), message


def test_unknown_keys_are_all_named_with_the_valid_ones():
    message = _error(config.DatasetConfig, {'shufle': True, 'lcoal': '/tmp'}, 'train_loader.dataset')
    assert "unknown key(s) ['lcoal', 'shufle']" in message and "'shuffle'" in message and "'local'" in message


def test_streams_mapping_and_list():
    cfg = {'streams': {'web': {'local': '/a', 'proportion': 0.75}, 'code': {'local': '/b', 'proportion': 1}}}
    dataset = check(config.DatasetConfig, cfg)
    assert dataset.streams['code'].proportion == 1.0 and isinstance(dataset.streams['code'].proportion, float)
    message = _error(config.DatasetConfig, {'streams': [{'local': '/a'}, {'lcoal': '/b'}]}, 'd')
    assert message.startswith("d.streams.1: unknown key(s) ['lcoal']"), message


def test_a_scalar_where_a_section_belongs():
    message = _error(config.DWMSection, {'weighter': 64}, 'algorithms.dwm')
    assert message.startswith('algorithms.dwm.weighter: expected a mapping of') and 'd_model' in message


def test_defaults_and_typed_values():
    dwm = check(config.DWMSection, {'weighter': {'d_model': 64}, 'refit_lr': 1})
    assert isinstance(dwm.weighter, WeighterConfig) and dwm.weighter.d_model == 64
    assert dwm.refit_lr == 1.0 and isinstance(dwm.refit_lr, float)
    assert dwm.num_stages == 5  # DWM's default
    loader = check(config.LoaderConfig, {'dataset': {'local': '/x', 'shuffle_seed': 7}})
    assert loader.dataset.shuffle_seed == 7 and loader.dataset.shuffle is None  # unset: the dataset's default


def test_required_keys():
    message = _error(config.TrainConfig, {'model': {}}, '')
    for key in ('global_train_batch_size', 'max_duration', 'tokenizer', 'train_loader'):
        assert f'`{key}`' in message, message
    assert '`model`' not in message  # given (all its keys have defaults)


def test_scheduler_by_name():
    assert config.check_scheduler({'name': 'cosine_with_warmup', 't_warmup': '10ba', 'alpha_f': 0}) == \
        config.Component('cosine_with_warmup', {'t_warmup': '10ba', 'alpha_f': 0.0})
    with pytest.raises(ConfigError, match=r"scheduler\.name: 'cosine'.*cosine_with_warmup"):
        config.check_scheduler({'name': 'cosine', 't_warmup': '10ba'})
    with pytest.raises(ConfigError, match=r"scheduler: unknown key\(s\) \['alpha'\].*alpha_f"):
        config.check_scheduler({'name': 'cosine_with_warmup', 't_warmup': '10ba', 'alpha': 0.1})


# ------------------------------------------------------------------------------------------------ entry points
def test_foundry_dataloader_names_the_key():
    """Under LLM Foundry the same schema applies, before any data is read."""
    with pytest.raises(ConfigError) as info:
        build_dwm_dataloader(None, 4, dataset={'local': '/nonexistent', 'shufle': True})
    assert str(info.value).startswith("train_loader.dataset: unknown key(s) ['shufle']")
    assert "'shuffle'" in str(info.value)
    with pytest.raises(ConfigError, match=r'^train_loader\.dataset\.shuffle: expected bool'):
        build_dwm_dataloader(None, 4, dataset={'local': '/nonexistent', 'shuffle': 'false'})
    with pytest.raises(ConfigError, match=r"^train_loader: unknown key\(s\) \['num_worker'\]"):
        build_dwm_dataloader(None, 4, dataset={'local': '/nonexistent'}, num_worker=2)


def test_foundry_algorithm_names_the_key():
    with pytest.raises(ConfigError, match=r"^algorithms\.dwm\.weighter\.d_model: expected int, got str \('big'\)"):
        DWMAlgorithm(num_stages=2, refit=False, weighter={'d_model': 'big'})
    with pytest.raises(ConfigError, match=r"^algorithms\.dwm: unknown key\(s\) \['num_stage'\].*num_stages"):
        DWMAlgorithm(num_stage=2)


# ------------------------------------------------------------------------------------------------ console output
@pytest.mark.parametrize('progress_bar, log_to_console, terminal, expected', [
    (None, None, True, (True, False, False)),  # a bar on a terminal
    (None, None, False, (False, False, True)),  # one line per interval off it
    (True, None, False, (True, False, False)),  # what the YAML says wins
    (False, None, False, (False, True, False)),
    (None, True, True, (False, True, False)),
    (False, False, False, (False, False, False)),
])
def test_console_output(progress_bar, log_to_console, terminal, expected, monkeypatch):
    monkeypatch.setattr(entry, 'is_terminal', lambda stream=None: terminal)
    train = SimpleNamespace(progress_bar=progress_bar, log_to_console=log_to_console, console_log_interval='5ba')
    bar, console, extra = entry._console_output(train)
    assert (bar, console, bool(extra)) == expected
    if extra:
        assert isinstance(extra[0], entry.ConsoleLineLogger) and extra[0].log_interval == Time.from_timestring('5ba')


def test_console_line_logger_writes_one_short_line():
    stream = io.StringIO()
    logger = entry.ConsoleLineLogger(log_interval='10ba', stream=stream)
    state = SimpleNamespace(max_duration=Time.from_timestring('400ba'), timestamp=Timestamp(batch=50))
    metrics = {f'dwm/domain/d{i}/weight': 1.0 for i in range(20)}
    metrics.update({'loss/train/total': 3.25, 'lr-DecoupledAdamW/group0': 0.003, 'dwm/weight/ess': 0.9,
                    'time/batch': 50})
    logger.log_to_console(metrics, state=state, prefix='Train ')
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith('[batch=50/400] loss/train/total: 3.2500'), lines[0]
    assert 'lr-DecoupledAdamW/group0' in lines[0] and 'dwm/weight/ess' in lines[0] and 'dwm/domain' not in lines[0]


# ------------------------------------------------------------------------------------------------ LLM Foundry's keys
def _foundry_train_keys() -> set[str]:
    config_utils = pytest.importorskip('llmfoundry.utils.config_utils')
    return set(config_utils.TRAIN_CONFIG_KEYS)


def test_every_foundry_train_key_is_supported_ignored_or_refused():
    """Each key of LLM Foundry 0.22's TrainConfig is a TrainConfig field here (supported, or ignored with a warning)
    or refused naming llmfoundry train; and the README's YAML reference classifies every one of them."""
    ours = {f.name for f in dataclasses.fields(config.TrainConfig)}
    foundry = _foundry_train_keys()
    assert foundry <= ours | set(config.FOUNDRY_REFUSED), sorted(foundry - ours - set(config.FOUNDRY_REFUSED))
    assert not ours & set(config.FOUNDRY_REFUSED)
    assert set(config.FOUNDRY_IGNORED) <= ours and set(config.FOUNDRY_REFUSED) <= foundry
    with open(os.path.join(os.path.dirname(__file__), '..', '..', 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('## YAML reference'):readme.index('\n## ', readme.index('## YAML reference') + 1)]
    missing = sorted(key for key in foundry | ours if f'`{key}`' not in section)
    assert not missing, f'the README YAML reference does not classify {missing}'


@pytest.mark.parametrize('key', sorted(config.FOUNDRY_REFUSED))
def test_refused_foundry_key_names_llmfoundry_train(key):
    with pytest.raises(ConfigError) as info:
        config.check_train_config({key: None, 'model': {}, 'tokenizer': {'name': 't'}, 'max_duration': '1ba',
                                   'train_loader': {'dataset': {'local': '/x'}}, 'global_train_batch_size': 1})
    message = str(info.value)
    assert message.startswith(f'{key}: not supported by dwm-stream train (') and 'run `llmfoundry train`' in message


def test_a_list_of_eval_loaders_is_refused():
    with pytest.raises(ConfigError, match=r'^eval_loader: not supported by dwm-stream train \(a list'):
        config.check_train_config({'eval_loader': [{'name': 'dwm'}]})


def test_foundry_style_top_level_variables_point_to_variables():
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['data_local'\].*`variables:`"):
        config.check_train_config({'data_local': '/x'})


def test_variables_interpolate(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('variables:\n  seq: 128\n  local: /data\nmax_seq_len: ${variables.seq}\nmodel: {}\n'
                    'tokenizer:\n  name: t\n  kwargs:\n    model_max_length: ${variables.seq}\n'
                    'max_duration: 1ba\nglobal_train_batch_size: 2\ntrain_loader:\n  name: dwm\n  dataset:\n'
                    '    local: ${variables.local}\n    max_seq_len: ${variables.seq}\n')
    cfg = entry.load_config(str(path))
    assert cfg['max_seq_len'] == 128 and cfg['tokenizer']['kwargs'] == {'model_max_length': 128}
    assert cfg['train_loader']['dataset'] == {'local': '/data', 'max_seq_len': 128}


def test_composer_components_are_foundry_registry_entries():
    """The Composer classes known without LLM Foundry are the ones its registries hold under the same names."""
    pytest.importorskip('llmfoundry')
    for kind, names in config.COMPONENTS.items():
        registry = config.foundry_registry(kind)
        for name in names:
            if name in registry:  # the others are dwm-stream's own (trained_samples, metrics_jsonl, file, adamw)
                assert registry.get(name) is config.component(kind, name), (kind, name)


def test_registry_components_are_typed_by_their_signature():
    checked = config.check_components('algorithms', {'gradient_clipping': {'clipping_type': 'norm',
                                                                            'clipping_threshold': 1}},
                                      'algorithms', config.AlgorithmsConfig)
    assert config.check_components('callbacks', {'speed_monitor': {'window_size': 10}, 'lr_monitor': None},
                                   'callbacks') == {'speed_monitor': {'window_size': 10}, 'lr_monitor': {}}
    with pytest.raises(ConfigError, match=r"^callbacks\.trained_samples: unknown key\(s\) \['run_dir'\]"):
        config.check_components('callbacks', {'trained_samples': {'run_dir': '/x'}}, 'callbacks')
    assert checked['gradient_clipping'] == {'clipping_type': 'norm', 'clipping_threshold': 1.0}
    with pytest.raises(ConfigError, match=r'^algorithms\.gradient_clipping\.clipping_threshold: expected float'):
        config.check_component('algorithms', 'gradient_clipping', {'clipping_type': 'norm',
                                                                   'clipping_threshold': 'high'},
                               'algorithms.gradient_clipping')
    with pytest.raises(ConfigError, match=r'`algorithms\.gradient_clipping\.clipping_type` is required'):
        config.check_component('algorithms', 'gradient_clipping', {'clipping_threshold': 1.0},
                               'algorithms.gradient_clipping')
    with pytest.raises(ConfigError, match=r"^callbacks\.optimizer_monitor: unknown key\(s\) \['interval'\]"):
        config.check_components('callbacks', {'optimizer_monitor': {'interval': 3}}, 'callbacks')
    with pytest.raises(ConfigError, match=r"^loggers: unknown key\(s\) \['wandbb'\].*'wandb'"):
        config.check_components('loggers', {'wandbb': {}}, 'loggers')


def test_foundry_callback_that_needs_the_train_config_is_refused():
    pytest.importorskip('llmfoundry')
    with pytest.raises(ConfigError, match=r'^callbacks\.async_eval: not supported by dwm-stream train'):
        config.check_components('callbacks', {'async_eval': {}}, 'callbacks')


def test_model_and_loader_names_outside_ours_come_from_foundry():
    pytest.importorskip('llmfoundry')
    # Foundry checks its own keys
    assert config.check_model({'name': 'mpt_causal_lm', 'd_model': 64}) == config.Component('mpt_causal_lm',
                                                                                            {'d_model': 64})
    assert config.check_loader({'name': 'text', 'dataset': {}}) == config.Component('text', {'dataset': {}})
    with pytest.raises(ConfigError, match=r"^model\.name: 'gpt5' is not a model dwm-stream builds"):
        config.check_model({'name': 'gpt5'})
    with pytest.raises(ConfigError, match=r"^eval_loader\.name: 'txt' is not a loader dwm-stream builds"):
        config.check_loader({'name': 'txt'}, 'eval_loader')
    times = {'t_warmup': '1ba', 't_scale': '1ba', 't_cooldown': '0ba'}
    assert config.check_scheduler({'name': 'inv_sqrt_with_warmup', **times}).kwargs == times
    assert config.check_optimizer({'name': 'decoupled_lionw', 'lr': 1}).kwargs['lr'] == 1.0


def test_hf_causal_lm_takes_foundrys_keys():
    model = check(config.ModelConfig, {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': '/m',
                                       'use_flash_attention_2': False, 'use_auth_token': True,
                                       'trust_remote_code': False, 'init_device': 'meta'}, 'model')
    assert model.use_auth_token is True
    with pytest.raises(ConfigError, match=r'^model\.use_flash_attention_2: expected bool'):
        check(config.ModelConfig, {'use_flash_attention_2': 'yes'}, 'model')
