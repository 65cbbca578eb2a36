"""Multi-key needle in a haystack: needle placement, prompt length, shared prefix, exact-value scoring."""

import numpy as np
import pytest

from dsarag.evals.niah import SNAP_TOKENS, NiahCase, build_case, extract_value, is_correct, needle_sentence

NEWLINE = ord("\n")


class CharTokenizer:
    """One id per character: lengths and positions are easy to reason about."""

    def encode(self, text: str) -> list[int]:
        return [ord(char) for char in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")


def filler_text(lines: int = 400, width: int = 30) -> list[int]:
    """`lines` lines of `width` letters, each ending with a newline."""
    return [token for line in range(lines) for token in [ord("a") + line % 26] * width + [NEWLINE]]


def make_case(length: int = 4000, depths: tuple[float, ...] = (0.1, 0.5, 0.9), seed: int = 0) -> NiahCase:
    return build_case(CharTokenizer(), filler_text(), length, depths, np.random.default_rng(seed), {NEWLINE})


def test_needles_sit_at_the_requested_depths():
    case = make_case()
    tolerance = (SNAP_TOKENS + sum(len(needle.sentence) + 1 for needle in case.needles)) / case.haystack_len
    for needle in case.needles:
        assert abs(needle.position / case.haystack_len - needle.depth) <= tolerance


def test_each_needle_is_in_the_prompt_where_its_position_says():
    case = make_case()
    tokenizer = CharTokenizer()
    haystack = case.prefix_ids[case.haystack_start : case.haystack_start + case.haystack_len]
    for needle in case.needles:
        ids = tokenizer.encode(needle.sentence)
        assert haystack[needle.position : needle.position + len(ids)] == ids


def test_needles_start_a_line_when_a_line_break_is_near():
    case = make_case()
    haystack = case.prefix_ids[case.haystack_start :]
    assert all(haystack[needle.position - 1] == NEWLINE for needle in case.needles)


@pytest.mark.parametrize("length", [600, 1500, 4000])
def test_the_longest_prompt_is_exactly_the_requested_length(length):
    case = make_case(length)
    lengths = [len(case.prompt_ids(i)) for i in range(len(case.needles))]
    assert max(lengths) == length == case.length
    assert all(n <= length for n in lengths)


def test_every_question_shares_the_haystack_prefix_and_asks_for_its_own_key_in_the_assistant_turn():
    case = make_case()
    tokenizer = CharTokenizer()
    for index, needle in enumerate(case.needles):
        prompt = tokenizer.decode(case.prompt_ids(index))
        assert prompt.startswith(tokenizer.decode(case.prefix_ids))
        assert f"What is the pass key for {needle.name}?" in tokenizer.decode(case.question_ids[index])
        assert prompt.endswith(f"</user><assistant>The pass key for {needle.name} is")


def test_keys_and_values_are_distinct_and_five_digits():
    case = make_case(depths=(0.1, 0.3, 0.5, 0.7, 0.9))
    assert len({n.name for n in case.needles}) == len({n.value for n in case.needles}) == 5
    assert all(len(n.value) == 5 and n.value.isdigit() for n in case.needles)


def test_a_length_too_short_for_the_template_is_refused():
    with pytest.raises(ValueError, match="no room"):
        make_case(length=100)


def test_a_case_survives_a_json_round_trip():
    case = make_case()
    assert NiahCase.from_json(case.to_json()) == case


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        ("48213", True),
        ("The pass key for Alice Moreau is 48213.", True),
        ("48,213", True),
        (" 48213\n", True),
        ("4821", False),
        ("482134", False),
        ("12345, or maybe 48213", False),
        ("I don't know.", False),
        ("", False),
    ],
)
def test_an_answer_is_correct_only_when_its_first_number_is_the_value(answer, correct):
    assert is_correct(answer, "48213") is correct


def test_extract_value_reads_the_first_number():
    assert extract_value("key: 00417 then 5") == "00417"
    assert extract_value("none") is None


def test_with_the_tiny_models_tokenizer_the_prompt_reads_as_a_chat_with_the_needles():
    from dsarag.indexer_model.resolve import resolve_model
    from dsarag.indexer_model.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer(resolve_model("tiny"))
    filler = tokenizer.encode("Python's release notes, line after line.\n" * 300)
    case = build_case(tokenizer, filler, 1024, (0.1, 0.5, 0.9), np.random.default_rng(1))
    prompt = tokenizer.decode(case.prompt_ids(1))
    assert len(case.prompt_ids(1)) <= 1024
    assert all(needle_sentence(n.name, n.value) in prompt for n in case.needles)
    assert prompt.endswith(f"assistant\nThe pass key for {case.needles[1].name} is")
