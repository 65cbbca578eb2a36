"""Declining before reading: a question naming a number or a name that no packed source holds."""

from datetime import date

from dsarag.rag.pack import pack_sources
from dsarag.rag.reader import declined_for_missing_terms, missing_names
from dsarag.rag.retrieve import Hit


def hit(text: str, path: str) -> Hit:
    return Hit(1, path, text, 0, len(text), 1, 1, date(2024, 1, 1), 0.5)


def test_a_name_no_source_holds_is_missing_accents_and_plurals_aside():
    source = "Filming of Spectre began in England in December 2014. Frédéric Chopin's études are played."
    assert missing_names("When did filming start in Australia?", source) == ["Australia"]
    assert missing_names("When did filming start in England?", source) == []
    assert missing_names("Which études did Frederic Chopin write?", source) == []  # é and ’s folded
    # The first word and a question's capitalized grammar are not names it asks about.
    assert missing_names("Spectre: When and Where did filming start?", "filming began") == []
    assert missing_names("Did the Beatles play in Hamburg?", "The Beatle played in Hamburg.") == []
    assert (
        missing_names("How much rain does NYC get?", "New York City gets 50 inches of rain.") == []
    )  # acronyms


def test_the_refusal_names_what_the_sources_do_not_mention():
    packed = pack_sources(
        [hit("Filming of Spectre began in England in December 2014.", "spectre.md")], lambda text: 12, 400
    )
    reading = declined_for_missing_terms("When did filming start in Australia in 2014?", packed)
    assert reading is not None and not reading.answerable
    assert reading.features == {"missing_names": ["Australia"]}
    assert reading.reply(packed).startswith(
        "The documents do not contain the answer (none of them mentions Australia)"
    )
    assert declined_for_missing_terms("When did filming start in England?", packed) is None
    missing_year = declined_for_missing_terms("When did filming start in England in 2004?", packed)
    assert missing_year.features == {"missing_numbers": ["2004"]}
    decade = "Was Spectre filmed in England in the 70's?"
    assert declined_for_missing_terms(decade, packed) is None
