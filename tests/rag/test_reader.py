"""The reader: question modes, the copy constraint, answers copied from a source with a verified citation,
declining what the sources do not state, verified vs unverifiable citations, and the routing of comparison
questions and of years inside names."""

from datetime import date

import pytest
import torch

from dsarag.rag.agent import AgentContext, run_agent
from dsarag.rag.ask import AskOptions
from dsarag.rag.grounding import cited_by_model
from dsarag.rag.pack import pack_sources
from dsarag.rag.query_features import query_features
from dsarag.rag.reader import (
    CopyConstraint,
    declined_for_missing_terms,
    missing_names,
    missing_numbers,
    read,
    reading_mode,
    sentence_with,
    spelled_like,
)
from dsarag.rag.retrieve import Hit
from dsarag.rag.route import choose_strategy, label_scores


@pytest.fixture(scope="module")
def tiny():
    from dsarag.indexer_model.generate import load_generator

    return load_generator("tiny")


def hit(text: str, path: str = "a.md", chunk_id: int = 1) -> Hit:
    return Hit(chunk_id, path, text, 0, len(text), 1, 2, date(2024, 1, 1), 0.5)


@pytest.mark.parametrize(
    ("question", "mode"),
    [
        ("Who is the privacy officer?", "span"),
        ("How many yellow cabs operate in New York?", "span"),
        ("Which magazine was started first, Arthur's or First for Women?", "span"),
        ("Are Marian Gold and Jung Eun-ji members of the same band?", "yes-no"),
        ("Is the deposit refundable?", "yes-no"),
        ("Is the cap $600 or $900?", "span"),  # its alternatives are the answers
        ("Why did the board change the cap?", "free"),
        ("Summarize the remote work policy.", "free"),
        ("How does the ingest pipeline work?", "free"),
    ],
)
def test_reading_mode_follows_the_question_form(question, mode):
    assert reading_mode(question, "span") == mode
    assert reading_mode(question, "auto") == ("yes-no" if mode == "yes-no" else "free")
    assert reading_mode(question, "free") == "free"


def test_copy_constraint_allows_only_continuations_of_a_source_span():
    sequences = [[5, 6, 7], [6, 9]]
    constraint = CopyConstraint(sequences, stop_ids={0}, max_tokens=3)
    logits = torch.zeros(10)
    first = constraint([], logits)
    assert sorted(torch.isfinite(first).nonzero().flatten().tolist()) == [
        5,
        6,
        7,
        9,
    ]  # no stop before a token
    after_six = constraint([6], logits)
    assert sorted(torch.isfinite(after_six).nonzero().flatten().tolist()) == [0, 7, 9]  # 6→7, 6→9, or stop
    constraint([6, 9], logits)
    assert constraint.matched_sequences(2) == [1]  # "6 9" is a span of the second sequence only
    assert len(constraint.token_logprobs) == 2 and constraint.first_logprobs is not None
    capped = CopyConstraint(sequences, stop_ids={0}, max_tokens=1)
    capped([], logits)
    assert torch.isfinite(capped([5], logits)).nonzero().flatten().tolist() == [0]  # at the cap: only stop


def test_the_quote_is_the_sentence_holding_the_answer():
    text = "The fund opened in 2019. Its chair is Ines Marchetti, elected in May. Meetings are monthly."
    assert sentence_with(text, "Ines Marchetti") == "Its chair is Ines Marchetti, elected in May."
    assert sentence_with(text, "Greta Novak") == ""


def test_a_number_the_source_does_not_hold_means_the_source_answers_another_question():
    source = "In November 2014, Sony Pictures Entertainment was targeted by hackers."
    assert missing_numbers("Which company was targeted by hackers in November 2004?", source) == ["2004"]
    assert missing_numbers("Which company was targeted by hackers in November 2014?", source) == []
    assert missing_numbers("How many cabs are there?", "about 12,000 cabs") == []


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


def test_the_refusal_names_a_sources_word_one_typing_slip_from_a_missing_name():
    packed = pack_sources(
        [hit("They Flew Alone is a 1942 British biopic of the aviator Amy Johnson.", "flew.md")],
        lambda text: 12,
        400,
    )
    reading = declined_for_missing_terms(
        "What was Amy Johnson, of the Brittish biopic, by profession?", packed
    )
    assert reading.features == {"missing_names": ["Brittish"], "spelled_like": {"Brittish": "British"}}
    assert reading.reply(packed).startswith(
        "The documents do not contain the answer (none of them mentions Brittish; they mention British)"
    )
    for slip, meant in (
        ("Brtish", "British"),
        ("Britisch", "British"),
        ("Birtish", "British"),
        ("Jonhson", "Johnson"),
    ):
        assert spelled_like(slip, packed.text) == meant
    assert spelled_like("Austria", "Australia and Austrians") is None  # two letters apart: another name
    assert spelled_like("Roston", "Boston harbour") is None  # the first letter differs


def test_a_factoid_answer_is_a_span_of_the_source_it_cites(tiny):
    sources = [
        hit("The privacy officer of the cooperative is Hanne Quist-Molina, the board secretary.", "team.md"),
        hit("The bakery opens at seven and closes at noon on Sundays.", "bakery.md", 2),
    ]
    packed = pack_sources(sources, tiny.count_tokens, 400)
    reading = read("span", tiny, "Who is the privacy officer of the cooperative?", packed, "dense", None)
    if reading.answerable:
        (source,) = reading.sources
        source_text = packed.sources[source - 1].text
        assert reading.answer and reading.answer in source_text  # copied, whatever the model chose
        assert reading.quote and reading.answer in reading.quote
        assert reading.reply(packed).startswith(f"{reading.answer} [{source}]")
    else:
        assert reading.reply(packed).startswith("The documents do not contain the answer")


