"""A BM25 index over a local JSON Lines corpus of documents, built once and cached on disk next to the corpus.

    index = CorpusIndex("wiki.jsonl", fields={"title": "title", "text": "text"})
    hits = index.search("Which river flows through Lisbon?", k=7)   # document numbers, best first
    index.document(hits[0])                                          # Document(title, text)

Each corpus line is a JSON object with a title and a text (a string, or a list of sentences joined with
spaces), read through a field mapping; a bad line is a `DataError` naming the file and line. Scoring is
`bm25s` (Lucene BM25, k1 = 1.5, b = 0.75) over lower-cased word tokens of "title text" with English stop words
removed and no stemming. Documents that share no term with the query score 0 and are never returned, so a
query may retrieve fewer than k documents.

The cache (`<corpus>.bm25s/` unless `index_dir` says otherwise) holds the bm25s index, its vocabulary, each
document's byte offsets in the corpus (documents are read from the corpus when needed, so a large corpus is
never held in memory) and a fingerprint: the corpus's size and modification time, the field mapping, the
tokenizer settings and the bm25s version. A fingerprint that no longer matches rebuilds the index; the new
one is written to a temporary directory and renamed into place, so a crash never leaves a half-built cache.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fst_jax.tasks.io import DataError

log = logging.getLogger("fst_jax.tasks.bm25")
FORMAT_VERSION = 1
STOPWORDS = "en"
_CHUNK = 50_000  # documents tokenized at a time while building


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def _document(record: Any, where: str, fields: Mapping[str, str]) -> Document:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object with a title and a text")
    values = {}
    for name in ("title", "text"):
        key = fields.get(name, name)
        if key not in record:
            keys = ", ".join(map(repr, list(record)[:20])) or "none"
            raise DataError(f"{where}: missing field {key!r}; the record's keys are {keys}. Map it with "
                            f"corpus_fields={{{name!r}: '<key>'}}")
        value = record[key]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = " ".join(v.strip() for v in value)
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} should be a string (or a list of strings)")
        values[name] = value
    return Document(values["title"], values["text"])


class CorpusIndex:
    """BM25 over the documents of one JSONL corpus (module docstring). Safe to share between threads."""

    def __init__(self, corpus: str | os.PathLike, fields: Mapping[str, str] | None = None,
                 index_dir: str | os.PathLike | None = None):
        try:
            import bm25s  # noqa: F401
        except ImportError as e:
            raise ImportError("BM25 retrieval (the hover task) needs bm25s, which is not installed: "
                              "pip install 'fst_jax[hover]' (or pip install bm25s)") from e
        self.corpus = Path(os.path.expanduser(os.fspath(corpus)))
        if not self.corpus.is_file():
            raise DataError(f"corpus file not found: {self.corpus}")
        self.fields = dict(fields or {})
        unknown = sorted(set(self.fields) - {"title", "text"})
        if unknown:
            raise DataError(f"the corpus field mapping names {', '.join(map(repr, unknown))}; its fields are "
                            "'title' and 'text'")
        self.index_dir = Path(os.path.expanduser(os.fspath(index_dir))) if index_dir else \
            self.corpus.with_name(self.corpus.name + ".bm25s")
        self.rebuilt = False
        if self._load() is None:
            self._build()
            if self._load() is None:
                raise DataError(f"the BM25 index just built in {self.index_dir} does not load")
        self._fd = os.open(self.corpus, os.O_RDONLY)
        self.document = functools.lru_cache(maxsize=65_536)(self._read_document)
        self._search = functools.lru_cache(maxsize=65_536)(self._search_uncached)

    def __len__(self) -> int:
        return len(self.starts)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    # ---- the cache ------------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What the cached index depends on; any change rebuilds it."""
        import bm25s

        st = self.corpus.stat()
        return {"format": FORMAT_VERSION, "corpus_bytes": st.st_size, "corpus_mtime_ns": st.st_mtime_ns,
                "fields": {k: self.fields.get(k, k) for k in ("title", "text")}, "stopwords": STOPWORDS,
                "bm25s": bm25s.__version__}

    def _load(self) -> bool | None:
        import bm25s
        from bm25s.tokenization import Tokenizer

        meta_path = self.index_dir / "fingerprint.json"
        try:
            with open(meta_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if saved != self.fingerprint():
            log.info("the BM25 index in %s is stale (the corpus or settings changed); rebuilding", self.index_dir)
            return None
        self.retriever = bm25s.BM25.load(str(self.index_dir), mmap=False, show_progress=False, verbosity=0)
        self.tokenizer = Tokenizer(stopwords=STOPWORDS)
        self.tokenizer.load_vocab(str(self.index_dir))
        self.starts = np.load(self.index_dir / "starts.npy")
        self.ends = np.load(self.index_dir / "ends.npy")
        return True

    def _read_corpus(self):
        """(where, document, start byte) for each non-blank line of the corpus."""
        offset = 0
        with open(self.corpus, "rb") as f:
            for n, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                where = f"{self.corpus}, line {n}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                except ValueError as e:
                    raise DataError(f"{where}: invalid JSON: {e}") from None
                yield where, _document(record, where, self.fields), start, offset

    def _build(self) -> None:
        import bm25s
        from bm25s.tokenization import Tokenizer

        tokenizer = Tokenizer(stopwords=STOPWORDS)
        ids: list[list[int]] = []
        starts, ends, chunk = [], [], []

        def flush():
            ids.extend(tokenizer.tokenize(chunk, update_vocab=True, return_as="ids", show_progress=False))
            chunk.clear()

        for _, doc, start, end in self._read_corpus():
            starts.append(start)
            ends.append(end)
            chunk.append(f"{doc.title} {doc.text}")
            if len(chunk) >= _CHUNK:
                flush()
        flush()
        if not ids:
            raise DataError(f"{self.corpus}: the corpus holds no documents")
        retriever = bm25s.BM25()
        retriever.index((ids, tokenizer.get_vocab_dict()), show_progress=False)
        self.index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=self.index_dir.name + ".tmp-", dir=self.index_dir.parent))
        try:
            retriever.save(str(tmp), show_progress=False)
            tokenizer.save_vocab(str(tmp))
            np.save(tmp / "starts.npy", np.asarray(starts, dtype=np.int64))  # document i = bytes [start, end)
            np.save(tmp / "ends.npy", np.asarray(ends, dtype=np.int64))
            with open(tmp / "fingerprint.json", "w") as f:
                json.dump(self.fingerprint(), f)
            if self.index_dir.exists():
                if any(self.index_dir.iterdir()) and not (self.index_dir / "fingerprint.json").exists():
                    raise DataError(f"{self.index_dir} exists and is not a BM25 index this code wrote; "
                                    "refusing to replace it (choose another index_dir)")
                shutil.rmtree(self.index_dir)
            os.replace(tmp, self.index_dir)
        except (OSError, DataError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, DataError):
                raise
            if self._load() is None:  # another process may have just built the same index
                raise DataError(f"could not write the BM25 index to {self.index_dir}: {e} "
                                "(set the task's index_dir option to a writable directory)") from None
        self.rebuilt = True
        log.info("built the BM25 index of %s (%d documents) in %s", self.corpus, len(ids), self.index_dir)

    # ---- reading and searching ------------------------------------------------------------------------

    def _read_document(self, i: int) -> Document:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} is not in the corpus ({len(self)} documents)")
        start, end = int(self.starts[i]), int(self.ends[i])
        raw = os.pread(self._fd, end - start, start)
        where = f"{self.corpus}, byte {start}"
        try:
            return _document(json.loads(raw.decode("utf-8")), where, self.fields)
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{where}: the corpus changed after its BM25 index was built ({e}); "
                            "restart to rebuild the index") from None

    def _search_uncached(self, query: str, k: int) -> tuple[tuple[int, float], ...]:
        ids = self.tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)
        if not any(ids[0]):  # only unknown words or stop words: nothing matches
            return ()
        k = min(k, len(self))
        docs, scores = self.retriever.retrieve(ids, k=k, show_progress=False, n_threads=0)
        return tuple((int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0)

    def search_scored(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to `k` (document number, BM25 score) pairs for `query`, best first. Documents are numbered in
        corpus order from 0 (blank lines skipped)."""
        if not isinstance(query, str) or not query.strip() or k < 1:
            return []
        return list(self._search(query, int(k)))

    def search(self, query: str, k: int) -> list[int]:
        """Up to `k` document numbers for `query`, best first."""
        return [i for i, _ in self.search_scored(query, k)]

    def titles(self, hits: list[int]) -> list[str]:
        return [self.document(i).title for i in hits]
