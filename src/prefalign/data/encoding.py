"""Tokenisation of prompts, completions, preference pairs, unpaired preferences and SFT examples.

Tokenisation (:func:`encode_prompt`, :func:`encode_preference`, :func:`encode_unpaired_example`,
:func:`encode_sft`) goes through the
tokenizer's chat template when it has one; every completion ends with exactly one end-of-turn token
(:func:`end_of_turn_id`: ``<|im_end|>`` for ChatML models, otherwise the tokenizer's EOS).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prefalign.data.rows import IGNORE_INDEX, DataError, Messages, Row

logger = logging.getLogger("prefalign.data")  # one logger for the whole data layer


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends every completion (and that generation should stop at).

    With a chat template: the special token the template writes right after an assistant message
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3). Otherwise the tokenizer's EOS.

    Raises:
        DataError: the tokenizer has neither.
    """
    if _has_template(tokenizer):
        marker = "PREFALIGN_END_OF_TURN_PROBE"
        text = _render(
            tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], False
        )
        if marker in text:
            after = text[text.rfind(marker) + len(marker) :]
            specials = {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
            for token in sorted(specials, key=len, reverse=True):
                if token and after.startswith(token):
                    return int(tokenizer.convert_tokens_to_ids(token))
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token and no chat template that ends assistant turns")
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer: Any, prompt: str | Messages, raw: bool = False) -> list[int]:
    """The one place a prompt becomes token ids (generation, DPO, PPO and SFT all call it).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: text, or a list of ``{"role", "content"}`` messages.
        raw: send text as it is even when the tokenizer has a chat template.

    Returns:
        Ids of the template rendering with the assistant header appended (``add_generation_prompt``)
        for messages, and for text when the tokenizer has a template and ``raw`` is False (the text
        becomes one user message); else ``tokenizer(text)`` with its own special tokens (e.g. BOS).

    Raises:
        DataError: a message list but the tokenizer has no chat template.
    """
    if isinstance(prompt, list):
        if not _has_template(tokenizer):
            raise DataError("conversational prompt, but the tokenizer has no chat template")
        return _ids(tokenizer, _render(tokenizer, prompt, add_generation_prompt=True))
    if _has_template(tokenizer) and not raw:
        text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return _ids(tokenizer, text)
    return _ids(tokenizer, prompt, add_special_tokens=True)


def _end_with_one(ids: list[int], eot: int) -> list[int]:
    while ids and ids[-1] == eot:
        ids = ids[:-1]
    return [*ids, eot]


def _completion_text(tokenizer: Any, prompt: Messages, completion: Messages, eot: int) -> str:
    """The template's rendering of ``completion`` after ``prompt``, up to its last end-of-turn token."""
    prefix = _render(tokenizer, prompt, add_generation_prompt=True)
    full = _render(tokenizer, prompt + completion, add_generation_prompt=False)
    if not full.startswith(prefix):
        raise DataError(
            "the chat template renders the prompt differently once a completion follows, so the "
            "completion cannot be split off"
        )
    text = full[len(prefix) :]
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    end = text.rfind(eot_text)
    return text[: end + len(eot_text)] if end >= 0 else text


