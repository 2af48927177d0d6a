"""`prefalign demo`: the DPO paper's controlled-sentiment experiment at laptop scale.

Rafailov et al. 2023 (section 6.1, appendix C.1) prompt a model with the start of a movie review and ask
for a positive continuation, with a sentiment classifier as the ground-truth reward; preferences are
sampled from the reference policy and ordered by that reward, and every method is judged by the reward it
reaches against its KL divergence from the reference (Figure 2, left). Here the policy is the bundled
SmolLM2-135M continuing plain text, the prompts are the movie-review openings shipped in
``prefalign/assets/demo_prompts.jsonl``, and the ground truth is VADER's compound sentiment (Hutto & Gilbert
2014), a lexicon stand-in for the paper's classifier.

Pipeline (each phase a folder of the run; a phase whose inputs are unchanged is skipped on a rerun):

1. optional ``--sft``: a short SFT of the model on its own continuations of train prompts (the paper's SFT);
2. preferences: ``samples_per_prompt`` samples per train prompt from the reference, every pair of them
   ordered by the ground truth, ties dropped; pairs of ``heldout_prompts`` prompts are held out;
3. evaluation of the reference on the test prompts;
4. the methods: Preferred-FT (SFT on the chosen completions), DPO, RLHF-PPO (a Bradley-Terry reward model
   on the same pairs, then PPO against it), and with the frontier preset PPO-GT (PPO against VADER
   itself), a DPO beta sweep, a PPO target-KL sweep and Best-of-N, each evaluated along its training;
5. ``summary.json``, ``report.html``/``report.md`` (:mod:`prefalign.report`) and a table in the terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from prefalign.config import ConfigError, add_config_arguments, build_config, config_to_dict, save_config

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).parent / "assets" / "demo_prompts.jsonl"
"""The bundled movie-review openings: ``{"prompt", "split"}`` per line, split ``train`` or ``test``."""

PHASE_VERSION = 2
"""Part of every phase's inputs: bump it when what a phase computes changes, so old results are redone."""

METHODS = ("preferred-ft", "dpo", "ppo", "dpo-sweep", "ppo-gt", "ppo-kl-sweep", "best-of-n", "grpo", "rloo")
PRESETS = ("default", "frontier", "smoke")


