"""Read, validate and tokenise the data sets of every method: preference pairs, unpaired preferences,
SFT examples and prompts, in every form TRL documents.

Each kind comes standard (text) or conversational (lists of ``{"role", "content"}`` messages with roles
``system``, ``user``, ``assistant``, ``tool``):

- preference pairs (reward model, DPO): ``prompt`` / ``chosen`` / ``rejected``; or an implicit prompt:
  ``chosen`` and ``rejected`` alone, two texts split at the last whitespace before they differ, or two
  whole conversations split at their longest common message prefix;
- unpaired preferences (KTO): ``prompt`` / ``completion`` / ``label`` (a boolean: is the completion
  desirable); paired data given here becomes two rows, chosen ``true`` and rejected ``false``;
- SFT examples: language modelling ``text`` or ``messages``, or ``prompt`` / ``completion``;
- prompts alone: ``prompt`` (for generation, PPO, GRPO, RLOO).

Every loader (:func:`load_preferences`, :func:`load_unpaired`, :func:`load_sft`, :func:`load_prompts`)
and reader (:func:`read_rows`, :func:`iter_rows`) takes ``split`` (None: ``train``) and ``subset`` (a hub
config, or a sub-folder of a local folder), as the hub ships data sets; the loaders also take ``columns``
(canonical name -> the data set's column, from the command-line form ``prompt=question,chosen=good`` by
:func:`parse_columns`). ``docs/data_formats.md`` shows an example of each form.

The package is split by stage, and every public name is importable from ``prefalign.data``:

- :mod:`prefalign.data.rows`: located rows and :class:`DataError`;
- :mod:`prefalign.data.readers`: raw rows with their locations from JSONL, JSON, CSV, Parquet, saved
  ``datasets`` folders, ``<split>.<ext>`` folders and hub ids (:func:`read_rows`, :func:`iter_rows`);
- :mod:`prefalign.data.columns`: the ``columns`` mapping (:func:`parse_columns`, :func:`rename_columns`);
- :mod:`prefalign.data.validation`: each row checked, the first bad one a :class:`DataError` naming its
  file and line (``pairs.jsonl:17: field "chosen" is empty``, or with a mapping
  ``pairs.jsonl:17: field "good" (--columns chosen=good) is empty``); the ``load_*`` functions read and
  validate;
- :mod:`prefalign.data.encoding`: chat templates, prompts, completions, pairs, unpaired rows and SFT
  examples as token ids, every completion ending with exactly one end-of-turn token
  (:func:`end_of_turn_id`);
- :mod:`prefalign.data.batching`: deterministic index batches (:func:`batches`).
"""

from __future__ import annotations

from prefalign.data.batching import batches
from prefalign.data.columns import Columns, check_columns, parse_columns, rename_columns, show_columns
from prefalign.data.encoding import (
    encode_completion,
    encode_preference,
    encode_preferences,
    encode_prompt,
    encode_sft,
    encode_sft_examples,
    encode_unpaired,
    encode_unpaired_example,
    end_of_turn_id,
    truncate_pair,
)
from prefalign.data.readers import CSV_FIELD_LIMIT, HUB_ID, SUFFIXES, iter_rows, read_rows
from prefalign.data.rows import IGNORE_INDEX, ROLES, DataError, LocatedRow, Messages, Row, located, location
from prefalign.data.validation import (
    is_conversational,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    validate_preference,
    validate_prompt,
    validate_sft,
    validate_unpaired,
)

__all__ = [
    "CSV_FIELD_LIMIT",
    "HUB_ID",
    "IGNORE_INDEX",
    "ROLES",
    "SUFFIXES",
    "Columns",
    "DataError",
    "LocatedRow",
    "Messages",
    "Row",
    "batches",
    "check_columns",
    "encode_completion",
    "encode_preference",
    "encode_preferences",
    "encode_prompt",
    "encode_sft",
    "encode_sft_examples",
    "encode_unpaired",
    "encode_unpaired_example",
    "end_of_turn_id",
    "is_conversational",
    "iter_rows",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "load_unpaired",
    "located",
    "location",
    "parse_columns",
    "read_rows",
    "rename_columns",
    "show_columns",
    "truncate_pair",
    "validate_preference",
    "validate_prompt",
    "validate_sft",
    "validate_unpaired",
]