def encode_completion(tokenizer: Any, prompt: str | Messages, completion: str | Messages) -> list[int]:
    """Ids of a completion as they follow :func:`encode_prompt`'s ids, ending with one end-of-turn token.

    Conversational: the chat template's rendering of the completion after the prompt, without the
    template's text after the last end-of-turn token (ChatML's trailing newline). Standard: the text's
    ids. Either way trailing end-of-turn ids are stripped and exactly one is appended, so a completion
    that already ends with ``<|im_end|>`` is not doubled.
    """
    eot = end_of_turn_id(tokenizer)
    if isinstance(completion, list):
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        if not _has_template(tokenizer):
            raise DataError("conversational completion, but the tokenizer has no chat template")
        return _end_with_one(_ids(tokenizer, _completion_text(tokenizer, prompt, completion, eot)), eot)
    return _end_with_one(_ids(tokenizer, completion), eot)


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int], bool]:
    """Apply the truncation rule of :func:`encode_preference`; returns the three lists and whether it cut."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def encode_preference(
    tokenizer: Any, example: Row, max_length: int, max_prompt_length: int | None = None, raw: bool = False
) -> dict[str, Any]:
    """Tokenise one validated preference pair.

    The prompt is tokenised once with :func:`encode_prompt`, so chosen and rejected share its ids;
    each completion comes from :func:`encode_completion` and ends with exactly one end-of-turn token.

    Truncation rule: if ``len(prompt) + max(len(chosen), len(rejected)) > max_length``, first the prompt
    is cut from the left to its last ``max_prompt_length`` tokens (default ``max_length // 2``; a
    shorter prompt is kept whole), then both completions are cut from the right to
    ``max_length - len(prompt)`` tokens (a cut completion loses its end-of-turn token).

    Args:
        tokenizer: a Hugging Face tokenizer.
        example: a row from :func:`load_preferences`.
        max_length: the most tokens of prompt + completion in one sequence.
        max_prompt_length: the most prompt tokens kept when truncating; must be < ``max_length``.
        raw: text prompts are sent as they are, not through the chat template (see :func:`encode_prompt`).

    Returns:
        ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of ints, the
        completions without the prompt) and ``truncated`` (bool).
    """
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    prompt = encode_prompt(tokenizer, example["prompt"], raw=raw)
    chosen = encode_completion(tokenizer, example["prompt"], example["chosen"])
    rejected = encode_completion(tokenizer, example["prompt"], example["rejected"])
    prompt, chosen, rejected, truncated = truncate_pair(
        prompt, chosen, rejected, max_length, max_prompt_length
    )
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "truncated": truncated,
    }


def encode_unpaired_example(
    tokenizer: Any, example: Row, max_length: int, max_prompt_length: int | None = None, raw: bool = False
) -> dict[str, Any]:
    """Tokenise one validated unpaired preference row (for KTO), as :func:`encode_preference` does a pair.

    The prompt comes from :func:`encode_prompt`, the completion from :func:`encode_completion` (ending
    with exactly one end-of-turn token); the truncation rule is :func:`encode_preference`'s with the one
    completion: past ``max_length``, the prompt is cut from the left to ``max_prompt_length`` (default
    ``max_length // 2``), then the completion from the right to ``max_length - len(prompt)``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        example: a row from :func:`~prefalign.data.validation.load_unpaired`.
        max_length: the most tokens of prompt + completion in one sequence.
        max_prompt_length: the most prompt tokens kept when truncating; must be < ``max_length``.
        raw: text prompts are sent as they are, not through the chat template (see :func:`encode_prompt`).

    Returns:
        ``prompt_input_ids``, ``completion_input_ids`` (lists of ints, the completion without the
        prompt), ``label`` (bool: the completion is desirable) and ``truncated`` (bool).
    """
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    prompt = encode_prompt(tokenizer, example["prompt"], raw=raw)
    completion = encode_completion(tokenizer, example["prompt"], example["completion"])
    prompt, completion, _, truncated = truncate_pair(
        prompt, completion, completion, max_length, max_prompt_length
    )
    return {
        "prompt_input_ids": prompt,
        "completion_input_ids": completion,
        "label": bool(example["label"]),
        "truncated": truncated,
    }


def _split_messages(messages: Messages) -> tuple[Messages, Messages]:
    """Split a conversation before its final run of assistant messages."""
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    return messages[:k], messages[k:]


def encode_sft(tokenizer: Any, example: Row, max_length: int, raw: bool = False) -> dict[str, Any]:
    """Tokenise one validated SFT example.

    ``text`` is trained on whole (its ids plus one EOS); ``prompt``/``completion`` and ``messages``
    (split before the final assistant turn(s)) train on the completion only. Over-long sequences
    are cut from the right to ``max_length``.

    Returns:
        ``input_ids`` and ``labels`` (lists of the same length; labels are ``-100`` on prompt tokens
        and equal to ``input_ids`` elsewhere, not shifted) and ``truncated`` (bool).
    """
    if "messages" in example:
        prompt_msgs, completion_msgs = _split_messages(example["messages"])
        prompt = encode_prompt(tokenizer, prompt_msgs)
        completion = encode_completion(tokenizer, prompt_msgs, completion_msgs)
    elif "text" in example:
        prompt, completion = (
            [],
            _end_with_one(_ids(tokenizer, example["text"], add_special_tokens=True), _eos(tokenizer)),
        )
    else:
        prompt = encode_prompt(tokenizer, example["prompt"], raw=raw)
        completion = encode_completion(tokenizer, example["prompt"], example["completion"])
    input_ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": len(prompt) + len(completion) > max_length}


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token to end a text example with")
    return int(tokenizer.eos_token_id)


def encode_preferences(
    tokenizer: Any,
    examples: Sequence[Row],
    max_length: int,
    max_prompt_length: int | None = None,
    raw: bool = False,
) -> list[dict[str, Any]]:
    """:func:`encode_preference` over a dataset, logging how many pairs were truncated."""
    return _encode_all(encode_preference, "pairs", tokenizer, examples, max_length, max_prompt_length, raw)


def encode_unpaired(
    tokenizer: Any,
    examples: Sequence[Row],
    max_length: int,
    max_prompt_length: int | None = None,
    raw: bool = False,
) -> list[dict[str, Any]]:
    """:func:`encode_unpaired_example` over a dataset, logging how many rows were truncated."""
    return _encode_all(
        encode_unpaired_example, "rows", tokenizer, examples, max_length, max_prompt_length, raw
    )


def _encode_all(
    encode: Any,
    unit: str,
    tokenizer: Any,
    examples: Sequence[Row],
    max_length: int,
    max_prompt_length: int | None,
    raw: bool,
) -> list[dict[str, Any]]:
    """``encode(tokenizer, example, max_length, max_prompt_length, raw)`` over ``examples`` with a progress
    bar counting ``unit``, then one log line of how many were truncated."""
    encoded = [encode(tokenizer, ex, max_length, max_prompt_length, raw) for ex in _progress(examples, unit)]
    _log_truncations(sum(e["truncated"] for e in encoded), len(encoded), max_length)
    return encoded


def encode_sft_examples(
    tokenizer: Any, examples: Sequence[Row], max_length: int, raw: bool = False
) -> list[dict[str, Any]]:
    """:func:`encode_sft` over a dataset, logging how many examples were truncated."""
    encoded = [encode_sft(tokenizer, ex, max_length, raw) for ex in _progress(examples, "examples")]
    _log_truncations(sum(e["truncated"] for e in encoded), len(encoded), max_length)
    return encoded


def _progress(items: Sequence[Row], unit: str) -> Any:
    """A tokenising progress bar for datasets large enough to take more than a moment."""
    from tqdm.auto import tqdm

    return tqdm(items, desc="tokenising", unit=f" {unit}", disable=len(items) < 5000, leave=False)


def _log_truncations(n: int, total: int, max_length: int) -> None:
    if n:
        logger.warning("truncated %d of %d examples to max_length=%d", n, total, max_length)
