"""A synthetic knowledge corpus: fictional people, their facts as paraphrased biographies, and QA files.

    python -m pkmlm.data.facts --people 4000 --seed 0 --out data/facts_src [--mix bbc_news:0.5]
    python -m pkmlm.data.prepare --input data/facts_src/text --split-documents blank-line \\
        --valid 0.01 --test 0.01 --out data/facts

After the knowledge-capacity studies of Allen-Zhu & Li ("Physics of Language Models 3.1/3.3", 2024): each
person has six attributes drawn uniformly from fixed lists (birth date, birth city, university, field,
employer, company city), written as ``--bios`` biographies per person, each its six sentences in a random
order, each sentence from one of four paraphrases. Questions use templates that never occur in the
biographies. The people are split in two: the QA pairs of one part go to ``qa_train.jsonl`` and (unless
``--no-qa-text``) into the training text, so that a model learns the question format; the other part's
pairs are ``qa_test.jsonl``, facts that the model saw only in biographies (the QA "out of distribution"
split of Allen-Zhu & Li 3.1).

``--qa-repeats R`` (R > 1) writes the qa_train pairs R times instead, each time in a new seeded order across
people, six pairs to a document: every pair then occurs in R different contexts and window positions. A
model trained on fixed windows of the stream (pkmlm.data.stream) otherwise learns each pair as the
continuation of the text that always precedes it there (the person's other answers), and cannot answer it
when asked alone (measured in docs/quality.md, "Knowledge"); the repeats are the QA counterpart of the
shuffled, paraphrased ``--bios``.

Written under OUT:
    text/people.txt      biographies, documents separated by blank lines
    text/qa_train.txt    the qa_train pairs as text, one document per person (not with --no-qa-text;
                         with --qa-repeats R > 1: R shuffled passes, six pairs a document)
    text/bbc_news.txt    general text mixed in with --mix bbc_news:R (R: its share of the text's characters)
    qa_train.jsonl, qa_test.jsonl   {"prompt", "question", "answer", "person", "attribute"} per line
    people.jsonl         every person's attributes
    facts.json           the settings, counts, and the entropy of each attribute (bits of knowledge)

Person i depends only on (seed, i): ``--first K`` gives people K .. K+N-1, so two calls with disjoint
ranges give two disjoint sets of the same population (bench/continual.py teaches set B after set A).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from pkmlm.cli import run
from pkmlm.data import DataError
from pkmlm.data.corpora import CORPORA
from pkmlm.fileio import write_text_atomic

FIRST_A = ["Al", "Bri", "Ca", "Da", "E", "Fe", "Ga", "Ha", "I", "Jo", "Ka", "Li", "Ma", "No", "Ro"]
FIRST_B = ["bel", "da", "lin", "ric", "na", "ton", "mir", "sa", "vin", "lo", "ra", "den", "wen", "ko", "th"]
LAST_A = ["Ash", "Bram", "Cor", "Dun", "Elm", "Fair", "Glen", "Hart", "Iver", "Kel",
          "Lind", "Mor", "Nor", "Oak", "Pen", "Quill", "Rad", "Stan", "Thorn", "Wex"]
LAST_B = ["ford", "wick", "ley", "more", "by", "ton", "field", "dale", "wood", "well",
          "brook", "stone", "croft", "ham", "worth", "gate", "shaw", "ridge", "mere", "holt"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
YEARS = range(1920, 2000)
DAYS = range(1, 29)
CITIES = ["Arlen", "Bexmouth", "Caldport", "Dorvale", "Eastwick", "Fenhollow", "Grayhaven", "Halbrook",
          "Ironbridge", "Juniper Bay", "Kestrel Falls", "Lowmarsh", "Maplecross", "Northgate", "Oldcastle",
          "Pinecrest", "Queensferry", "Redcliff", "Saltmere", "Thornbury", "Umberton", "Valewood",
          "Westholm", "Yarrowby", "Ashcombe", "Brightwater", "Coldharbour", "Deepdene", "Elmstead",
          "Foxley", "Glenmoor", "Hollowell"]
UNIVERSITIES = ["Arlen University", "Bexmouth Institute of Technology", "Caldport College",
                "Dorvale State University", "Eastwick Polytechnic", "Fenhollow University",
                "Grayhaven Institute", "Halbrook University", "Ironbridge College", "Juniper Bay University",
                "Kestrel University", "Lowmarsh Academy", "Maplecross University", "Northgate Institute",
                "Oldcastle University", "Pinecrest College", "Queensferry University", "Redcliff Institute",
                "Saltmere University", "Thornbury College"]
FIELDS = ["mathematics", "physics", "chemistry", "biology", "economics", "history", "philosophy",
          "linguistics", "computer science", "civil engineering", "architecture", "medicine", "law",
          "music", "geology", "astronomy", "psychology", "sociology", "statistics", "literature"]
EMPLOYERS = ["Acorn Systems", "Bluefin Logistics", "Copperleaf Foods", "Driftwood Media", "Emberline Energy",
             "Falcon Motors", "Granite Bank", "Harbor Health", "Indigo Software", "Jetstream Airlines",
             "Keystone Insurance", "Lumen Optics", "Meridian Pharma", "Nimbus Cloud", "Orchard Retail",
             "Pioneer Steel", "Quartz Telecom", "Riverbend Textiles", "Summit Construction", "Tidewater Shipping",
             "Umbra Games", "Vertex Robotics", "Willow Publishing", "Zephyr Chemicals"]

ATTRIBUTES = ("birth_date", "birth_city", "university", "field", "employer", "company_city")
# Value counts of each attribute; a person's attributes are drawn uniformly and independently.
CHOICES = {"birth_date": len(MONTHS) * len(DAYS) * len(YEARS), "birth_city": len(CITIES),
           "university": len(UNIVERSITIES), "field": len(FIELDS), "employer": len(EMPLOYERS),
           "company_city": len(CITIES)}
MAX_PEOPLE = len(FIRST_A) * len(FIRST_B) * len(LAST_A) * len(LAST_B)  # distinct full names

# Biography sentences: four paraphrases per attribute.
BIO_TEMPLATES = {
    "birth_date": ["{name} was born on {value}.", "{name} came into the world on {value}.",
                   "The birthday of {name} is {value}.", "{name} celebrates a birthday every year on {value}."],
    "birth_city": ["{name} was born in {value}.", "{name} grew up in the city of {value}.",
                   "{name} is a native of {value}.", "{name} spent early childhood in {value}."],
    "university": ["{name} studied at {value}.", "{name} graduated from {value}.",
                   "{name} received an education at {value}.", "{name} was a student at {value}."],
    "field": ["{name} majored in {value}.", "{name} completed a degree in {value}.",
              "{name} specialised in {value}.", "{name} chose {value} as a subject of study."],
    "employer": ["{name} works for {value}.", "{name} is employed by {value}.",
                 "{name} has a job at {value}.", "{name} joined the staff of {value}."],
    "company_city": ["{name} works in {value}.", "The office of {name} is in {value}.",
                     "{name} commutes to a workplace in {value}.", "{name} is based in {value} for work."],
}
# Questions: templates that never occur in a biography.
QUESTION_TEMPLATES = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "Which city was {name} born in?",
    "university": "Which university did {name} attend?",
    "field": "What did {name} study?",
    "employer": "Which company employs {name}?",
    "company_city": "In which city does {name} work?",
}


def qa_prompt(question: str) -> str:
    """The text a model is asked: ``Question: ... Answer:``; the answer follows after one space."""
    return f"Question: {question} Answer:"


def attribute_bits() -> dict[str, float]:
    """Entropy in bits of each attribute (uniform draws): log2 of its number of values."""
    return {a: math.log2(n) for a, n in CHOICES.items()}


def make_person(seed: int, index: int) -> dict:
    """Person ``index`` of population ``seed``: {"name", "qa_test" (bool), one string per attribute}.

    Depends only on (seed, index). Names are distinct within a population (a seeded permutation of
    MAX_PEOPLE names)."""
    if not 0 <= index < MAX_PEOPLE:
        raise DataError(f"person {index} is out of range: a population has {MAX_PEOPLE} distinct names")
    rng = np.random.default_rng([seed, index])
    name_id = int(_name_order(seed)[index])
    a, rest = divmod(name_id, len(FIRST_B) * len(LAST_A) * len(LAST_B))
    b, rest = divmod(rest, len(LAST_A) * len(LAST_B))
    c, d = divmod(rest, len(LAST_B))
    draws = [int(rng.integers(CHOICES[attr])) for attr in ATTRIBUTES]
    month, rest = divmod(draws[0], len(DAYS) * len(YEARS))
    day, year = divmod(rest, len(YEARS))
    return {"name": f"{FIRST_A[a]}{FIRST_B[b]} {LAST_A[c]}{LAST_B[d]}",
            "birth_date": f"{MONTHS[month]} {DAYS[day]}, {YEARS[year]}",
            "birth_city": CITIES[draws[1]], "university": UNIVERSITIES[draws[2]], "field": FIELDS[draws[3]],
            "employer": EMPLOYERS[draws[4]], "company_city": CITIES[draws[5]],
            "qa_test": None, "_rng": rng}


_NAME_ORDERS: dict[int, np.ndarray] = {}


def _name_order(seed: int) -> np.ndarray:
    if seed not in _NAME_ORDERS:
        _NAME_ORDERS[seed] = np.random.default_rng([seed, 2**31]).permutation(MAX_PEOPLE)
    return _NAME_ORDERS[seed]


def biographies(person: dict, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` biographies of ``person``: its six sentences shuffled, each from a random paraphrase."""
    out = []
    for _ in range(count):
        order = rng.permutation(len(ATTRIBUTES))
        out.append(" ".join(BIO_TEMPLATES[ATTRIBUTES[i]][int(rng.integers(4))].format(
            name=person["name"], value=person[ATTRIBUTES[i]]) for i in order))
    return out


