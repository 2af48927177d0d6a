"""The experiment's driver: the models every phase shares, the phase runner, and the order of the phases
(:meth:`Demo.run`); plus `prefalign demo` on the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefalign.config import add_config_arguments, save_config
from prefalign.demo import evaluation, methods, preferences, reference, report
from prefalign.demo.config import PHASE_VERSION, SMOKE_MODEL, DemoConfig, config_from_namespace
from prefalign.demo.folder import prepare_demo_folder
from prefalign.demo.phase import Phase, digest, say


class Demo:
    """Runs the phases of one demo configuration in ``config.output``.

    Holds what the phases share: the configuration, the prompts, the reference policy and its tokenizer
    (loaded once), the ground-truth reward, and each phase's result and timing. The phases themselves
    are functions of a ``Demo`` in :mod:`~prefalign.demo.reference`, :mod:`~prefalign.demo.preferences`,
    :mod:`~prefalign.demo.evaluation`, :mod:`~prefalign.demo.methods` and :mod:`~prefalign.demo.report`.
    """

    def __init__(self, config: DemoConfig) -> None:
        import torch

        self.config = config
        self.out = Path(config.output)
        self.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.train_prompts, self.test_prompts = preferences.load_demo_prompts(config.prompts)
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
        """VADER's sentiment: the reward every method is judged by."""
        if self._ground_truth is None:
            from prefalign.rewards import make_reward

            self._ground_truth = make_reward(reward="sentiment")
        return self._ground_truth

    @property
    def tokenizer(self) -> Any:
        """The reference's tokenizer without a chat template (the demo continues plain text)."""
        if self._tokenizer is None:
            self._tokenizer = reference.plain_text_tokenizer(self.reference_path)
        return self._tokenizer

    @property
    def reference(self) -> Any:
        """The frozen reference policy (loaded once, shared by evaluation and DPO)."""
        if self._reference is None:
            from prefalign.models import load_reference

            self._reference = load_reference(self.reference_path, device=self.device)
        return self._reference

    def load_policy(self) -> Any:
        """A fresh trainable copy of the reference policy."""
        from prefalign.models import load_policy

        return load_policy(self.reference_path, device=self.device)

    def set_reference(self, path: str, key: str) -> None:
        """Make the model at ``path`` (identified by ``key`` in phase inputs) the reference from now on."""
        self.reference_path, self.reference_key = path, key
        self._reference = self._tokenizer = None

    # ---- phase driver ------------------------------------------------------------------------------

    def phase(self, name: str, folder: Path, inputs: dict[str, Any], body: Callable[[Phase], dict]) -> dict:
        """Run ``body(phase)`` unless the phase is complete with these inputs; returns its result."""
        phase = Phase(name, folder, {"phase": name, "version": PHASE_VERSION, **inputs})
        if self.results.get(name, {}).get("key") == phase.key:
            return self.results[name]  # asked for again in this invocation (the reward model: PPO, its sweep)
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

    # ---- the pipeline ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Every phase in order (the smoke model, SFT, preferences, the reference, the methods), then the
        summary and the report; returns the summary."""
        start = time.perf_counter()
        prepare_demo_folder(self.config)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out / "config.yaml")
        if self.config.model == SMOKE_MODEL:
            reference.build_smoke_model(self)
        if self.config.sft:
            reference.sft_step(self)
        prefs = preferences.build(self)
        evaluation.evaluate_reference(self)
        for method in self.config.methods:
            for name, runner in methods.method_runs(self, method, prefs):
                runner(name)
        return report.write_summary(self, time.perf_counter() - start)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run (or complete) the experiment in ``config.output``; returns the summary (with ``--seeds``: the
    across-seeds result of :func:`prefalign.demo.seeds.run_seeds`)."""
    if config.seeds:
        from prefalign.demo.seeds import run_seeds

        return run_seeds(config, run_demo)
    if config.preset == "frontier":
        one_each = {"preferred-ft", "dpo", "ppo", "ppo-gt", "grpo", "rloo"} & set(config.methods)
        policies = len(one_each)
        policies += len(config.dpo_betas) * ("dpo-sweep" in config.methods)
        policies += len(config.ppo_target_kls) * ("ppo-kl-sweep" in config.methods)
        say(
            f"The frontier preset trains {policies} policies and a reward model, evaluates each "
            f"{config.evals_per_run} times and draws Best-of-N: expect about an hour and a half on a 2-core CPU "
            "(a GPU is used when there is one)."
        )
    return Demo(config).run()


# --------------------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    from prefalign.report import terminal_table

    config = config_from_namespace(args)
    summary = run_demo(config)
    if config.seeds:
        print((Path(config.output) / "seeds.md").read_text())
        print(
            f"per seed: {Path(config.output)}/seed-N/report.html; across seeds: seeds.json", file=sys.stderr
        )
        return 0
    print(terminal_table(summary))
    print(f"report: {Path(config.output) / 'report.html'} (and report.md)", file=sys.stderr)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``prefalign demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="The DPO paper's controlled-sentiment experiment: DPO vs RLHF-PPO, with a report.",
        description=DemoConfig.__doc__,
    )
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(func=_run)
