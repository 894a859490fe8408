"""HoVer: BM25 retrieval on a 50-document fixture corpus (against a hand-written BM25), the on-disk index cache,
query extraction, the all-titles reward and its feedback, HoVer's JSON array format, filters and errors."""

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from fst_jax.tasks import DataError, HoverTask, extract_query, get_task, load_problems
from fst_jax.tasks.bm25 import CorpusIndex
from fst_jax.tasks.hover import normalize_title

DATA = Path(__file__).parent / "data"
FIELDS = {"id": "uid"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A private copy of the fixture corpus (the index is cached next to it)."""
    path = tmp_path_factory.mktemp("hover") / "corpus.jsonl"
    shutil.copy(DATA / "hover_corpus.jsonl", path)
    return path


@pytest.fixture(scope="module")
def task(corpus):
    return get_task("hover", corpus=str(corpus))


@pytest.fixture(scope="module")
def problems(task):
    return {p["id"]: p for p in load_problems(DATA / "hover_small.json", task, FIELDS)}


def reference_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene BM25 by hand: idf = ln(1 + (N - df + 0.5)/(df + 0.5)), tf part tf/(tf + k1(1 - b + b·dl/avgdl)),
    on lower-cased \\w\\w+ tokens without bm25s's English stop words. Scores of every document."""
    from bm25s.stopwords import STOPWORDS_EN

    def tokens(s):
        return [t for t in re.findall(r"(?u)\b\w\w+\b", s.lower()) if t not in set(STOPWORDS_EN)]

    toks = [tokens(d) for d in docs]
    n, avgdl = len(docs), sum(map(len, toks)) / len(docs)
    df = Counter(t for d in toks for t in set(d))
    scores = []
    for d in toks:
        tf, s = Counter(d), 0.0
        for t in set(tokens(query)):
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
        scores.append(s)
    return scores


QUERIES = ["Vera Fenn painter", "Glass Heron opera premiere", "capital of Orlania", "football club Karsk",
           "Lake Oster herons", "architect of Dunmore Stadium", "village known for glass blowing", "1998 final"]


@pytest.mark.parametrize("query", QUERIES)
def test_bm25_rankings_match_a_hand_written_bm25(task, corpus, query):
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(docs) == 50
    scores = reference_bm25([f"{d['title']} {d['text']}" for d in docs], query)
    expected = sorted((s for s in scores if s > 0), reverse=True)[:10]
    got = task.index.search_scored(query, 10)
    assert [s for _, s in got] == pytest.approx(expected, rel=1e-5)      # the same scores, best first ...
    assert all(scores[i] == pytest.approx(s, rel=1e-5) for i, s in got)   # ... of the same documents


def test_known_rankings(task):
    titles = lambda q, k: task.index.titles(task.index.search(q, k))  # noqa: E731
    assert titles("Vera Fenn painter", 2) == ["Vera Fenn", "Odo Fenn"]
    assert titles("capital of Orlania", 3)[:2] == ["Orlania", "Karsk"]
    assert titles("glass blowing", 1) == ["Glass Blowing in Tarvel"]
    assert titles("the of and", 5) == [] and titles("zyzzyva", 5) == []   # stop words / unknown words: no hits
    assert len(titles("Tarvel", 100)) == 20                                 # fewer than k when fewer match


def test_index_is_cached_and_rebuilt_when_the_corpus_changes(corpus, tmp_path):
    path = tmp_path / "c.jsonl"
    shutil.copy(corpus, path)
    first = CorpusIndex(path)
    assert first.rebuilt and (tmp_path / "c.jsonl.bm25s" / "fingerprint.json").is_file()
    again = CorpusIndex(path)
    assert not again.rebuilt and again.search("Vera Fenn", 1) == first.search("Vera Fenn", 1)
    with open(path, "a") as f:
        f.write(json.dumps({"title": "Zorbel Quintz", "text": "Zorbel Quintz is a painter of herons."}) + "\n")
    changed = CorpusIndex(path)
    assert changed.rebuilt and len(changed) == 51
    assert changed.titles(changed.search("Zorbel", 3)) == ["Zorbel Quintz"]
    elsewhere = CorpusIndex(path, index_dir=tmp_path / "idx")                # the index_dir option
    assert elsewhere.rebuilt and (tmp_path / "idx" / "fingerprint.json").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="precious exists and is not a BM25 index this code wrote"):
        CorpusIndex(path, index_dir=precious)                                 # never deletes what it did not write
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(tmp_path.glob("precious.tmp-*"))) == 0