def qa_pairs(person: dict) -> list[dict]:
    """One QA record per attribute: {"prompt", "question", "answer", "person", "attribute"}."""
    records = []
    for attr in ATTRIBUTES:
        question = QUESTION_TEMPLATES[attr].format(name=person["name"])
        records.append({"prompt": qa_prompt(question), "question": question, "answer": person[attr],
                        "person": person["name"], "attribute": attr})
    return records


def people(n: int, *, seed: int, first: int = 0, bios: int = 3, qa_test_fraction: float = 0.5) -> list[dict]:
    """People ``first`` .. ``first + n - 1`` of population ``seed``, each with "bios" (list of str) and "qa_test"."""
    if first + n > MAX_PEOPLE:
        raise DataError(f"--first {first} + --people {n} exceeds the {MAX_PEOPLE} distinct names of a population")
    out = []
    for i in range(first, first + n):
        person = make_person(seed, i)
        rng = person.pop("_rng")
        person["bios"] = biographies(person, bios, rng)
        person["qa_test"] = bool(rng.random() < qa_test_fraction)
        out.append(person)
    return out


def parse_mix(text: str | None) -> tuple[str, float] | None:
    """'bbc_news:0.5' -> ("bbc_news", 0.5): that corpus makes up that share of the text's characters."""
    if not text:
        return None
    name, sep, ratio = text.partition(":")
    try:
        share = float(ratio)
    except ValueError:
        share = -1.0
    if not sep or name not in CORPORA or not 0 < share < 1:
        raise DataError(f"--mix {text!r}: expected CORPUS:SHARE with CORPUS one of {', '.join(CORPORA)} and "
                        "SHARE in (0, 1), e.g. --mix bbc_news:0.5")
    return name, share


