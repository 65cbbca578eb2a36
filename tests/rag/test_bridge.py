"""Bridge documents: the names a multi-hop question's best hits hold, searched with the question."""

from pathlib import Path

from dsarag.rag.bridge import BRIDGE_DOCUMENTS, named_in, with_bridge_documents
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


def test_names_the_question_does_not_hold_in_order():
    text = "The office of Barnaby Joyce moved. He met the Bank of England and Scott Buchholz in Canberra."
    assert named_in(text, QUESTION) == ["Barnaby Joyce", "Bank of England", "Canberra"]


def test_the_document_a_best_hit_names_joins_the_ranking(tmp_path: Path, embedder):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text + "\n")
    store = ChunkStore(tmp_path / "store")
    ingest_folder(folder, store, embedder)
    retriever = Retriever(store, embedder)
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
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "kitchen.md").write_text("the kitchen serves lunch at noon on weekdays.\n")
    store = ChunkStore(tmp_path / "store")
    ingest_folder(folder, store, embedder)
    retriever = Retriever(store, embedder)
    ranking = retriever.semantic("When is lunch?", 3)
    assert with_bridge_documents("When is lunch?", ranking, retriever, 3) == (ranking, [])
