"""The default model end to end on the demo corpus: ingest, retrieve, answer with the gold string, cite the file."""

import pytest

from dsarag.corpora.demo_corpus import DEMO_DOCS, load_demo_qa
from dsarag.rag.ask import AskOptions, ask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    return tmp_path_factory.mktemp("demo") / "store"


@pytest.mark.parametrize("qa", [qa for qa in load_demo_qa() if qa.get("smoke")], ids=lambda qa: qa["id"])
def test_default_model_answers_demo_questions_and_cites_the_source(qa, demo_store):
    result = ask(AskOptions(question=qa["question"], store=demo_store, docs=DEMO_DOCS, max_new_tokens=48))
    assert qa["answer"].lower() in result.answer.lower()
    source = qa["source"].removeprefix("docs/")
    assert source in [cited["path"] for cited in result.sources[:3]]
    assert result.model == "qwen2.5-coder-0.5b-instruct"