def test_corpus_errors_name_file_and_line(tmp_path):
    with pytest.raises(DataError, match="corpus file not found"):
        CorpusIndex(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "A", "text": "a"}) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: invalid JSON"):
        CorpusIndex(bad)
    bad.write_text(json.dumps({"title": "A", "text": "a"}) + "\n" + json.dumps({"name": "B", "text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: missing field 'title'.*corpus_fields"):
        CorpusIndex(bad)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"name": "B", "sentences": ["Bee one.", "Bee two."]}) + "\n")
    index = CorpusIndex(renamed, fields={"title": "name", "text": "sentences"})
    assert index.document(0).title == "B" and index.document(0).text == "Bee one. Bee two."
    with pytest.raises(DataError, match="the corpus field mapping names 'body'"):
        CorpusIndex(renamed, fields={"body": "text"})
    with pytest.raises(ValueError, match="the corpus option is empty"):
        get_task("hover")


@pytest.mark.parametrize("completion, query", [
    ("### query: Vera Fenn painter", "Vera Fenn painter"),
    ("thinking...\n### Query:  Vera Fenn  \n", "Vera Fenn"),
    ("# query: first\n### query: second\n### query: third", "third"),       # a repeated line: the last counts
    ("### query: Vera\n### query: Vera\n### query: Vera", "Vera"),
    ("### query: \"Lake Oster painter\"", "Lake Oster painter"),
    ("query: no hashes", None), ("### query:", None), ("", None), ("### query:   ", None),
    ("<think>### query: hidden</think>\n### query: shown", "shown"),
    ("<think>### query: never closed", None),
    ("x" * 100_000 + "\n### query: late", "late"),
])
def test_extract_query(completion, query):
    assert extract_query(completion) == query


def test_problems_load_from_the_json_array(problems):
    assert list(problems) == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert problems["c3"]["num_hops"] == 4 and problems["c3"]["supporting_facts"][0] == ["The Glass Heron", 0]


def test_reward_all_titles_and_feedback(task, problems):
    c3 = problems["c3"]          # hop 1 finds The Glass Heron, Odo Fenn, Veld river; Vera Fenn needs hop 2
    prompt = task.format_problem(c3)
    assert prompt.startswith("Claim: The librettist of The Glass Heron")
    assert len(re.findall(r"^\[\d\] «", prompt, re.MULTILINE)) == 7 and "«Vera Fenn»" not in prompt
    good = task.score(c3, "The painter is missing.\n### query: Vera Fenn painter Lake Oster")
    assert (good.reward, good.extracted) == (1.0, "Vera Fenn painter Lake Oster")
    assert "Found: The Glass Heron (hop 1), Odo Fenn (hop 1), Vera Fenn (hop 2), Veld river (hop 1). Missed: none." \
        in good.feedback
    bad = task.score(c3, "### query: football stadium")
    assert bad.reward == 0.0
    assert bad.feedback.startswith("Incomplete: 3 of 4 supporting documents were retrieved.")
    assert "Missed: Vera Fenn." in bad.feedback and "The query 'football stadium' retrieved: " in bad.feedback
    none = task.score(c3, "I am not sure.")
    assert none.reward == 0.0 and "No query was read" in none.feedback and none.extracted is None
    r = task.retrieve(c3, "### query: football stadium")
    assert r.fraction == 0.75 and r.missed == ("Vera Fenn",) and len(r.hop1) == 7 and len(r.hop2) <= 10
    assert get_task("hover", corpus=task.corpus, reward="fraction").score(c3, "### query: football").reward == 0.75