def mixed_documents(corpus: str, chars: int, seed: int) -> list[str]:
    """Documents of embedded ``corpus`` in a seeded order until they hold at least ``chars`` characters."""
    files, reader = CORPORA[corpus]
    paths = files()
    order = np.random.default_rng([seed, 2**31 + 1]).permutation(len(paths))
    docs, total = [], 0
    for i in order:
        for doc in reader(paths[int(i)]):
            if total >= chars:
                return docs
            docs.append(doc.text)
            total += len(doc.text)
    if total < chars:
        raise DataError(f"--mix {corpus} needs {chars / 1e6:.1f} MB of text, the corpus has {total / 1e6:.1f} MB: "
                        "lower its share or generate fewer people")
    return docs


def qa_documents(group: list[dict], repeats: int, rng: np.random.Generator) -> list[str]:
    """The qa_train text: one document per person of ``group`` (its pairs, one a line); with ``repeats`` > 1,
    ``repeats`` passes over all their pairs, each in a new order from ``rng``, six pairs to a document."""
    if repeats == 1:
        return ["\n".join(f"{r['prompt']} {r['answer']}" for r in qa_pairs(p)) for p in group]
    pairs = [f"{r['prompt']} {r['answer']}" for p in group for r in qa_pairs(p)]
    docs = []
    for _ in range(repeats):
        order = rng.permutation(len(pairs))
        docs += ["\n".join(pairs[int(i)] for i in order[k:k + len(ATTRIBUTES)])
                 for k in range(0, len(order), len(ATTRIBUTES))]
    return docs


