"""Bridge documents: the names a multi-hop question's best hits hold, searched with the question."""

from pathlib import Path

from dsarag.rag.bridge import BRIDGE_DOCUMENTS, named_in, titles_named_in, with_bridge_documents
from dsarag.rag.ingest import ingest_folder
from dsarag.rag.retrieve import Retriever
from dsarag.rag.store import ChunkStore

QUESTION = "Scott Buchholz was chief of staff to which senator, who later became Deputy Prime Minister?"
DOCS = {
    "scott.txt": "Scott Buchholz is an Australian politician. Before entering parliament he was chief of staff to "
    "senator Barnaby Joyce in Queensland.",
    "barnaby.txt": "Barnaby Joyce is an Australian politician who served as Deputy Prime Minister of Australia "
    "from February 2016.",
    # Distractors closer to the question's words than the bridge document is.
    "staff.txt": "A chief of staff runs the office of a senator: staff, diaries and the senator's correspondence.",
    "deputy.txt": "The Deputy Prime Minister of a country deputises for the prime minister; who later becomes one "
    "varies.",
    "senators.txt": "Senators for Queensland are elected for six years; a senator may later become a minister.",
}


def _retriever(tmp_path: Path, embedder, docs: dict[str, str]) -> Retriever:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in docs.items():
        (folder / name).write_text(text + "\n")
    store = ChunkStore(tmp_path / "store")
    ingest_folder(folder, store, embedder)
    return Retriever(store, embedder)


def test_names_the_question_does_not_hold_in_order():
    text = "The office of Barnaby Joyce moved. He met the Bank of England and Scott Buchholz in Canberra."
    assert named_in(text, QUESTION) == ["Barnaby Joyce", "Bank of England", "Canberra"]


def test_the_document_a_best_hit_names_joins_the_ranking(tmp_path: Path, embedder):
    retriever = _retriever(tmp_path, embedder, DOCS)
    k = 3
    ranking = retriever.semantic(QUESTION, k)
    assert "barnaby.txt" not in [hit.path for hit in ranking[: k - BRIDGE_DOCUMENTS]]
    merged, added = with_bridge_documents(QUESTION, ranking, retriever, k)
    assert ("Barnaby Joyce", "barnaby.txt") in [(name, hit.path) for name, hit in added]
    assert "barnaby.txt" in [hit.path for hit in merged[:k]]
    assert (
        merged[: k - BRIDGE_DOCUMENTS] == ranking[: k - BRIDGE_DOCUMENTS]
    )  # the best hits keep their places
    assert len({hit.chunk_id for hit in merged}) == len(merged)


def test_a_ranking_whose_hits_name_nothing_new_is_unchanged(tmp_path: Path, embedder):
    retriever = _retriever(
        tmp_path, embedder, {"kitchen.md": "the kitchen serves lunch at noon on weekdays."}
    )
    ranking = retriever.semantic("When is lunch?", 3)
    assert with_bridge_documents("When is lunch?", ranking, retriever, 3) == (ranking, [])


def test_documents_are_titled_by_heading_file_name_and_without_qualifier(tmp_path: Path, embedder):
    retriever = _retriever(
        tmp_path,
        embedder,
        {
            "Woman_s_Viewpoint_magazine.txt": "Woman's Viewpoint (magazine)\n\nA monthly published in Texas.",
            "rota.md": "# Kitchen rota\n\nLunch is served at noon.",
            "prose.txt": "This first line is a sentence, not a heading.\nMore text.",
            "C#_tips.md": "Prefer records for immutable data.",
        },
    )
    titled = retriever.documents_titled
    assert (
        titled["Woman's Viewpoint (magazine)"]
        == titled["Woman's Viewpoint"]
        == ["Woman_s_Viewpoint_magazine.txt"]
    )
    assert titled["Woman s Viewpoint magazine"] == ["Woman_s_Viewpoint_magazine.txt"]
    assert titled["Kitchen rota"] == titled["rota"] == ["rota.md"]
    assert not any(title.startswith("This first line") for title in titled)
    assert titled["C# tips"] == ["C#_tips.md"]  # a "#" in a plain file's name is not a corpus record


def test_the_longest_title_inside_a_name_the_question_lacks():
    titled = {
        "Barnaby Joyce": ["b.txt"],
        "Joyce": ["j.txt"],
        "Scott Buchholz": ["s.txt"],
        "Tamworth": ["t.txt"],
    }
    text = "Scott Buchholz was chief of staff to Senator Barnaby Joyce of Tamworth and met Joyce again."
    assert titles_named_in(text, QUESTION, titled) == ["Barnaby Joyce", "Tamworth", "Joyce"]


def test_a_hit_naming_another_documents_title_links_to_it(tmp_path: Path, embedder, monkeypatch):
    docs = dict(DOCS)
    del docs["barnaby.txt"]
    # Nothing in it resembles the question: only the link from the first document's "Barnaby Joyce" finds it.
    docs["Barnaby_Joyce.txt"] = (
        "Barnaby Joyce\n\nHe grew up on a sheep farm near Tamworth and studied at the University of New England."
    )
    retriever = _retriever(tmp_path, embedder, docs)
    k = 3
    ranking = retriever.semantic(QUESTION, k)
    monkeypatch.setattr(retriever, "semantic_many", lambda questions, k: [[] for _ in questions])
    assert "Barnaby_Joyce.txt" not in [hit.path for hit in ranking[: k - BRIDGE_DOCUMENTS]]
    merged, added = with_bridge_documents(QUESTION, ranking, retriever, k)
    assert [(name, hit.path) for name, hit in added] == [("Barnaby Joyce", "Barnaby_Joyce.txt")]
    assert "Barnaby_Joyce.txt" in [hit.path for hit in merged[:k]]