@dataclass
class DemoConfig:
    """The DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec. 6.1) on a small model."""

    output: str = "runs/demo"
    """Run folder: report.html, report.md, summary.json, samples/, one folder per phase."""
    preset: str = "default"
    """default (about 15 minutes on a laptop CPU), frontier (the paper's Figure 2 sweep; hours on a CPU) or
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
    device: str | None = None
    """Where models run (cpu, cuda); default: cuda if available, else cpu."""
    max_new_tokens: int = 32
    """Length of every continuation: preference samples, evaluation samples and PPO rollouts."""
    sample_batch_size: int = 64
    """Prompts sampled together when building preferences and evaluating."""
    test_prompts: int = 0
    """Test prompts each evaluation samples (0: the whole test split)."""
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
    rm_epochs: float = 1.0
    """Reward-model passes over the training pairs."""
    ppo_iterations: int = 20
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
    ppo_target_kls: list[float] = field(default_factory=lambda: [2.0, 6.0, 12.0])
    """Target KLs of the ppo-kl-sweep method."""
    ppo_shared_value_head: bool = True
    """PPO critic as a scalar head on the policy's trunk (cheap on a CPU) instead of a separate model."""
    best_of: list[int] = field(default_factory=lambda: [4, 16])
    """N of the best-of-n method: N reference samples per test prompt, the reward model's favourite kept."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        checks = [
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}"),
            (not unknown, f"unknown method(s) {unknown}; known: {', '.join(METHODS)}"),
            (self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}"),
            (self.evals_per_run >= 1, f"evals_per_run must be >= 1, got {self.evals_per_run}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.heldout_prompts >= 1, f"heldout_prompts must be >= 1, got {self.heldout_prompts}"),
            (
                self.preference_prompts == 0 or self.preference_prompts > self.heldout_prompts,
                "preference_prompts must exceed heldout_prompts",
            ),
            (all(n >= 1 for n in self.best_of), f"best_of values must be >= 1, got {self.best_of}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        from prefalign.generation import check_device

        check_device(self.device)  # before any model is loaded


PRESET_VALUES: dict[str, dict[str, Any]] = {
    "default": {},
    "frontier": {
        "methods": list(METHODS),
        "preference_prompts": 0,
        "heldout_prompts": 24,
        "evals_per_run": 5,
        "dpo_epochs": 3.0,
        "ppo_iterations": 120,
        "ppo_rollout_batch": 32,
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


def say(message: str) -> None:
    """A progress message on stderr that does not break a running progress bar."""
    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# phases: a folder, the inputs its results depend on, and a record written when it is complete


def digest(value: Any) -> str:
    """A short stable hash of JSON-able ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Phase:
    """One step of the pipeline, complete when ``folder/phase.json`` holds the hash of its inputs."""

    name: str
    folder: Path
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return digest(self.inputs)

    @property
    def record_path(self) -> Path:
        return self.folder / "phase.json"

    def completed(self) -> dict[str, Any] | None:
        """The stored result if the phase ran to completion with these inputs, else ``None``."""
        if not self.record_path.is_file():
            return None
        record = json.loads(self.record_path.read_text())
        return record["result"] if record.get("key") == self.key else None

    def reset(self, run_dir: Path) -> None:
        """Remove the folder and the sample files a previous run of this phase wrote."""
        if self.record_path.is_file():
            old = json.loads(self.record_path.read_text()).get("result", {})
            for point in old.get("points", []):
                (run_dir / point["samples"]).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def finish(self, result: dict[str, Any], wall_s: float) -> None:
        result = {**result, "wall_s": round(wall_s, 2)}
        record = {"name": self.name, "key": self.key, "inputs": self.inputs, "result": result}
        self.record_path.write_text(json.dumps(record, indent=2, default=str))


# --------------------------------------------------------------------------------------------------
# prompts and preferences


def load_demo_prompts(path: str | Path | None) -> tuple[list[str], list[str]]:
    """Train and test prompt texts of a ``{"prompt", "split"}`` file (default: the bundled one)."""
    from prefalign.data import DataError, read_rows

    source = Path(path) if path else PROMPTS_FILE
    train, test = [], []
    for where, row in read_rows(source):
        if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
            raise DataError(f'{where}: expected a non-empty "prompt"')
        split = row.get("split", "train")
        if split not in ("train", "test"):
            raise DataError(f'{where}: "split" must be train or test, got {split!r}')
        (train if split == "train" else test).append(str(row["prompt"]))
    if not train or not test:
        raise DataError(f"{source}: needs prompts in both splits (train {len(train)}, test {len(test)})")
    return train, test