def write_corpus(out: str | Path, n: int, *, seed: int = 0, first: int = 0, bios: int = 3,
                 qa_test_fraction: float = 0.5, qa_text: bool = True, mix: str | None = None,
                 qa_repeats: int = 1) -> dict:
    """Write the corpus under ``out`` (see the module docstring); returns the facts.json dict."""
    if n < 1:
        raise DataError(f"--people must be >= 1, got {n}")
    if first < 0:
        raise DataError(f"--first must be >= 0, got {first}")
    if bios < 1:
        raise DataError(f"--bios must be >= 1, got {bios}")
    if qa_repeats < 1:
        raise DataError(f"--qa-repeats must be >= 1, got {qa_repeats}")
    if not 0 <= qa_test_fraction <= 1:
        raise DataError(f"--qa-test-fraction must be in [0, 1], got {qa_test_fraction}")
    mixing = parse_mix(mix)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a directory")
    group = people(n, seed=seed, first=first, bios=bios, qa_test_fraction=qa_test_fraction)
    text = out / "text"
    text.mkdir(parents=True, exist_ok=True)
    documents = [bio for p in group for bio in p["bios"]]
    qa = {"train": [r for p in group if not p["qa_test"] for r in qa_pairs(p)],
          "test": [r for p in group if p["qa_test"] for r in qa_pairs(p)]}
    write_text_atomic(text / "people.txt", "\n\n".join(documents) + "\n")
    qa_docs = qa_documents([p for p in group if not p["qa_test"]], qa_repeats,
                           np.random.default_rng([seed, 2**31 + 2, first]))
    if qa_text and qa_docs:
        write_text_atomic(text / "qa_train.txt", "\n\n".join(qa_docs) + "\n")
    else:
        (text / "qa_train.txt").unlink(missing_ok=True)
    facts_chars = sum(map(len, documents)) + (sum(map(len, qa_docs)) if qa_text else 0)
    mixed_chars = 0
    for name in CORPORA:
        (text / f"{name}.txt").unlink(missing_ok=True)
    if mixing is not None:
        name, share = mixing
        general = mixed_documents(name, math.ceil(facts_chars * share / (1 - share)), seed)
        mixed_chars = sum(map(len, general))
        write_text_atomic(text / f"{name}.txt", "\n\n".join(general) + "\n")
    for split, records in qa.items():
        write_text_atomic(out / f"qa_{split}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_text_atomic(out / "people.jsonl", "".join(
        json.dumps({k: v for k, v in p.items() if k != "bios"}) + "\n" for p in group))
    bits = attribute_bits()
    info = {"people": n, "first": first, "seed": seed, "bios": bios, "qa_test_fraction": qa_test_fraction,
            "qa_text": qa_text, "qa_repeats": qa_repeats, "mix": mix, "biographies": len(documents),
            "qa_train": len(qa["train"]), "qa_test": len(qa["test"]),
            "attribute_bits": bits, "bits_per_person": sum(bits.values()),
            "facts_chars": facts_chars, "mixed_chars": mixed_chars,
            "mixed_share": mixed_chars / (facts_chars + mixed_chars)}
    write_text_atomic(out / "facts.json", json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pkmlm.data.facts", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--people", type=int, required=True, help="number of people")
    parser.add_argument("--seed", type=int, default=0, help="the population: names and attributes")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--first", type=int, default=0, help="index of the first person (disjoint sets)")
    parser.add_argument("--bios", type=int, default=3, help="biographies per person")
    parser.add_argument("--qa-test-fraction", type=float, default=0.5,
                        help="share of the people whose QA pairs are held out in qa_test.jsonl")
    parser.add_argument("--no-qa-text", action="store_true",
                        help="do not put the qa_train pairs into the training text")
    parser.add_argument("--qa-repeats", type=int, default=1,
                        help="write the qa_train pairs this many times, each in a new order across people")
    parser.add_argument("--mix", help="mix an embedded corpus in, CORPUS:SHARE of the characters, e.g. bbc_news:0.5")
    args = parser.parse_args(argv)
    return run(lambda: _write(args))


def _write(args) -> None:
    info = write_corpus(args.out, args.people, seed=args.seed, first=args.first, bios=args.bios,
                        qa_test_fraction=args.qa_test_fraction, qa_text=not args.no_qa_text, mix=args.mix,
                        qa_repeats=args.qa_repeats)
    print(f"{info['people']} people, {info['biographies']} biographies, {info['qa_train']} train and "
          f"{info['qa_test']} test questions, {info['bits_per_person']:.1f} bits per person"
          + (f", {info['mixed_share']:.0%} of the characters from {args.mix.split(':')[0]}" if args.mix else ""))
    print(f"next: python -m pkmlm.data.prepare --input {Path(args.out) / 'text'} --split-documents blank-line "
          f"--valid 0.01 --test 0.01 --out DATA_DIR")


if __name__ == "__main__":
    sys.exit(main())
