"""The demo's options (:class:`DemoConfig`), its presets and the YAML/flag layering of `prefalign demo`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.config import ConfigError, build_config

PROMPTS_FILE = Path(__file__).parent.parent / "assets" / "demo_prompts.jsonl"
"""The bundled movie-review openings: ``{"prompt", "split"}`` per line, split ``train`` or ``test``."""

PHASE_VERSION = 3
"""Part of every phase's inputs: bump it when what a phase computes changes, so old results are redone."""

METHODS = ("preferred-ft", "dpo", "ppo", "dpo-sweep", "ppo-gt", "ppo-kl-sweep", "best-of-n", "grpo", "rloo")
PRESETS = ("default", "frontier", "smoke")


@dataclass
class DemoConfig:
    """The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1) on a small model."""

    output: str = "runs/demo"
    """Run folder: report.html, report.md, summary.json, samples/, one folder per phase."""
    preset: str = "default"
    """default (14-16 minutes on a 2-core CPU, budgeted for 25 on one twice as slow), frontier (the paper's
    Figure 2 sweep; about 85 minutes on a 2-core CPU) or
    smoke (a tiny random model, under a minute). Options given explicitly override the preset's values."""
    model: str = "smollm2"
    """Starting policy and reference: a builtin name, local folder or hub id (smoke: a tiny random model)."""
    prompts: str | None = None
    """JSONL of {"prompt", "split": "train"|"test"}; default: the bundled movie-review openings."""
    methods: list[str] = field(default_factory=lambda: ["preferred-ft", "dpo", "ppo"])
    """Methods besides the reference: preferred-ft, dpo, ppo, dpo-sweep, ppo-gt, ppo-kl-sweep, best-of-n, grpo
    and rloo (the last two against the learned reward model, with PPO's iterations and learning rate)."""
    seed: int = 0
    """Seed of prompt selection, sampling and training."""
    seeds: list[int] = field(default_factory=list)
    """Repeat the whole experiment with each of these seeds (preferences, training order, sampling), each in
    OUTPUT/seed-N, then report the per-seed points and their spread (seeds.json, seeds.md); empty: one run."""
    device: str | None = None
    """Where models run (cpu, cuda); default: cuda if available, else cpu."""
    max_new_tokens: int = 32
    """Length of every continuation: preference samples, evaluation samples and PPO rollouts."""
    sample_batch_size: int = 128
    """Prompts sampled together when building preferences and evaluating."""
    test_prompts: int = 0
    """Test prompts each evaluation samples (0: the whole test split)."""
    eval_samples: int = 2
    """Samples per test prompt at every evaluation (the samples files then hold that many rows per prompt);
    more samples narrow each point's 95% bootstrap interval."""
    evals_per_run: int = 3
    """Evaluations (reward, KL points) along each method's training, evenly spaced, the last at its end."""
    sft: bool = False
    """First fine-tune the model on its own continuations (the paper's SFT step); it then is the reference."""
    sft_prompts: int = 128
    """Train prompts whose sampled continuations the --sft step trains on."""
    sft_lr: float = 1e-5
    """Learning rate of the --sft step."""
    preference_prompts: int = 160
    """Train prompts sampled for preferences (0: all of the train split)."""
    samples_per_prompt: int = 4
    """Samples per preference prompt from the reference; every pair of them becomes a preference."""
    heldout_prompts: int = 16
    """Preference prompts whose pairs are held out (reward-model accuracy, DPO validation)."""
    batch_size: int = 16
    """Pairs (DPO, reward model) or demonstrations (Preferred-FT) per optimiser step."""
    pft_lr: float = 2e-5
    """Preferred-FT learning rate."""
    pft_epochs: float = 2.0
    """Preferred-FT passes over the chosen completions."""
    dpo_beta: float = 0.1
    """DPO's beta (KL strength) of the main DPO run."""
    dpo_lr: float = 6e-5
    """DPO learning rate."""
    dpo_epochs: float = 0.5
    """DPO passes over the training pairs (half a pass: 26 steps, where the test reward has levelled off)."""
    dpo_betas: list[float] = field(default_factory=lambda: [0.05, 1.0, 5.0])
    """Further betas of the dpo-sweep method (the paper sweeps 0.05, 0.1, 1, 5)."""
    rm_lr: float = 1e-4
    """Reward-model learning rate."""
    rm_epochs: float = 0.5
    """Reward-model passes over the training pairs (half a pass, as much preference data as DPO sees)."""
    ppo_iterations: int = 16
    """PPO iterations (each samples ppo_rollout_batch train prompts, then updates)."""
    ppo_rollout_batch: int = 16
    """Prompts sampled per PPO iteration."""
    ppo_lr: float = 2e-5
    """PPO learning rate."""
    ppo_epochs: int = 2
    """PPO passes over each iteration's rollouts."""
    ppo_minibatches: int = 2
    """PPO minibatches per pass (one optimiser step each)."""
    ppo_kl_coef: float = 0.05
    """PPO's KL penalty coefficient (its start value when a target KL is set)."""
    ppo_target_kl: float | None = None
    """Adapt the KL coefficient toward this sequence KL in the main PPO run (None: fixed coefficient)."""
    ppo_target_kls: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0])
    """Target KLs of the ppo-kl-sweep method: at this scale PPO's sequence KL stays near 1 nat, so targets on
    either side of it pull the coefficient apart (targets all far above it would all shrink it alike)."""
    ppo_kl_horizon: int | None = None
    """Adaptive KL controller horizon in samples (None: one iteration's rollouts, so the coefficient can move
    up to 20% per iteration; the trainer's default of 10000 samples suits runs of 10^5 samples and would
    leave a 24-iteration run's coefficient within 1% of its start, making every target the same run)."""
    ppo_shared_value_head: bool = True
    """PPO critic as a scalar head on the policy's trunk (cheap on a CPU) instead of a separate model."""
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    """N of the best-of-n method: N reference samples per test prompt, the reward model's favourite kept."""
    progress: bool = True
    """Show progress bars."""
    overwrite: bool = False
    """Replace the run in --output: another command's (refused without this), or a previous demo's (every
    phase then runs again; without this a rerun skips the phases whose inputs are unchanged)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (not unknown, f"unknown method(s) {unknown}; known: {', '.join(METHODS)}"),
            (self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}"),
            (self.evals_per_run >= 1, f"evals_per_run must be >= 1, got {self.evals_per_run}"),
            (self.eval_samples >= 1, f"eval_samples must be >= 1, got {self.eval_samples}"),
            (len(set(self.seeds)) == len(self.seeds), f"seeds must differ, got {self.seeds}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.heldout_prompts >= 1, f"heldout_prompts must be >= 1, got {self.heldout_prompts}"),
            (
                self.preference_prompts == 0 or self.preference_prompts > self.heldout_prompts,
                "preference_prompts must exceed heldout_prompts",
            ),
            (all(n >= 1 for n in self.best_of), f"best_of values must be >= 1, got {self.best_of}"),
            (
                all(t > 0 for t in self.ppo_target_kls),
                f"ppo_target_kls must be > 0, got {self.ppo_target_kls}",
            ),
            (
                self.ppo_kl_horizon is None or self.ppo_kl_horizon >= 1,
                f"ppo_kl_horizon must be >= 1, got {self.ppo_kl_horizon}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from prefalign.config import check_device

        check_device(self.device)  # before any model is loaded


PRESET_VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    # Figure 2's methods (GRPO and RLOO are not in it: add them with --methods), sized to finish within
    # about 85 minutes on a 2-core CPU (BENCHMARKS.md). DPO trains half a pass, as in the default preset:
    # a full pass took 17 more minutes over four betas and only moved its points to higher KL.
    "frontier": {
        "methods": [m for m in METHODS if m not in ("grpo", "rloo")],
        "preference_prompts": 200,
        "heldout_prompts": 24,
        "evals_per_run": 4,
        "eval_samples": 4,
        "sample_batch_size": 256,
        "pft_epochs": 2.0,
        "dpo_epochs": 0.5,
        "rm_epochs": 1.0,
        "ppo_iterations": 24,
    },
    "smoke": {
        "model": "tiny-random",
        "preference_prompts": 32,
        "heldout_prompts": 8,
        "samples_per_prompt": 4,
        "test_prompts": 16,
        "max_new_tokens": 16,
        "sft_prompts": 8,
        "batch_size": 8,
        "pft_lr": 1e-3,
        "pft_epochs": 3.0,
        "sft_lr": 1e-3,
        "dpo_lr": 1e-3,
        "dpo_epochs": 1.0,
        "rm_lr": 1e-3,
        "ppo_lr": 1e-4,
        "ppo_iterations": 3,
        "ppo_rollout_batch": 4,
        "dpo_betas": [1.0],
        "ppo_target_kls": [1.0],
        "best_of": [2],
    },
}
"""Each preset's values that differ from the field defaults (the defaults are the default preset)."""

SMOKE_MODEL = "tiny-random"
"""The smoke preset's model name: a tiny random Llama and tokenizer built in-process (prefalign.testing)."""
SMOKE_VOCAB = 1024
"""Vocabulary size asked of the smoke tokenizer (every word of its small corpus becomes one token)."""


def config_for_preset(preset: str = "default", **overrides: Any) -> DemoConfig:
    """A :class:`DemoConfig` with the preset's values, then ``overrides`` on top."""
    if preset not in PRESET_VALUES:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return build_config(DemoConfig, None, {**PRESET_VALUES[preset], "preset": preset, **overrides})


def config_from_namespace(args: argparse.Namespace) -> DemoConfig:
    """Preset values, then the YAML file (``--config``), then flags."""
    import yaml

    names = {f.name for f in dataclasses.fields(DemoConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    loaded: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        loaded = {k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()}
    values = {**loaded, **flags}
    return config_for_preset(str(values.pop("preset", "default")), **values)
