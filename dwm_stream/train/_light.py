"""Set by :mod:`dwm_stream.train.precheck` before it imports :mod:`dwm_stream.train.config`: the config module then
checks a YAML without importing torch, Composer or LLM Foundry (what those check is left to the full check)."""

ACTIVE = False