def preference_pairs(prompt: str, completions: list[str], scores: list[float]) -> tuple[list[dict], int]:
    """Every pair of ``completions`` ordered by ``scores`` (higher is chosen); ties are dropped.

    Returns:
        The pairs as ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` and the
        number of tied pairs dropped.
    """
    pairs, ties = [], 0
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if scores[i] == scores[j]:
                ties += 1
                continue
            win, lose = (i, j) if scores[i] > scores[j] else (j, i)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": completions[win],
                    "rejected": completions[lose],
                    "chosen_reward": scores[win],
                    "rejected_reward": scores[lose],
                }
            )
    return pairs, ties


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def steps_between_evals(total_steps: int, evals: int) -> int:
    """``eval_every`` giving at least ``evals`` evaluations (multiples of it, plus the last step), evenly
    spaced where possible: 40 steps and 3 evaluations give 14, 28, 40."""
    if evals <= 1:
        return max(1, total_steps)
    return max(1, min(math.ceil(total_steps / evals), (total_steps - 1) // (evals - 1)))


def plain_text_tokenizer(path: str) -> Any:
    """The model's tokenizer without its chat template.

    The demo continues plain text, so every trainer must encode prompts as
    ``encode_prompt(tokenizer, text, raw=True)`` does; without a template that is what they all do.
    """
    from prefalign.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = None
    return tokenizer


# --------------------------------------------------------------------------------------------------
# the experiment


class Demo:
    """Runs the phases of one demo configuration in ``config.output``."""

    def __init__(self, config: DemoConfig) -> None:
        import torch

        self.config = config
        self.out = Path(config.output)
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.train_prompts, self.test_prompts = load_demo_prompts(config.prompts)
        if config.test_prompts:
            self.test_prompts = self.test_prompts[: config.test_prompts]
        self.timings: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._reference: Any = None
        self._tokenizer: Any = None
        self._ground_truth: Any = None
        self.model_path = config.model
        self.reference_path = config.model
        self.reference_key = digest({"model": config.model})

    # ---- shared models -----------------------------------------------------------------------------

    @property
    def ground_truth(self) -> Any:
        if self._ground_truth is None:
            from prefalign.rewards import make_reward

            self._ground_truth = make_reward(reward="sentiment")
        return self._ground_truth

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = plain_text_tokenizer(self.reference_path)
        return self._tokenizer

    @property
    def reference(self) -> Any:
        """The frozen reference policy (loaded once, shared by evaluation and DPO)."""
        if self._reference is None:
            from prefalign.models import load_reference

            self._reference = load_reference(self.reference_path, device=self.device)
        return self._reference

    def load_policy(self) -> Any:
        from prefalign.models import load_policy

        return load_policy(self.reference_path, device=self.device)

    # ---- phase driver ------------------------------------------------------------------------------

    def phase(self, name: str, folder: Path, inputs: dict[str, Any], body: Callable[[Phase], dict]) -> dict:
        """Run ``body(phase)`` unless the phase is complete with these inputs; returns its result."""
        phase = Phase(name, folder, {"phase": name, "version": PHASE_VERSION, **inputs})
        done = phase.completed()
        if done is not None:
            say(f"[{name}] complete in {folder} (inputs unchanged): skipped")
            self.timings[name] = {"wall_s": done["wall_s"], "skipped": True}
            self.results[name] = {**done, "key": phase.key}
            return self.results[name]
        say(f"[{name}] running ...")
        phase.reset(self.out)
        start = time.perf_counter()
        result = body(phase)
        wall = time.perf_counter() - start
        phase.finish(result, wall)
        say(f"[{name}] done in {wall:.1f} s")
        self.timings[name] = {"wall_s": round(wall, 2), "skipped": False}
        self.results[name] = {**result, "wall_s": round(wall, 2), "key": phase.key}
        return self.results[name]

    def eval_settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "reference": self.reference_key,
            "test_prompts": digest(self.test_prompts),
            "max_new_tokens": c.max_new_tokens,
            "seed": c.seed,
            "sample_batch_size": c.sample_batch_size,
        }

    def evaluator(self, method: str) -> tuple[Callable[[int, Any], None], list[dict[str, Any]]]:
        """A training callback that evaluates the policy at each call; and the list of points it fills."""
        from prefalign.evaluate import evaluate_policy

        points: list[dict[str, Any]] = []

        def callback(step: int, model: Any) -> None:
            result = evaluate_policy(
                model,
                self.reference,
                self.tokenizer,
                self.test_prompts,
                self.ground_truth,
                max_new_tokens=self.config.max_new_tokens,
                seed=self.config.seed + 1,
                batch_size=self.config.sample_batch_size,
            )
            points.append(self.save_point(method, f"step-{step}", result, step=step))

        return callback, points

    def save_point(self, method: str, checkpoint: str, result: Any, **extra: Any) -> dict[str, Any]:
        rel = f"samples/{method}-{checkpoint}.jsonl"
        result.write(self.out / rel)
        say(
            f"  {method} {checkpoint}: reward {result.reward:+.3f}  KL {result.kl:.2f}"
            f"  ({len(result.records)} samples, {result.seconds:.1f} s)"
        )
        return {
            "method": method,
            "checkpoint": checkpoint,
            "reward": result.reward,
            "kl": result.kl,
            "samples": rel,
            "eval_s": round(result.seconds, 2),
            **extra,
        }

    # ---- phases ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from prefalign.report import write_report

        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        if self.config.model == SMOKE_MODEL:
            self.build_smoke_model()
        if self.config.sft:
            self.sft_step()
        prefs = self.preferences()
        self.evaluate_reference()
        for method in self.config.methods:
            for name, runner in self.method_runs(method, prefs):
                runner(name)
        summary = self.summary(time.perf_counter() - start)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        write_report(self.out, summary)
        return summary

    def method_runs(self, method: str, prefs: dict[str, Any]) -> Iterator[tuple[str, Callable[[str], Any]]]:
        """The (run name, runner) pairs one method stands for (a sweep stands for several runs)."""
        c = self.config
        if method == "preferred-ft":
            yield "preferred-ft", lambda name: self.preferred_ft(name, prefs)
        elif method == "dpo":
            yield "dpo", lambda name: self.dpo(name, prefs, c.dpo_beta)
        elif method == "dpo-sweep":
            for beta in c.dpo_betas:
                yield f"dpo-beta{beta:g}", lambda name, b=beta: self.dpo(name, prefs, b)
        elif method == "ppo":
            yield "ppo", lambda name: self.ppo(name, prefs, c.ppo_target_kl, learned=True)
        elif method == "ppo-gt":
            yield "ppo-gt", lambda name: self.ppo(name, prefs, c.ppo_target_kl, learned=False)
        elif method == "ppo-kl-sweep":
            for target in c.ppo_target_kls:
                yield f"ppo-kl{target:g}", lambda name, t=target: self.ppo(name, prefs, t, learned=True)
        elif method in ("grpo", "rloo"):
            yield method, lambda name: self.online(name, method, prefs, True, {})
        elif method == "best-of-n":
            for n in c.best_of:
                yield f"best-of-{n}", lambda name, n=n: self.best_of_n(name, prefs, n)

    def build_smoke_model(self) -> None:
        """A tiny random Llama and an in-process tokenizer (prefalign.testing), saved in the run folder.

        The tokenizer's vocabulary is large enough to hold whole words of its corpus ("wonderful",
        "boring", ...), so that random samples now and then carry a word VADER scores and not every
        preference is a tie."""

        def body(phase: Phase) -> dict[str, Any]:
            from prefalign.testing import tiny_causal_lm, tiny_tokenizer

            tokenizer = tiny_tokenizer(vocab_size=SMOKE_VOCAB)
            model = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=self.config.seed)
            model.save_pretrained(phase.folder)
            tokenizer.save_pretrained(phase.folder)
            return {"path": str(phase.folder), "vocab": len(tokenizer)}

        folder = self.out / "tiny-model"
        inputs = {"seed": self.config.seed, "hidden_size": 64, "vocab": SMOKE_VOCAB}
        self.phase("tiny-model", folder, inputs, body)
        self.model_path = self.reference_path = str(folder)
        self.reference_key = digest({"model": "tiny-random", **inputs})

    def sample(self, prompts: list[str], seed: int) -> list[str]:
        """One continuation per prompt from the reference (temperature 1, no top-k/top-p)."""
        from prefalign.data import encode_prompt
        from prefalign.generation import generate

        out = generate(
            self.reference,
            self.tokenizer,
            [encode_prompt(self.tokenizer, p, raw=True) for p in prompts],
            max_new_tokens=self.config.max_new_tokens,
            seed=seed,
            batch_size=self.config.sample_batch_size,
            progress=self.config.progress,
        )
        return out.texts

    def sft_step(self) -> None:
        """The paper's SFT step, at this scale: fine-tune on the model's own continuations of train prompts."""
        from prefalign.train.sft import SFTConfig
        from prefalign.train.sft import train as train_sft

        c = self.config
        prompts = self.train_prompts[: c.sft_prompts]

        def body(phase: Phase) -> dict[str, Any]:
            texts = self.sample(prompts, c.seed + 2)
            rows = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True) if t.strip()]
            data = write_jsonl(phase.folder / "demonstrations.jsonl", rows)
            config = SFTConfig(
                model=self.model_path,
                data=str(data),
                output=str(phase.folder),
                lr=c.sft_lr,
                batch_size=c.batch_size,
                seed=c.seed,
                progress=c.progress,
            )
            summary = train_sft(config, model=self.load_policy(), tokenizer=self.tokenizer)
            return {"demonstrations": len(rows), "steps": summary["steps"]}

        inputs = {"model": self.reference_key, "prompts": digest(prompts), "lr": c.sft_lr, "seed": c.seed}
        inputs |= {"max_new_tokens": c.max_new_tokens, "batch_size": c.batch_size}
        result = self.phase("sft", self.out / "runs" / "sft", inputs, body)
        self.reference_path = str(self.out / "runs" / "sft")
        self.reference_key = result["key"]
        self._reference = self._tokenizer = None

    def preferences(self) -> dict[str, Any]:
        """Sample, score and pair: the preference data every method learns from."""
        c = self.config
        prompts = list(self.train_prompts)
        random.Random(c.seed).shuffle(prompts)
        prompts = prompts[: c.preference_prompts or len(prompts)]
        inputs = {"reference": self.reference_key, "prompts": digest(prompts), "seed": c.seed}
        inputs |= {"samples_per_prompt": c.samples_per_prompt, "max_new_tokens": c.max_new_tokens}
        inputs |= {"heldout_prompts": c.heldout_prompts, "sample_batch_size": c.sample_batch_size}
        return self.phase(
            "preferences", self.out / "preferences", inputs, lambda ph: self._build_preferences(ph, prompts)
        )

    def _build_preferences(self, phase: Phase, prompts: list[str]) -> dict[str, Any]:
        c = self.config
        k = c.samples_per_prompt
        expanded = [p for p in prompts for _ in range(k)]
        texts = self.sample(expanded, c.seed)
        scores = self.ground_truth(expanded, texts)
        write_jsonl(
            phase.folder / "samples.jsonl",
            [
                {"prompt": p, "completion": t, "reward": s}
                for p, t, s in zip(expanded, texts, scores, strict=True)
            ],
        )
        sets: dict[str, list[dict]] = {"train": [], "heldout": []}
        ties = empty = 0
        best: list[dict[str, Any]] = []
        for i, prompt in enumerate(prompts):
            group = [
                (t, s) for t, s in zip(texts[i * k : (i + 1) * k], scores[i * k : (i + 1) * k], strict=True)
            ]
            kept = [(t, s) for t, s in group if t.strip()]
            empty += len(group) - len(kept)
            pairs, tied = preference_pairs(prompt, [t for t, _ in kept], [s for _, s in kept])
            ties += tied
            heldout = i >= len(prompts) - c.heldout_prompts
            sets["heldout" if heldout else "train"] += pairs
            if pairs and not heldout:  # the sample chosen over every other one of its prompt
                top = max(kept, key=lambda item: item[1])
                best.append({"prompt": prompt, "completion": top[0], "reward": top[1]})
        if not sets["train"] or not sets["heldout"]:
            raise ConfigError(
                f"preferences: {len(sets['train'])} training and {len(sets['heldout'])} held-out pairs after "
                f"dropping {ties} ties; sample more prompts (--preference-prompts) or longer continuations"
            )
        write_jsonl(phase.folder / "pairs-train.jsonl", sets["train"])
        write_jsonl(phase.folder / "pairs-heldout.jsonl", sets["heldout"])
        write_jsonl(phase.folder / "chosen-train.jsonl", best)
        return {
            "prompts": len(prompts),
            "samples": len(texts),
            "mean_reward": sum(scores) / len(scores),
            "pairs_train": len(sets["train"]),
            "chosen_train": len(best),
            "pairs_heldout": len(sets["heldout"]),
            "ties_dropped": ties,
            "empty_dropped": empty,
            "folder": str(phase.folder.relative_to(self.out)),
        }

    def evaluate_reference(self) -> None:
        from prefalign.evaluate import evaluate_policy

        def body(phase: Phase) -> dict[str, Any]:
            result = evaluate_policy(
                self.reference,
                self.reference,
                self.tokenizer,
                self.test_prompts,
                self.ground_truth,
                max_new_tokens=self.config.max_new_tokens,
                seed=self.config.seed + 1,
                batch_size=self.config.sample_batch_size,
                progress=self.config.progress,
            )
            point = self.save_point("reference", "step-0", result, step=0)
            return {"points": [point], "eval_s": point["eval_s"], "training_samples": 0}

        self.phase("reference", self.out / "runs" / "reference", self.eval_settings(), body)

    def _trained(self, name: str, summary: dict, points: list[dict], per_step: int, wall: float) -> dict:
        eval_s = sum(p["eval_s"] for p in points)
        return {
            "points": points,
            "steps": summary["steps"],
            "training_samples": summary["steps"] * per_step,
            "eval_s": round(eval_s, 2),
            "train_s": round(wall - eval_s, 2),
            "final": summary.get("final", {}),
            "eval": summary.get("eval", {}),
        }

    def preferred_ft(self, name: str, prefs: dict[str, Any]) -> None:
        """Preferred-FT: supervised fine-tuning on the chosen completions, one per training prompt (the
        sample preferred over all the others of its prompt)."""
        from prefalign.train.loop import total_steps
        from prefalign.train.sft import SFTConfig
        from prefalign.train.sft import train as train_sft

        c = self.config

        def body(phase: Phase) -> dict[str, Any]:
            start = time.perf_counter()
            config = SFTConfig(
                model=self.reference_path,
                data=str(self.out / prefs["folder"] / "chosen-train.jsonl"),
                output=str(phase.folder),
                lr=c.pft_lr,
                epochs=c.pft_epochs,
                batch_size=c.batch_size,
                seed=c.seed,
                progress=c.progress,
            )
            steps = total_steps(config, prefs["chosen_train"])
            config.eval_every = steps_between_evals(steps, c.evals_per_run)
            callback, points = self.evaluator(name)
            summary = train_sft(config, model=self.load_policy(), tokenizer=self.tokenizer, callback=callback)
            return self._trained(name, summary, points, c.batch_size, time.perf_counter() - start)

        inputs = {"preferences": prefs["key"], "eval": self.eval_settings(), "lr": c.pft_lr}
        inputs |= {"epochs": c.pft_epochs, "batch_size": c.batch_size, "evals": c.evals_per_run}
        self.phase(name, self.out / "runs" / name, inputs, body)

    def dpo(self, name: str, prefs: dict[str, Any], beta: float) -> None:
        """DPO on the training pairs; the held-out pairs give its implicit-reward accuracy."""
        from prefalign.train.dpo import DPOConfig
        from prefalign.train.dpo import train as train_dpo
        from prefalign.train.loop import total_steps

        c = self.config

        def body(phase: Phase) -> dict[str, Any]:
            start = time.perf_counter()
            config = DPOConfig(
                model=self.reference_path,
                data=str(self.out / prefs["folder"] / "pairs-train.jsonl"),
                eval_data=str(self.out / prefs["folder"] / "pairs-heldout.jsonl"),
                output=str(phase.folder),
                beta=beta,
                lr=c.dpo_lr,
                epochs=c.dpo_epochs,
                batch_size=c.batch_size,
                seed=c.seed,
                progress=c.progress,
            )
            config.eval_every = steps_between_evals(
                total_steps(config, prefs["pairs_train"]), c.evals_per_run
            )
            callback, points = self.evaluator(name)
            summary = train_dpo(
                config,
                model=self.load_policy(),
                tokenizer=self.tokenizer,
                reference=self.reference,
                callback=callback,
            )
            return self._trained(name, summary, points, c.batch_size, time.perf_counter() - start)

        inputs = {"preferences": prefs["key"], "eval": self.eval_settings(), "beta": beta, "lr": c.dpo_lr}
        inputs |= {"epochs": c.dpo_epochs, "batch_size": c.batch_size, "evals": c.evals_per_run}
        self.phase(name, self.out / "runs" / name, inputs, body)

    def reward_model(self, prefs: dict[str, Any]) -> dict[str, Any]:
        """The Bradley-Terry reward model of RLHF, on the same training pairs as DPO."""
        from prefalign.train.reward import RewardConfig
        from prefalign.train.reward import train as train_reward

        c = self.config

        def body(phase: Phase) -> dict[str, Any]:
            config = RewardConfig(
                model=self.reference_path,
                data=str(self.out / prefs["folder"] / "pairs-train.jsonl"),
                eval_data=str(self.out / prefs["folder"] / "pairs-heldout.jsonl"),
                output=str(phase.folder),
                lr=c.rm_lr,
                epochs=c.rm_epochs,
                batch_size=c.batch_size,
                seed=c.seed,
                progress=c.progress,
            )
            summary = train_reward(config, tokenizer=self.tokenizer)
            return {
                "heldout_accuracy": summary["eval"].get("val/rewards/accuracies"),
                "heldout_pairs": summary["eval_examples"],
                "train_accuracy": summary["final"].get("rewards/accuracies"),
                "steps": summary["steps"],
                "training_samples": summary["steps"] * c.batch_size,
                "path": str(phase.folder),
            }

        inputs = {
            "preferences": prefs["key"],
            "lr": c.rm_lr,
            "epochs": c.rm_epochs,
            "batch_size": c.batch_size,
        }
        return self.phase("reward-model", self.out / "runs" / "reward-model", inputs, body)

    def ppo(self, name: str, prefs: dict[str, Any], target_kl: float | None, learned: bool) -> None:
        """PPO against the learned reward model (RLHF) or, for ppo-gt, against the ground truth itself."""
        c = self.config
        options = {"target_kl": target_kl, "shared_value_head": c.ppo_shared_value_head}
        options |= {"ppo_epochs": c.ppo_epochs, "minibatches": c.ppo_minibatches}
        self.online(name, "ppo", prefs, learned, options)

    def online(
        self, name: str, kind: str, prefs: dict[str, Any], learned: bool, options: dict[str, Any]
    ) -> None:
        """An online method (``prefalign.train.<kind>``: ppo, grpo, rloo) against the learned reward model
        or the ground truth, evaluated along its iterations."""
        import importlib

        c = self.config
        module = importlib.import_module(f"prefalign.train.{kind}")
        config_cls = getattr(module, f"{kind.upper()}Config")
        rm = self.reward_model(prefs) if learned else None
        prompts = write_jsonl(self.out / "prompts-train.jsonl", [{"prompt": p} for p in self.train_prompts])
        reward: Any = None if rm else "sentiment"
        if kind != "ppo":  # the group methods take a list of reward sources
            reward = [] if rm else ["sentiment"]

        def body(phase: Phase) -> dict[str, Any]:
            start = time.perf_counter()
            config = config_cls(
                model=self.reference_path,
                prompts=str(prompts),
                output=str(phase.folder),
                reward_model=rm["path"] if rm else None,
                reward=reward,
                raw=True,
                iterations=c.ppo_iterations,
                rollout_batch=c.ppo_rollout_batch,
                response_length=c.max_new_tokens,
                lr=c.ppo_lr,
                kl_coef=c.ppo_kl_coef,
                eval_every=steps_between_evals(c.ppo_iterations, c.evals_per_run),
                seed=c.seed,
                progress=c.progress,
                **options,
            )
            callback, points = self.evaluator(name)
            summary = module.train(config, callback=callback)
            per_step = c.ppo_rollout_batch * getattr(config, "num_generations", 1)  # responses per iteration
            return self._trained(name, summary, points, per_step, time.perf_counter() - start)

        inputs = {"kind": kind, "reward": rm["key"] if rm else "sentiment", "eval": self.eval_settings()}
        inputs |= {"prompts": digest(self.train_prompts), "lr": c.ppo_lr, "options": options}
        inputs |= {"iterations": c.ppo_iterations, "rollout_batch": c.ppo_rollout_batch}
        inputs |= {"kl_coef": c.ppo_kl_coef, "evals": c.evals_per_run}
        self.phase(name, self.out / "runs" / name, inputs, body)

    def best_of_n(self, name: str, prefs: dict[str, Any], n: int) -> None:
        """Best-of-N from the reference, chosen by the reward model; KL is the analytic log N - (N-1)/N."""
        from prefalign.evaluate import best_of_n
        from prefalign.rewards import make_reward

        c = self.config
        rm = self.reward_model(prefs)

        def body(phase: Phase) -> dict[str, Any]:
            selector = make_reward(reward_model=rm["path"], device=self.device, raw=True)
            result = best_of_n(
                self.reference,
                self.tokenizer,
                self.test_prompts,
                n,
                selector,
                self.ground_truth,
                max_new_tokens=c.max_new_tokens,
                seed=c.seed + 3,
                batch_size=c.sample_batch_size,
            )
            point = self.save_point(name, f"n-{n}", result, step=0)
            return {"points": [point], "eval_s": point["eval_s"], "training_samples": 0}

        self.phase(name, self.out / "runs" / name, {"reward": rm["key"], "eval": self.eval_settings()}, body)

    # ---- summary -----------------------------------------------------------------------------------

    def summary(self, wall: float) -> dict[str, Any]:
        from prefalign.report import environment, frontier_sentence

        points = [p for r in self.results.values() for p in r.get("points", [])]
        methods = []
        for name, r in self.results.items():
            if not r.get("points"):
                continue
            last = r["points"][-1]
            methods.append(
                {
                    "method": name,
                    "checkpoint": last["checkpoint"],
                    "reward": last["reward"],
                    "kl": last["kl"],
                    "train_s": r.get("train_s", 0.0),
                    "eval_s": r.get("eval_s", 0.0),
                    "training_samples": r.get("training_samples", 0),
                    "run": f"runs/{name}",
                }
            )
        return {
            "config": config_to_dict(self.config),
            "preferences": self.results.get("preferences"),
            "reward_model": self.results.get("reward-model"),
            "methods": methods,
            "points": points,
            "conclusion": frontier_sentence(points),
            "phases": self.timings,
            "wall_s": round(wall, 1),
            "environment": environment(self.device),
        }


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run (or complete) the experiment in ``config.output``; returns the summary."""
    if config.preset == "frontier":
        say(
            "The frontier preset trains "
            f"{len(config.dpo_betas) + len(config.ppo_target_kls) + 4} models and evaluates each "
            f"{config.evals_per_run} times: expect hours on a CPU (a GPU is used when there is one)."
        )
    return Demo(config).run()


# --------------------------------------------------------------------------------------------------
# command line


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


def _run(args: argparse.Namespace) -> int:
    from prefalign.report import terminal_table

    config = config_from_namespace(args)
    summary = run_demo(config)
    print(terminal_table(summary))
    print(f"report: {Path(config.output) / 'report.html'} (and report.md)", file=sys.stderr)
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="The DPO paper's controlled-sentiment experiment: DPO vs RLHF-PPO, with a report.",
        description=DemoConfig.__doc__,
    )
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(func=_run)
