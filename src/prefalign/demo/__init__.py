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

One module per phase: :mod:`~prefalign.demo.reference` (the smoke model, the SFT step, sampling),
:mod:`~prefalign.demo.preferences`, :mod:`~prefalign.demo.evaluation`, :mod:`~prefalign.demo.methods`
and :mod:`~prefalign.demo.report`; :mod:`~prefalign.demo.config` holds the options and presets,
:mod:`~prefalign.demo.phase` the skip-if-unchanged phase records and :mod:`~prefalign.demo.run` the
driver and the command line.
"""

from __future__ import annotations

from prefalign.demo.config import (
    METHODS,
    PHASE_VERSION,
    PRESET_VALUES,
    PRESETS,
    PROMPTS_FILE,
    SMOKE_MODEL,
    SMOKE_VOCAB,
    DemoConfig,
    config_for_preset,
    config_from_namespace,
)
from prefalign.demo.methods import steps_between_evals
from prefalign.demo.phase import Phase, digest, say, write_jsonl
from prefalign.demo.preferences import load_demo_prompts, preference_pairs
from prefalign.demo.reference import plain_text_tokenizer
from prefalign.demo.run import Demo, add_commands, run_demo

__all__ = [
    "METHODS",
    "PHASE_VERSION",
    "PRESETS",
    "PRESET_VALUES",
    "PROMPTS_FILE",
    "SMOKE_MODEL",
    "SMOKE_VOCAB",
    "Demo",
    "DemoConfig",
    "Phase",
    "add_commands",
    "config_for_preset",
    "config_from_namespace",
    "digest",
    "load_demo_prompts",
    "plain_text_tokenizer",
    "preference_pairs",
    "run_demo",
    "say",
    "steps_between_evals",
    "write_jsonl",
]
