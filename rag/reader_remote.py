"""The constrained reader (rag/reader.py) over a served model, which cannot have its tokens restricted here.

Yes/no: one greedy token after the same prompt; " yes", " no" and " none" are compared on the first step's top
log-probabilities, as the local reader compares them, and the answerability score is the same log-odds. Span:
the short answer is generated freely, then must be found verbatim (case aside) in one source, which is cited;
an answer no source holds is declined, as the local reader could never have written it.
"""

from dsarag.rag.label_choice import listed_logprob
from dsarag.rag.pack import PackedContext
from dsarag.rag.reader import (
    DECLINE_MARGIN,
    NULL_ANSWER,
    REPLY_START,
    SPAN_MAX_TOKENS,
    SPAN_PROMPT,
    YES_NO_PROMPT,
    Reading,
    messages_for,
    missing_numbers,
    sentence_with,
    sources_naming,
)
from dsarag.rag.remote_generator import RemoteGenerator

_TRIM = " \t\"'.,;:!?()[]"
YES_NO_OPTIONS = (" yes", " no", NULL_ANSWER)


def read_served(
    mode: str,
    generator: RemoteGenerator,
    question: str,
    packed: PackedContext,
    attention: str,
    topk: int | None,
    compared: tuple[str, ...] = (),
) -> Reading:
    blocks = [(number, hit.text) for number, hit in enumerate(packed.sources, start=1)]
    if mode == "yes-no":
        return read_yes_no_served(generator, question, blocks, attention, topk, compared)
    return read_span_served(generator, question, blocks, attention, topk)


def option_logprob(top: dict[str, float], word: str, first_token: str | None) -> float:
    """The log-probability of the reply starting with `word`: its exact token where the served model's
    tokenizer is known here, else any listed token that is the word (case and spaces aside)."""
    return listed_logprob(top, first_token, lambda token: token.strip().lower() == word)


def read_yes_no_served(
    generator: RemoteGenerator,
    question: str,
    blocks: list[tuple[int, str]],
    attention: str,
    topk: int | None,
    compared: tuple[str, ...] = (),
) -> Reading:
    generation, top = generator.scored_reply(
        messages_for(YES_NO_PROMPT, question, blocks), 1, REPLY_START, attention, topk, YES_NO_OPTIONS
    )
    if top is None:  # no log-probabilities: the greedy word itself
        answer, score = generation.text.strip(_TRIM).lower(), None
    else:
        logprobs = {
            word: option_logprob(top, word, _reply_token(generator, " " + word))
            for word in ("yes", "no", NULL_ANSWER.strip())
        }
        answer = max(logprobs, key=logprobs.__getitem__)
        score = max(logprobs["yes"], logprobs["no"]) - logprobs[NULL_ANSWER.strip()]
    answerable = answer in ("yes", "no") and (score is None or score >= -DECLINE_MARGIN)
    if not answerable:
        return Reading("yes-no", "", False, score, generation=generation)
    return Reading("yes-no", answer, True, score, sources_naming(compared, blocks), generation=generation)


def read_span_served(
    generator: RemoteGenerator, question: str, blocks: list[tuple[int, str]], attention: str, topk: int | None
) -> Reading:
    generation, top = generator.scored_reply(
        messages_for(SPAN_PROMPT, question, blocks), SPAN_MAX_TOKENS, REPLY_START, attention, topk
    )
    lines = generation.text.strip().splitlines()
    answer = lines[0].strip(_TRIM) if lines else ""
    score = None
    if top is not None:
        null = option_logprob(top, NULL_ANSWER.strip(), _reply_token(generator, NULL_ANSWER))
        score = max(top.values()) - null
    features = {"score": score, "tokens": generation.new_tokens}
    declined = Reading("span", "", False, score, generation=generation, features=features)
    if not answer or answer.lower() == NULL_ANSWER.strip() or (score is not None and score < -DECLINE_MARGIN):
        return declined
    source = next((number for number, text in blocks if answer.lower() in text.lower()), None)
    if source is None:
        features["not_in_sources"] = answer
        return declined
    text = dict(blocks)[source]
    missing = missing_numbers(question, text)
    if missing:
        features["missing_numbers"] = missing
        return declined
    start = text.lower().find(answer.lower())
    quoted = text[start : start + len(answer)]  # the source's own spelling
    return Reading("span", quoted, True, score, (source,), sentence_with(text, quoted), generation, features)


def _reply_token(generator: RemoteGenerator, text: str) -> str | None:
    """The exact first token after "Answer:"; None (match by word) where the server would not continue it."""
    return generator.first_token_text(text) if generator.continues_replies else None
