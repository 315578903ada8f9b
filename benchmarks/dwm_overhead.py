"""DWM overhead: step time with vs without DWM weighting, one refit step vs one plain step, and their memory.

Everything runs with real Composer ``Trainer`` steps on a tiny Llama, for weighter/model parameter ratios 1/4 and 1
and batch sizes 8 and 32 (issue 6). Every comparison is a ratio measured in the same run: A (plain step) and B
(DWM step, or refit step) alternate, one ratio per repetition, reported as min/median/max over repetitions.

* **Weighting overhead**: ``B/A - 1`` with B a step with DWM weighting (frozen weighter, no refit). The target is
  the weighter's forward FLOPs share of a training step + 5% (FLOPs arithmetic in the JSON and the table).
* **Refit step**: one weighter update (look-ahead fwd/bwd, validation fwd/bwd at theta', one forward-mode JVP,
  weighter fwd/bwd; ``dwm/refit/step_time``) over one plain step. Target <= 4x.
* **Memory**, in a child process (so the timing process's heap is not disturbed): glibc is told to serve every
  allocation >= 64 KiB with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``, which also turns off the dynamic
  threshold) and ``malloc_trim(0)`` runs before each measured operation, so the resident set tracks live tensors
  instead of the allocator's cache. Peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS at
  the start is the *transient* peak (the model, its gradients' absence and the optimizer state, resident in both
  cases, are not counted); the absolute peak is reported too. A larger, activation-dominated case (batch 32 x 256
  tokens) is measured beside the grid.
* The main configuration (ratio 1/4, batch 8) also times, in the same alternation, DWM without ``single_loss_pass``
  (the HF forward computing its own, discarded, cross-entropy) and the refit with eager attention for the JVP and
  with ``hypergrad='fd'``, to show what each choice costs.

Clocks: every timing records wall time and process CPU time. Torch runs on ``--threads`` threads (default 1), so CPU
time is the work done; the ratios and targets use CPU time, because on a shared machine other jobs stretch wall time
at random (two torch threads waiting for each other at every parallel region make it worse). Wall-clock ratios are
reported beside them. A large-vocabulary case (where the cross-entropy matters) times the single loss pass against
``single_loss_pass=False``.

Device and size: ``--device cpu`` (default) or ``cuda``; ``--model tiny`` (default: the 4 x 128 Llama above) or
``124m``/``370m`` (the GPU benchmark's Llama shapes, ``MODELS``). On CUDA, the timings are wall time with the device
synchronised before and after (there is no CPU clock of a GPU's work; both clock fields hold it), the steps run under
``amp_bf16``, and the memory is ``torch.cuda.max_memory_allocated`` (the child process still runs, on the GPU).

Usage::

    python -m benchmarks.dwm_overhead --device cuda --model 124m   # the same grid on a GPU at 124M
    python -m benchmarks.dwm_overhead            # full run (a few minutes): writes benchmarks/results/dwm_overhead.json
                                                 # and the "DWM overhead" section of benchmarks/RESULTS.md
    python -m benchmarks.dwm_overhead --quick    # smaller model, fewer repetitions (< ~1 min; CI)
    python -m benchmarks.dwm_overhead --out DIR  # DIR/dwm_overhead.json and the section of DIR/../RESULTS.md
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from composer import Trainer
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from algorithms.dwm import DWM, Weighter, WeighterConfig
from algorithms.dwm.hypergradient import adam_preconditioner, eager_attention, iter_named_trainable, jvp_attention
from algorithms.dwm.refit import BatchCycle, refit
from benchmarks.common import (describe_machine, library_versions, machine_info, min_median_max, output_options,
                               section_io, results_md_path,
                               utc_now, write_json)

REPO = Path(__file__).resolve().parents[1]

__all__ = ['main', 'run_benchmark', 'render_section', 'replace_section', 'read_section', 'BEGIN_MARK', 'END_MARK']

SECTION = '## DWM overhead'
BEGIN_MARK = '<!-- dwm-overhead:begin -->'
END_MARK = '<!-- dwm-overhead:end -->'
SCHEMA_VERSION = 3  # 3: the machine and versions come from benchmarks.common (2: its own probe and keys)
RATIOS = (0.25, 1.0)
BATCHES = (8, 32)
MAIN = (0.25, 8)


class _RandomTokens(Dataset):
    """Random-token samples in the data-side format (half low-id tokens, half high-id, for two domains)."""

    def __init__(self, size: int, seq_len: int, vocab: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (size, seq_len), generator=gen)
        self.ids[::2] %= vocab // 4

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {'input_ids': self.ids[i], 'labels': self.ids[i], 'domain': torch.tensor(i % 2)}


# ---------------------------------------------------------------------------------------------------- sizes, FLOPs
# The Llama shapes of ``--model`` (and of ``benchmarks.gpu``): width, depth, heads, FFN width, vocabulary
# (gpt-neox-20b's, padded), tokens per sample.
MODELS = {
    '124m': {'hidden': 768, 'layers': 12, 'heads': 12, 'ffn': 2048, 'vocab': 50304, 'seq_len': 1024},
    '370m': {'hidden': 1024, 'layers': 24, 'heads': 16, 'ffn': 2816, 'vocab': 50304, 'seq_len': 2048},
}
_DEVICE = torch.device('cpu')  # set by run_benchmark / the memory child from --device


def _llm_shape(quick: bool, model: str = 'tiny') -> dict[str, int]:
    if model != 'tiny':
        return dict(MODELS[model])
    if quick:
        return {'hidden': 64, 'layers': 2, 'vocab': 256, 'seq_len': 64, 'heads': 4}
    return {'hidden': 128, 'layers': 4, 'vocab': 512, 'seq_len': 128, 'heads': 4}


def _llama_config(shape: dict[str, int], seq_len: Optional[int] = None):
    return LlamaConfig(vocab_size=shape['vocab'], hidden_size=shape['hidden'],
                       intermediate_size=shape.get('ffn', 4 * shape['hidden']),
                       num_hidden_layers=shape['layers'], num_attention_heads=shape['heads'],
                       num_key_value_heads=shape['heads'], max_position_embeddings=seq_len or shape['seq_len'],
                       tie_word_embeddings=False, attn_implementation='sdpa')


def _weighter_config(shape: dict[str, int], llm_params: int, ratio: float, seq_len: int):
    """The weighter (own 2-layer transformer) whose parameter count is closest to ``ratio * llm_params``."""
    best = None
    for d_model in range(16, 8 * shape['hidden'] + 1, 16):
        cfg = WeighterConfig(vocab_size=shape['vocab'], d_model=d_model, n_heads=4, n_layers=2, max_seq_len=seq_len)
        with torch.device('meta'):  # counted, not allocated
            gap = abs(Weighter(cfg).num_parameters() - ratio * llm_params)
        if best is None or gap < best[0]:
            best = (gap, cfg)
    assert best is not None
    return best[1]


def _flops(shape: dict[str, int], wcfg, batch: int, seq_len: int) -> dict[str, float]:
    """FLOPs per token (PaLM convention: 2 FLOPs per multiply-add, attention scores and values counted in full).

    LLM training step: ``6 * N_matmul + 12 * layers * seq * hidden`` (N_matmul: every weight matrix but the input
    embedding, the LM head included). Weighter forward: ``2 * N_matmul + 4 * layers * seq * d`` for the per-sample
    backbone, plus the batch layers once per sample (``(2 * N_batch + 4 * n * d) / seq`` per token).
    A refit step: look-ahead fwd/bwd + validation fwd/bwd (2 training steps without the optimizer) + the JVP
    (primal 2N + tangent 4N: about one more training step) + weighter fwd/bwd (3x its forward).
    """
    h, n_layers, vocab = shape['hidden'], shape['layers'], shape['vocab']
    ffn = shape.get('ffn', 4 * h)
    llm_matmul = n_layers * (4 * h * h + 3 * h * ffn) + h * vocab
    llm_train = 6.0 * llm_matmul + 12.0 * n_layers * seq_len * h
    d, w_layers = wcfg.d_model, wcfg.n_layers
    w_ffn = wcfg.d_ff or 4 * d
    block = 4 * d * d + 2 * d * w_ffn
    w_fwd = 2.0 * w_layers * block + 4.0 * w_layers * seq_len * d
    w_fwd += (2.0 * wcfg.batch_layers * block + 4.0 * wcfg.batch_layers * batch * d + 2.0 * d) / seq_len
    share = w_fwd / llm_train
    return {
        'llm_matmul_params': float(llm_matmul), 'llm_train_per_token': llm_train,
        'weighter_forward_per_token': w_fwd, 'weighter_forward_share': share,
        'refit_over_plain_flops': 3.0 + 3.0 * share,
    }


# ---------------------------------------------------------------------------------------------------- measuring
def _repetitions(xs: list[float]) -> dict[str, Any]:
    """min/median/max of the repetitions, their number and every value."""
    return {**min_median_max(xs), 'n': len(xs), 'all': xs}


class _Setup:
    """A plain trainer and a DWM trainer (frozen weighter) on the same model and data, plus refit loaders."""

    def __init__(self, shape: dict[str, int], ratio: float, batch: int, seq_len: Optional[int] = None,
                 refit_steps: int = 1, single_loss_pass: bool = True, extra_dwm: bool = False,
                 checkpoint_weighter: bool = False):
        seq_len = seq_len or shape['seq_len']
        config = _llama_config(shape, seq_len)
        with torch.device('meta'):
            self.llm_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
            self.wcfg = _weighter_config(shape, self.llm_params, ratio, seq_len)
            self.weighter_params = Weighter(self.wcfg).num_parameters()
        self.seq_len, self.batch = seq_len, batch

        def make_trainer(algorithms):
            torch.manual_seed(0)
            model = HuggingFaceModel(LlamaForCausalLM(config), use_logits=True)
            data = DataLoader(_RandomTokens(4096, seq_len, shape['vocab'], seed=0), batch_size=batch, shuffle=False)
            cuda = _DEVICE.type == 'cuda'
            if cuda:
                model = model.to(_DEVICE)  # before the optimizer is built over its parameters
            return Trainer(model=model, train_dataloader=data, max_duration=None, algorithms=algorithms,
                           device='gpu' if cuda else 'cpu', precision='amp_bf16' if cuda else 'fp32',
                           optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), seed=0, progress_bar=False,
                           log_to_console=False, loggers=[])

        refit_data = DataLoader(_RandomTokens(512, seq_len, shape['vocab'], seed=1), batch_size=batch, shuffle=False)
        val_data = DataLoader(_RandomTokens(256, seq_len, shape['vocab'], seed=2), batch_size=batch, shuffle=False)
        self.refit_batches, self.val_batches = BatchCycle(refit_data, 'refit'), BatchCycle(val_data, 'validation')
        self.dwm = DWM(refit=False, weighter=self.wcfg, domain_names=['low', 'high'], refit_steps=refit_steps,
                       lookahead='adam', single_loss_pass=single_loss_pass,
                       refit_checkpoint_weighter=checkpoint_weighter)
        self.plain = make_trainer([])
        self.dwm_trainer = make_trainer([self.dwm])
        self.two_ce_trainer = None
        if extra_dwm:  # the same DWM without the single loss pass (HF computes its own, discarded, loss)
            self.two_ce_dwm = DWM(refit=False, weighter=self.wcfg, domain_names=['low', 'high'],
                                  single_loss_pass=False)
            self.two_ce_trainer = make_trainer([self.two_ce_dwm])
        for trainer in (self.plain, self.dwm_trainer, self.two_ce_trainer):  # warm-up: allocations, optimizer state
            if trainer is not None:
                trainer.fit(duration='2ba')

    def step(self, trainer, steps: int) -> tuple[float, float]:
        """``steps`` Composer steps; returns (wall, process CPU) seconds per step (CUDA: synchronised wall, twice)."""
        _sync()
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(duration=f'{steps}ba')
        _sync()
        wall = (time.perf_counter() - wall) / steps
        return wall, (wall if _DEVICE.type == 'cuda' else (time.process_time() - cpu) / steps)

    def refit(self, hypergrad: str = 'jvp', eager: bool = False, evaluate_after: bool = False) -> tuple[float, float]:
        """One refit (:func:`algorithms.dwm.refit.refit`, as DWM calls it at a stage boundary) of the DWM trainer's
        weighter at its LLM; returns (wall, process CPU) seconds per weighter update.

        Wall is the refit's own ``dwm/refit/step_time``; CPU is the call's CPU time divided by the updates, both
        without the closing ``val_loss_after`` evaluation (a metric, once per refit), unless ``evaluate_after`` (the
        memory measurement includes it).
        """
        state = self.dwm_trainer.state
        lm = state.model.model
        config = dataclasses.replace(self.dwm.config, hypergrad=hypergrad)
        optimizer = state.optimizers[0]
        precond = adam_preconditioner(optimizer, dict(iter_named_trainable(lm)))  # lookahead='adam'
        lr = optimizer.param_groups[0].get('initial_lr', optimizer.param_groups[0]['lr'])  # DWM's default eta

        def draw(batches: BatchCycle) -> dict:
            return {k: v.to(_DEVICE) for k, v in batches.next().items()}

        cpu = time.process_time()
        result = refit(self.dwm.weighter, self.dwm.weighter_optimizer, lm, lambda: draw(self.refit_batches),
                       lambda: draw(self.val_batches), config, float(lr), precond,
                       attention=eager_attention if eager else jvp_attention, evaluate_after=evaluate_after)
        cpu = time.process_time() - cpu
        wall = float(result.diagnostics.metrics()['dwm/refit/step_time'])
        if _DEVICE.type == 'cuda':  # the refit reads its losses back (.item()): its step times are synchronised
            return wall, wall
        return wall, cpu / config.refit_steps


def _sync() -> None:
    if _DEVICE.type == 'cuda':
        torch.cuda.synchronize(_DEVICE)


def _ratios(num: list[tuple[float, float]], den: list[tuple[float, float]], minus: float = 0.0) -> dict[str, Any]:
    """Per-repetition ratios of (wall, CPU) pairs: ``{'cpu': summary, 'wall': summary}``."""
    return {clock: _repetitions([a[i] / b[i] - minus for a, b in zip(num, den)]) for i, clock in enumerate(('wall', 'cpu'))}


def _clocks(xs: list[tuple[float, float]]) -> dict[str, Any]:
    return {'wall': _repetitions([x[0] for x in xs]), 'cpu': _repetitions([x[1] for x in xs])}


def _time_config(shape, ratio: float, batch: int, reps: int, steps: int, refit_steps: int,
                 ablations: bool) -> dict[str, Any]:
    setup = _Setup(shape, ratio, batch, refit_steps=refit_steps, extra_dwm=ablations)
    setup.refit()  # warm-up of the refit path (and its Adam state)
    arms: dict[str, list[tuple[float, float]]] = {'plain': [], 'dwm': []}
    if ablations:
        arms['dwm_two_ce'] = []
    for _ in range(reps):  # A/B(/C) alternated, one ratio per repetition
        arms['plain'].append(setup.step(setup.plain, steps))
        arms['dwm'].append(setup.step(setup.dwm_trainer, steps))
        if ablations:
            arms['dwm_two_ce'].append(setup.step(setup.two_ce_trainer, steps))
    refit_arms: dict[str, list[tuple[float, float]]] = {'plain': [], 'jvp': []}
    if ablations:
        refit_arms.update({'jvp_eager': [], 'fd': []})
    for _ in range(reps):
        refit_arms['plain'].append(setup.step(setup.plain, steps))
        refit_arms['jvp'].append(setup.refit())
        if ablations:
            refit_arms['jvp_eager'].append(setup.refit(eager=True))
            refit_arms['fd'].append(setup.refit(hypergrad='fd'))
    flops = _flops(shape, setup.wcfg, batch, setup.seq_len)
    ratios = {'weighting_overhead': _ratios(arms['dwm'], arms['plain'], 1.0),
              'refit_over_plain': _ratios(refit_arms['jvp'], refit_arms['plain'])}
    if ablations:
        ratios['weighting_overhead_two_ce'] = _ratios(arms['dwm_two_ce'], arms['plain'], 1.0)
        ratios['refit_over_plain_jvp_eager'] = _ratios(refit_arms['jvp_eager'], refit_arms['plain'])
        ratios['refit_over_plain_fd'] = _ratios(refit_arms['fd'], refit_arms['plain'])
    return {
        'name': f'ratio {ratio:g}, batch {batch}', 'ratio_target': ratio, 'batch': batch, 'seq_len': setup.seq_len,
        'vocab': shape['vocab'], 'steps_per_timing': steps, 'llm_params': setup.llm_params,
        'weighter': {**setup.wcfg.to_dict(), 'params': setup.weighter_params,
                     'param_ratio': setup.weighter_params / setup.llm_params},
        'flops': flops,
        'step_time_s': {k: _clocks(v) for k, v in arms.items()},
        'refit_time_s': {k: _clocks(v) for k, v in refit_arms.items()},
        'ratios': ratios,
    }


def _time_vocab(shape, vocab: int, batch: int, reps: int, steps: int) -> dict[str, Any]:
    """Plain / DWM / DWM without the single loss pass, with a large vocabulary (where the cross-entropy costs)."""
    shape = {**shape, 'vocab': vocab}
    setup = _Setup(shape, 0.25, batch, extra_dwm=True)
    arms: dict[str, list[tuple[float, float]]] = {'plain': [], 'dwm': [], 'dwm_two_ce': []}
    for _ in range(reps):
        arms['plain'].append(setup.step(setup.plain, steps))
        arms['dwm'].append(setup.step(setup.dwm_trainer, steps))
        arms['dwm_two_ce'].append(setup.step(setup.two_ce_trainer, steps))
    return {
        'name': f'vocab {vocab}, batch {batch}', 'vocab': vocab, 'batch': batch, 'seq_len': setup.seq_len,
        'llm_params': setup.llm_params, 'weighter_params': setup.weighter_params,
        'flops': _flops(shape, setup.wcfg, batch, setup.seq_len),
        'step_time_s': {k: _clocks(v) for k, v in arms.items()},
        'ratios': {'weighting_overhead': _ratios(arms['dwm'], arms['plain'], 1.0),
                   'weighting_overhead_two_ce': _ratios(arms['dwm_two_ce'], arms['plain'], 1.0)},
    }


# ---------------------------------------------------------------------------------------------------- memory (child)
def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _peak_of(fn: Callable[[], Any], libc) -> dict[str, float]:
    """Transient and absolute peak RSS (MiB) of ``fn`` (see the module docstring); on CUDA, of
    ``torch.cuda.max_memory_allocated``."""
    if _DEVICE.type == 'cuda':
        torch.cuda.synchronize(_DEVICE)
        start = torch.cuda.memory_allocated(_DEVICE)
        torch.cuda.reset_peak_memory_stats(_DEVICE)
        fn()
        torch.cuda.synchronize(_DEVICE)
        peak = torch.cuda.max_memory_allocated(_DEVICE)
        return {'transient_mib': (peak - start) / 2**20, 'peak_mib': peak / 2**20, 'start_mib': start / 2**20}
    libc.malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current RSS
    start = _status_kb('VmRSS')
    fn()
    peak = _status_kb('VmHWM')
    return {'transient_mib': (peak - start) / 1024, 'peak_mib': peak / 1024, 'start_mib': start / 1024}


def _memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    libc = ctypes.CDLL('libc.so.6')
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks get their own mapping, returned on free
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    torch.set_num_threads(spec['threads'])
    global _DEVICE
    _DEVICE = torch.device(spec.get('device', 'cpu'))
    shape = spec['shape']
    out = []
    for case in spec['cases']:
        setup = _Setup(shape, case['ratio'], case['batch'], seq_len=case.get('seq_len'), refit_steps=1,
                       checkpoint_weighter=case.get('checkpoint_weighter', False))
        setup.refit()  # warm-up
        plain, refit = [], []
        for _ in range(spec['reps']):  # alternated
            plain.append(_peak_of(functools.partial(setup.plain.fit, duration='1ba'), libc))
            refit.append(_peak_of(functools.partial(setup.refit, evaluate_after=True), libc))
        out.append({'name': case['name'], 'ratio_target': case['ratio'], 'batch': case['batch'],
                    'seq_len': setup.seq_len, 'llm_params': setup.llm_params,
                    'weighter_params': setup.weighter_params, 'param_mib': setup.llm_params * 4 / 2**20,
                    'plain_step': plain, 'refit_step': refit})
        del setup
    return {'cases': out}


def _measure_memory(shape, cases, reps: int, threads: int) -> list[dict[str, Any]]:
    spec = {'shape': shape, 'cases': cases, 'reps': reps, 'threads': threads, 'device': _DEVICE.type}
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.dwm_overhead', '--memory-child', json.dumps(spec)],
                          capture_output=True, text=True, check=False, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f'memory child failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    result = json.loads(proc.stdout.strip().splitlines()[-1])['cases']
    for case in result:
        plain_t = [m['transient_mib'] for m in case['plain_step']]
        refit_t = [m['transient_mib'] for m in case['refit_step']]
        plain_p = [m['peak_mib'] for m in case['plain_step']]
        refit_p = [m['peak_mib'] for m in case['refit_step']]
        case['transient_ratio'] = _repetitions([r / max(p, 1e-9) for r, p in zip(refit_t, plain_t)])
        case['peak_ratio'] = _repetitions([r / p for r, p in zip(refit_p, plain_p)])
        case['plain_transient_mib'] = _repetitions(plain_t)
        case['refit_transient_mib'] = _repetitions(refit_t)
        case['plain_peak_mib'] = _repetitions(plain_p)
        case['refit_peak_mib'] = _repetitions(refit_p)
    return result


# ---------------------------------------------------------------------------------------------------- driver
def run_benchmark(quick: bool = False, reps: Optional[int] = None, steps: Optional[int] = None,
                  threads: int = 1, device: str = 'cpu', model: str = 'tiny') -> dict[str, Any]:
    """Measure and return the figures (see the module docstring)."""
    global _DEVICE
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available here; run on a GPU machine or use --device cpu')
    _DEVICE = torch.device(device)
    torch.set_num_threads(threads)
    shape = _llm_shape(quick, model)
    reps = reps or (2 if quick else 5)
    steps = steps or (1 if quick else 3)
    refit_steps = 1 if quick else 2
    machine = {**machine_info(), 'torch_threads': threads, 'load_avg_start': list(os.getloadavg())}
    started = time.perf_counter()
    configs = []
    for ratio in RATIOS:
        for batch in BATCHES:
            configs.append(_time_config(shape, ratio, batch, reps, max(1, round(steps * 8 / batch)), refit_steps,
                                        ablations=(ratio, batch) == MAIN))
    vocab_case = _time_vocab(shape, 4096 if quick else max(16384, 2 * shape['vocab'] if model != 'tiny' else 0), 8,
                             reps, steps)
    cases = [{'name': f'ratio {r:g}, batch {b}', 'ratio': r, 'batch': b} for r in RATIOS for b in BATCHES]
    large = {'name': 'ratio 0.25, batch 32 x 256 tokens', 'ratio': 0.25, 'batch': 32,
             'seq_len': 128 if quick else 2 * shape['seq_len']}
    checkpointed = {'name': 'ratio 1, batch 32, `refit_checkpoint_weighter=True`', 'ratio': 1.0, 'batch': 32,
                    'checkpoint_weighter': True}
    memory = _measure_memory(shape, cases + [large, checkpointed], 2 if quick else 3, threads)
    machine['load_avg_end'] = list(os.getloadavg())

    targets = []
    for cfg in configs:
        share = cfg['flops']['weighter_forward_share']
        overhead = cfg['ratios']['weighting_overhead']['cpu']['median']
        refit = cfg['ratios']['refit_over_plain']['cpu']['median']
        mem = next(m for m in memory if m['name'] == cfg['name'])
        targets.append({
            'name': cfg['name'],
            'weighting_overhead': overhead, 'overhead_bound': share + 0.05, 'overhead_ok': overhead <= share + 0.05,
            'refit_over_plain': refit, 'refit_bound': 4.0, 'refit_ok': refit <= 4.0,
            'transient_memory_ratio': mem['transient_ratio']['median'], 'memory_bound': 1.5,
            'memory_ok': mem['transient_ratio']['median'] <= 1.5,
            'absolute_peak_ratio': mem['peak_ratio']['median'],
            'weighting_overhead_wall': cfg['ratios']['weighting_overhead']['wall']['median'],
            'refit_over_plain_wall': cfg['ratios']['refit_over_plain']['wall']['median'],
        })
    return {
        'benchmark': 'dwm_overhead', 'schema_version': SCHEMA_VERSION, 'quick': quick,
        'date': utc_now(), 'machine': machine, 'versions': library_versions(('torch', 'mosaicml', 'transformers')),
        'settings': {'reps': reps, 'steps_per_rep': steps, 'refit_steps_per_call': refit_steps,
                     'clock': 'cpu' if device == 'cpu' else 'wall (CUDA-synchronised)', 'device': device,
                     'model': model, 'precision': 'fp32' if device == 'cpu' else 'amp_bf16',
                     'gpu': torch.cuda.get_device_name(_DEVICE) if device == 'cuda' else None,
                     'llm': shape, 'optimizer': 'AdamW', 'lookahead': 'adam', 'hypergrad': 'jvp',
                     'attention': 'sdpa (JVP: SDPA math backend)', 'ratios': list(RATIOS), 'batches': list(BATCHES),
                     'main': {'ratio': MAIN[0], 'batch': MAIN[1]}, 'memory_reps': 2 if quick else 3},
        'configs': configs, 'vocab_ablation': vocab_case, 'memory': memory, 'targets': targets,
        'wall_s': time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------------- rendering
def _mmm(s: dict[str, Any], fmt: str) -> str:
    return ' / '.join(format(s[k], fmt) for k in ('min', 'median', 'max'))


def _pct(s: dict[str, Any]) -> str:
    return ' / '.join(f'{100 * s[k]:+.1f}%' for k in ('min', 'median', 'max'))


def _libraries(res: dict[str, Any]) -> str:
    v = res['versions']
    # Schema 2 recorded Python and Composer here as 'python' and 'composer'; from schema 3 Python is the machine's
    # and Composer is its distribution, 'mosaicml'.
    python, composer = v.get('python', res['machine'].get('python')), v.get('composer', v.get('mosaicml'))
    return f'Python {python}, torch {v["torch"]}, composer {composer}, transformers {v["transformers"]}'


def render_section(res: dict[str, Any], command: str) -> str:
    """The RESULTS.md section (between its markers), made only from ``res``."""
    m, st = res['machine'], res['settings']
    llm = st['llm']

    def ok(flag):
        return 'met' if flag else '**missed**'

    on_cpu = st.get('device', 'cpu') == 'cpu'  # schema 3 before --device: CPU
    clock = 'CPU' if on_cpu else 'GPU wall'
    clocks = ('- **Clocks:** the ratios are of *process CPU time* (one torch thread, so CPU time is the work done): '
              'the other jobs on this shared machine stretch wall time by up to 2x at random, which would swamp a 5-10% '
              'effect. Wall-clock ratios (medians) are given beside them.') if on_cpu else (
        f'- **Device:** CUDA ({st.get("gpu", "GPU")}), `{st.get("precision")}` steps, Llama `--model '
        f'{st.get("model")}`. **Clocks:** wall time with the device synchronised around each timing (both clock '
        f'columns hold it). Memory: `torch.cuda.max_memory_allocated`.')
    lines = [
        BEGIN_MARK, SECTION, '',
        f'_Generated by `{command}` on {res["date"]} into `benchmarks/results/dwm_overhead.json`; do not edit by '
        f'hand._', '',
        f'- **Machine:** {describe_machine(m)}, shared with other jobs (load average {m["load_avg_start"][0]:.1f} at '
        f'the start, {m["load_avg_end"][0]:.1f} at the end); torch on {m["torch_threads"]} thread(s).',
        f'- **Libraries:** {_libraries(res)}.',
        f'- **Model:** Llama {llm["layers"]} x {llm["hidden"]}, vocab {llm["vocab"]}, {llm["seq_len"]} tokens per '
        f'sample, SDPA attention, AdamW; weighter: own 2-layer transformer + 1 batch layer, width chosen for the '
        f'parameter ratio. Refit: Adam look-ahead, exact JVP hypergradient (SDPA math backend), '
        f'{st["refit_steps_per_call"]} weighter update(s) per call.',
        f'- **Repetitions:** {st["reps"]}, A and B alternated, {st["steps_per_rep"]} Composer step(s) per timing at '
        f'batch 8 (proportionally fewer at batch 32, at least 1); each cell is min / median / max of the '
        f'per-repetition ratio. Memory: {st["memory_reps"]} alternated repetitions in a child process.',
        clocks, '',
        '### Time', '',
        f'| config (weighter/model params, batch) | weighter params | plain step {clock} (s) | weighting overhead | '
        'bound (FLOPs share + 5%) | refit step / plain step | wall: overhead, refit |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for cfg, tgt in zip(res['configs'], res['targets']):
        r = cfg['ratios']
        lines.append(
            f'| {cfg["weighter"]["param_ratio"]:.2f}, batch {cfg["batch"]} | {cfg["weighter"]["params"] / 1e6:.2f}M '
            f'of {cfg["llm_params"] / 1e6:.2f}M | {_mmm(cfg["step_time_s"]["plain"]["cpu"], ".3f")} | '
            f'{_pct(r["weighting_overhead"]["cpu"])} | {100 * tgt["overhead_bound"]:.1f}% | '
            f'{_mmm(r["refit_over_plain"]["cpu"], ".2f")}x | '
            f'{100 * r["weighting_overhead"]["wall"]["median"]:+.1f}%, {r["refit_over_plain"]["wall"]["median"]:.2f}x |')
    main = next(c for c in res['configs'] if 'weighting_overhead_two_ce' in c['ratios'])
    r, voc = main['ratios'], res['vocab_ablation']
    rv = voc['ratios']
    lines += [
        '', f'What the choices cost, same alternation ({main["name"]}; {clock} time, wall median in brackets):', '',
        '| variant | ratio to a plain step (min / median / max) |', '|---|---:|',
        f'| DWM step, single loss pass (default) | {_pct(r["weighting_overhead"]["cpu"])} '
        f'({100 * r["weighting_overhead"]["wall"]["median"]:+.1f}%) |',
        f'| DWM step, HF also computes its own (discarded) loss, `single_loss_pass=False` | '
        f'{_pct(r["weighting_overhead_two_ce"]["cpu"])} ({100 * r["weighting_overhead_two_ce"]["wall"]["median"]:+.1f}%) |',
        f'| vocab {voc["vocab"]} ({voc["llm_params"] / 1e6:.1f}M params), batch {voc["batch"]}: DWM step, single loss '
        f'pass | {_pct(rv["weighting_overhead"]["cpu"])} ({100 * rv["weighting_overhead"]["wall"]["median"]:+.1f}%) |',
        f'| vocab {voc["vocab"]}, batch {voc["batch"]}: DWM step, `single_loss_pass=False` | '
        f'{_pct(rv["weighting_overhead_two_ce"]["cpu"])} '
        f'({100 * rv["weighting_overhead_two_ce"]["wall"]["median"]:+.1f}%) |',
        f'| refit step, JVP with SDPA math backend (default) | {_mmm(r["refit_over_plain"]["cpu"], ".2f")}x '
        f'({r["refit_over_plain"]["wall"]["median"]:.2f}x) |',
        f'| refit step, JVP with HF eager attention | {_mmm(r["refit_over_plain_jvp_eager"]["cpu"], ".2f")}x '
        f'({r["refit_over_plain_jvp_eager"]["wall"]["median"]:.2f}x) |',
        f'| refit step, `hypergrad=\'fd\'` (2 no-grad forwards instead of the JVP; approximate) | '
        f'{_mmm(r["refit_over_plain_fd"]["cpu"], ".2f")}x ({r["refit_over_plain_fd"]["wall"]["median"]:.2f}x) |',
        '', 'FLOPs arithmetic (per token; PaLM convention, attention counted in full): a training step is '
        '`6 N + 12 L T d` (N: weight matrices without the input embedding), the weighter forward `2 N_w + 4 L_w T d_w` '
        '(+ its batch layer once per sample). A refit step is about 3 training steps (look-ahead fwd/bwd, validation '
        'fwd/bwd, JVP = primal + tangent) + 3 weighter forwards:', '',
        '| config | LLM train FLOPs/token | weighter fwd FLOPs/token | share | refit/plain by FLOPs |',
        '|---|---:|---:|---:|---:|',
    ]
    for cfg in res['configs']:
        f = cfg['flops']
        lines.append(f'| {cfg["name"]} | {f["llm_train_per_token"] / 1e6:.2f}M | '
                     f'{f["weighter_forward_per_token"] / 1e6:.3f}M | {100 * f["weighter_forward_share"]:.1f}% | '
                     f'{f["refit_over_plain_flops"]:.2f}x |')
    lines += [
        '', '### Memory', '',
        '| config | params (fp32) | plain step transient (MiB) | refit step transient (MiB) | transient ratio | '
        'absolute peak RSS plain / refit (MiB) | absolute ratio |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    for mem in res['memory']:
        lines.append(
            f'| {mem["name"]} ({mem["seq_len"]} tokens) | {mem["param_mib"]:.1f} MiB | '
            f'{_mmm(mem["plain_transient_mib"], ".1f")} | {_mmm(mem["refit_transient_mib"], ".1f")} | '
            f'{_mmm(mem["transient_ratio"], ".2f")}x | {mem["plain_peak_mib"]["median"]:.0f} / '
            f'{mem["refit_peak_mib"]["median"]:.0f} | {_mmm(mem["peak_ratio"], ".3f")}x |')
    lines += [
        '', 'Transient = peak RSS during the operation minus RSS at its start, in a child process where glibc maps '
        'every block >= 64 KiB separately (`mallopt`) and `malloc_trim(0)` runs first, so freed tensors leave the '
        'resident set and the figure is live memory, not the allocator cache. The model and the optimizer state '
        'are resident in both cases and not counted; the absolute peak counts them (and the Python process).', '',
        f'### Targets (medians, {clock} time)', '',
        '| config | weighting overhead <= FLOPs share + 5% | refit step <= 4x plain | refit transient memory <= 1.5x |',
        '|---|---|---|---|',
    ]
    for t in res['targets']:
        lines.append(
            f'| {t["name"]} | {100 * t["weighting_overhead"]:+.1f}% vs {100 * t["overhead_bound"]:.1f}%: '
            f'{ok(t["overhead_ok"])} | {t["refit_over_plain"]:.2f}x: {ok(t["refit_ok"])} | '
            f'{t["transient_memory_ratio"]:.2f}x (absolute {t["absolute_peak_ratio"]:.3f}x): '
            f'{ok(t["memory_ok"])} |')
    lines += [
        '', 'On a CPU with a model this small, fixed per-step costs (Python, Composer events, DWM\'s metrics) are a '
        'sizeable part of a step, and single ratios move by a few percent between runs: read the min/max columns. '
        'A 125M-scale GPU measurement is not part of this section.', END_MARK,
    ]
    return '\n'.join(lines)


replace_section, read_section = section_io('DWM overhead', BEGIN_MARK, END_MARK)


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; returns a process exit code (0 even when a target is missed: it is reported)."""
    parser = argparse.ArgumentParser(prog='python -m benchmarks.dwm_overhead', description=__doc__.split('\n')[0],
                                     parents=[output_options('smaller model and fewer repetitions (CI)')])
    parser.add_argument('--reps', type=int, default=None, help='A/B repetitions (default: 5, quick: 2)')
    parser.add_argument('--steps', type=int, default=None, help='steps per timing (default: 3, quick: 1)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default: 1)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu', help='where the model runs (default: cpu)')
    parser.add_argument('--model', choices=['tiny', *MODELS], default='tiny',
                        help='Llama size: tiny (4 x 128, the CPU default) or the GPU shapes 124m / 370m')
    parser.add_argument('--memory-child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return 0
    results = run_benchmark(quick=args.quick, reps=args.reps, steps=args.steps, threads=args.threads,
                            device=args.device, model=args.model)
    command = 'python -m benchmarks.dwm_overhead' + (' --quick' if args.quick else '') + (
        f' --device {args.device}' if args.device != 'cpu' else '') + (f' --model {args.model}' if args.model != 'tiny'
                                                                       else '')
    results['command'] = command
    write_json(os.path.join(args.out, 'dwm_overhead.json'), results, indent=2)
    section = render_section(results, command)
    replace_section(results_md_path(args), section)
    print(section)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