def test_a_question_the_documents_cannot_answer_is_declined_with_the_closest_sources(tiny):
    sources = [hit("In November 2014, Sony Pictures Entertainment was targeted by hackers.", "sony.md")]
    packed = pack_sources(sources, tiny.count_tokens, 400)
    reading = read(
        "span", tiny, "Which company was targeted by hackers in November 2004?", packed, "dense", None
    )
    assert not reading.answerable and reading.answer == ""
    assert (
        reading.reply(packed) == "The documents do not contain the answer. Closest sources: [1] sony.md:1-2."
    )


def test_the_agent_declines_and_says_so_in_its_state(embedder, tmp_path, tiny):
    from dsarag.rag.ingest import ingest_folder
    from dsarag.rag.retrieve import Retriever
    from dsarag.rag.store import ChunkStore

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "sony.md").write_text("In November 2014, Sony Pictures Entertainment was targeted by hackers.\n")
    ingest_folder(docs, ChunkStore(tmp_path / "store"), embedder)
    retriever = Retriever(ChunkStore(tmp_path / "store"), embedder)
    question = "Which company was targeted by hackers in November 2004?"
    options = AskOptions(question=question, store=tmp_path / "store", strategy="semantic", chunks=2)
    state = run_agent(question, AgentContext(options, retriever, tiny))
    assert state["reading"] is not None and not state["reading"].answerable
    assert state["generation"].text.startswith("The documents do not contain the answer")
    checks = [entry for entry in state["trace"] if entry["node"] == "check"]
    assert len(checks) == 2 and checks[-1]["retry"].startswith("no:")  # retried once, then declined
    generate = next(entry for entry in state["trace"] if entry["node"] == "generate")
    assert generate["reading"]["features"] == {"missing_numbers": ["2004"]}
    assert state["generation"].new_tokens == 0  # declined before generating


def test_a_citation_is_verified_only_where_its_source_holds_the_answer():
    sources = ["Treasurer from July 2024: Tobias Achterberg.", "The bakery opens at seven."]
    assert cited_by_model("Tobias Achterberg [1].", sources) == [
        {"source": 1, "by": "model", "verified": True}
    ]
    assert cited_by_model("Tobias Achterberg [2].", sources) == [
        {"source": 2, "by": "model", "verified": False}
    ]
    assert cited_by_model("Tobias Achterberg [7].", sources)[0]["verified"] is False  # no such source


@pytest.mark.parametrize(
    ("question", "sides"),
    [
        ("Were Scott Derrickson and Ed Wood of the same nationality?", ("Scott Derrickson", "Ed Wood")),
        ("Between Iain Banks and Irwin Shaw, which writer wrote more?", ("Iain Banks", "Irwin Shaw")),
        ("Which magazine started first, Arthur's Magazine or First for Women?", ("Arthur's Magazine", "First for Women")),
        ("Which band was formed first The Exies or Circus Diablo ?", ("The Exies", "Circus Diablo")),
        ("Which plant is larger, the Pterocarya or the Cotula?", ("Pterocarya", "Cotula")),
        ("What do E. B. White and Dan Masterson have in common?", ("E. B. White", "Dan Masterson")),
    ],
)  # fmt: skip
def test_a_comparison_names_both_sides(question, sides):
    assert query_features(question).compared == sides


def test_a_comparison_goes_to_multi_query_and_a_plain_question_names_no_sides(tiny):
    assert query_features("Were Scott Derrickson and Ed Wood of the same nationality?").comparison
    assert query_features("Which city hosted the 2008 Olympics?").compared == ()
    question = "Are Marian Gold and Jung Eun-ji members of the same band?"
    strategy = choose_strategy(
        query_features(question), label_scores(question, tiny, ("strategy",))["strategy"]
    )
    assert strategy.choice == "multi-query"


@pytest.mark.parametrize(
    "question",
    [
        "What position did the receiver of the 2007 FIFA U-20 Golden Shoe play?",
        "Which 1988 Telugu comedy had music composed by Chakravarthy?",
        "Who starred in Kiss and Tell (1945 film)?",
        'What songs are on the album "Live 1975"?',
    ],
)
def test_a_year_inside_a_name_or_title_opens_no_time_window(question):
    assert query_features(question).window is None


def test_a_year_asked_about_still_opens_a_time_window():
    assert query_features("Who was the treasurer of the cooperative in 2023?").window is not None
    assert query_features("Who leads the project as of 2025?").window is not None


def test_a_yes_or_no_cites_the_source_naming_each_compared_side(tiny):
    sources = [
        hit("The bakery opens at seven.", "bakery.md", 1),
        hit("Scott Derrickson is an American director.", "derrickson.md", 2),
        hit("Ed Wood was an American filmmaker.", "wood.md", 3),
    ]
    packed = pack_sources(sources, tiny.count_tokens, 400)
    question = "Were Scott Derrickson and Ed Wood of the same nationality?"
    compared = query_features(question).compared
    reading = read("yes-no", tiny, question, packed, "dense", None, compared)
    if reading.answerable:
        numbers = {n for n, hit_ in enumerate(packed.sources, start=1) if "bakery" not in hit_.path}
        assert set(reading.sources) == numbers  # each side's page, not the unrelated one
        assert reading.reply(packed) == f"{reading.answer.capitalize()}. " + " ".join(
            f"[{n}]" for n in reading.sources
        )


def test_sources_naming_picks_the_best_ranked_source_of_each_side():
    from dsarag.rag.reader import sources_naming

    blocks = [(1, "Ed Wood directed films."), (2, "Scott Derrickson, director."), (3, "Ed Wood again.")]
    assert sources_naming(("Scott Derrickson", "Ed Wood"), blocks) == (1, 2)
    assert sources_naming(("Nobody",), blocks) == ()