def test_adversarial_completions(task, problems):
    c3 = problems["c3"]
    assert task.score(c3, "### query: Vera Fenn\n### query: football").reward == 0.0   # only the last line counts
    assert task.score(c3, "### query: football\n### query: Vera Fenn").reward == 1.0
    huge = task.score(c3, "### query: " + "Vera Fenn " * 10_000)                      # a 100 kB query line
    assert huge.reward == 1.0 and len(huge.extracted) == task.max_query_chars
    assert task.score(c3, "### query: \\boxed{Vera Fenn}").reward == 1.0              # punctuation is not a term
    assert task.score(c3, "### query: ＶＥＲＡ").reward == 0.0                             # no such term in the corpus


def test_titles_compare_normalised(task, problems):
    assert normalize_title("Lake_Oster ") == normalize_title("lake  oster") == "lake oster"
    odd = dict(problems["c3"], supporting_facts=[["VERA_FENN", 0], ["the glass heron", 1]])
    assert task.score(odd, "### query: Vera Fenn painter").reward == 1.0
    titles_only = dict(problems["c3"], supporting_facts=["Vera Fenn"])
    assert task.score(titles_only, "### query: Vera Fenn").reward == 1.0


def test_hard_filter_keeps_claims_of_three_or_more_hops(task):
    hard = get_task("hover", corpus=task.corpus, min_hops=3)
    kept = load_problems(DATA / "hover_small.json", hard, FIELDS)
    assert [p["id"] for p in kept] == ["c2", "c3", "c4", "c6"]


def test_loader_errors(task, tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_problems(tmp_path / "hover_dev.json", task)
    lines = (DATA / "hover_small.json").read_text().splitlines()
    broken = tmp_path / "broken.json"
    broken.write_text("\n".join(lines[:3] + ['{"uid": "x", "claim": "c", "supporting_facts": [["A", 0]],'] + lines[4:]))
    with pytest.raises(DataError, match=r"broken.json, line 4 \(element 3\): invalid JSON"):
        load_problems(broken, task, FIELDS)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"uid": "a", "claim": "c", "supporting_facts": []}]))
    with pytest.raises(DataError, match=r"facts.json, line 1 \(element 1\): 'supporting_facts' must be a non-empty"):
        load_problems(facts, task, FIELDS)
    with pytest.raises(DataError, match=r"hover_small.json, line 2 \(element 1\): missing field 'statement' "
                                        r"\(mapped to 'claim'\)"):
        load_problems(DATA / "hover_small.json", task, {"claim": "statement"})
    with pytest.raises(DataError, match="names 'evidence', which task 'hover' does not use"):
        load_problems(DATA / "hover_small.json", task, {"evidence": "supporting_facts"})
    two_hops = tmp_path / "two.json"
    two_hops.write_text(json.dumps([{"uid": "a", "claim": "c", "supporting_facts": [["A", 0]], "num_hops": 2}]))
    with pytest.raises(DataError, match="filter dropped all 1 problems .*min_hops=3"):
        load_problems(two_hops, get_task("hover", corpus=task.corpus, min_hops=3), FIELDS)
    no_hops = tmp_path / "nohops.jsonl"
    no_hops.write_text(json.dumps({"claim": "c", "supporting_facts": [["A", 0]]}) + "\n")
    with pytest.raises(DataError, match="nohops.jsonl, line 1: the record has no 'num_hops'"):
        load_problems(no_hops, get_task("hover", corpus=task.corpus, min_hops=3))
    assert len(load_problems(no_hops, task)) == 1                           # JSON Lines work too
    no_comma = tmp_path / "nocomma.json"
    no_comma.write_text('[{"claim": "c", "supporting_facts": ["A"]}\n {"claim": "d", "supporting_facts": ["B"]}]')
    with pytest.raises(DataError, match=r"nocomma.json, line 2: expected ',' or '\]' after element 1"):
        load_problems(no_comma, task)
    (tmp_path / "empty.json").write_text(" [ ] ")
    with pytest.raises(DataError, match="empty.json: contains no problems"):
        load_problems(tmp_path / "empty.json", task)
