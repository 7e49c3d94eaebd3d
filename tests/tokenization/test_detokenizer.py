"""IncrementalDetokenizer and StopStringMatcher on their own, with real tokenizers.

The byte-level tests use the default model's tokenizer (SmolLM2: one CJK character
or emoji is several tokens, each undecodable alone); the prompt-context tests use
the tiny model's word-level tokenizer, whose decode puts a space between tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.tokenization.detokenizer import IncrementalDetokenizer, StopStringMatcher

S = TypeVar("S", str, list[int])

MULTIBYTE = "Caf\u00e9 \U0001f642 and \u4e16\u754c, na\u00efve \u00fcber \U0001f30d!"


@pytest.fixture(scope="module")
def smol_tok(smollm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path)


@pytest.fixture(scope="module")
def tiny_tok(tiny_model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _stream(
    tok: Any, prompt: Sequence[int], chunks: Sequence[Sequence[int]]
) -> tuple[list[str], str]:
    """Deltas of one IncrementalDetokenizer fed chunk by chunk, and their concatenation."""
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(c) for c in chunks]
    return deltas, "".join(deltas)


def _split(seq: S, cuts: Sequence[int]) -> list[S]:
    """seq cut into consecutive pieces at the given offsets (mod its length + 1)."""
    bounds = [0, *sorted({c % (len(seq) + 1) for c in cuts}), len(seq)]
    return [seq[a:b] for a, b in itertools.pairwise(bounds)]


# --- IncrementalDetokenizer ---------------------------------------------------


@pytest.mark.smollm
def test_multibyte_characters_split_across_tokens_come_out_whole(smol_tok: Any) -> None:
    ids = smol_tok(MULTIBYTE)["input_ids"]
    assert any("\ufffd" in smol_tok.decode([i]) for i in ids), "no character spans tokens"
    deltas, text = _stream(smol_tok, smol_tok("Translate:")["input_ids"], [[i] for i in ids])
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token that ends mid-character releases nothing yet
    assert text == smol_tok.decode(ids) == MULTIBYTE


@given(
    text=st.text(
        alphabet=st.sampled_from("ab \n.\u00e9\u00fc\u4e16\u754c\u6587\U0001f642\U0001f30d"),
        min_size=1,
        max_size=30,
    ),
    prompt=st.text(alphabet=st.sampled_from("xy \u00e9\u4e16"), max_size=10),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@pytest.mark.smollm
def test_any_chunking_yields_whole_characters_and_the_full_decode(
    smol_tok: Any, text: str, prompt: str, cuts: list[int]
) -> None:
    ids = smol_tok(text)["input_ids"]
    deltas, got = _stream(smol_tok, smol_tok(prompt)["input_ids"], _split(ids, cuts))
    assert all("\ufffd" not in d for d in deltas)
    assert got == smol_tok.decode(ids)


def test_prompt_tail_gives_the_first_token_its_leading_space(tiny_tok: Any) -> None:
    prompt = tiny_tok("t5 t6 t7")["input_ids"]
    gen = tiny_tok("t8 t9")["input_ids"]
    assert _stream(tiny_tok, prompt, [[g] for g in gen])[0] == [" t8", " t9"]
    assert _stream(tiny_tok, [], [[g] for g in gen])[0] == ["t8", " t9"]


@given(
    prompt=st.lists(st.integers(3, 511), max_size=12),
    gen=st.lists(st.integers(3, 511), min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 50), max_size=5),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_prompt_then_deltas_decode_as_one_text(
    tiny_tok: Any, prompt: list[int], gen: list[int], cuts: list[int]
) -> None:
    _, got = _stream(tiny_tok, prompt, _split(gen, cuts))
    assert tiny_tok.decode(prompt) + got == tiny_tok.decode(prompt + gen)


def test_special_tokens_are_skipped_and_text_goes_on(tiny_tok: Any) -> None:
    eos = tiny_tok.eos_token_id
    deltas, text = _stream(tiny_tok, tiny_tok("t5")["input_ids"], [[6], [eos], [7]])
    assert deltas == [" t6", "", " t7"]
    assert text == " " + tiny_tok.decode([6, eos, 7], skip_special_tokens=True)


# --- StopStringMatcher --------------------------------------------------------


def test_stop_string_split_across_feeds() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello ST") == "hello"  # " ST" may begin "STOP": held back
    assert not m.stopped
    assert m.feed("OP world") == " "  # the text before the stop, never the stop
    assert m.stopped
    assert m.feed("more") == "" and m.flush() == ""


def test_held_tail_is_released_by_flush() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == "abc"
    assert m.flush() == " ST"
    assert not m.stopped and m.flush() == ""


def test_several_stop_strings_cut_at_the_first_found() -> None:
    m = StopStringMatcher(["\n\n", "END"])
    assert m.feed("a\n") == ""
    assert m.feed("b END c\n\n") == "a\nb "
    assert m.stopped
    both = StopStringMatcher(["END", "\n\n"])
    assert both.feed("x\n\ny END") == "x" and both.stopped


@pytest.mark.parametrize("stops", [[], [""]])
def test_no_stop_strings_pass_text_straight_through(stops: list[str]) -> None:
    m = StopStringMatcher(stops)
    assert m.feed("a") == "a" and m.feed("bc STOP") == "bc STOP"
    assert m.flush() == "" and not m.stopped


@given(
    text=st.text(alphabet="abc\n", max_size=40),
    stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_output_is_the_text_up_to_a_stop_string(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    m = StopStringMatcher(stops)
    out = "".join(m.feed(piece) for piece in _split(text, cuts))
    out += m.flush()
    assert text.startswith(out)
    assert not any(s in out for s in stops)
    assert m.stopped == any(s in text for s in stops)
    if m.stopped:
        assert any(text[len(out) :].startswith(s) for s in stops)
    else:
        assert out == text
