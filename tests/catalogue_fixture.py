"""A generated "own catalogue" with what the bundled Beauty data lacks, in the raw input format `prepare` reads.

    .venv/bin/python tests/catalogue_fixture.py OUT_DIR [--items 60] [--users 40] [--seed 0]
    make demo DATASET=OUT_DIR RUN_DIR=runs/catalogue

`write_catalogue` writes `items.jsonl` and `sequences.jsonl` (format: data/amazon_beauty_2014_5core/README.md)
and `facts.json`, what the generator put in, for tests to check reports against:

- 0-based ids: items 0..items-1, users 0..users-1;
- long technical descriptions: about a third of the items have 350-600 words of specs (well over a 256-token
  encoder window), one of them ~9,000 characters (more than 8 windows); the others have at most 30 words;
- skewed categories: 60 % of the items in one category path;
- duplicate titles: groups of 3 items with the same title (variants told apart only by their description), one
  group of 3 items identical in every text field;
- every user has 5-9 distinct items (enough for a 5-core filter and leave-one-out), every item at least one user.

Deterministic for a given (items, users, seed). Small enough for `make test` at the defaults.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CATEGORY_PATHS = [
    (["Electronics", "Computers & Accessories", "Cables & Interconnects", "USB Cables"], 0.60),
    (["Electronics", "Computers & Accessories", "Networking Products", "Switches"], 0.15),
    (["Electronics", "Computers & Accessories", "Data Storage", "External Solid State Drives"], 0.10),
    (["Tools & Home Improvement", "Power & Hand Tools", "Soldering Equipment"], 0.10),
    (["Industrial & Scientific", "Test, Measure & Inspect", "Multimeters"], 0.05),
]
BRANDS = ["Ankora", "Voltrix", "Cablewise", "Nordhaus", "Kestrel Labs", "Quanta Tools"]
NOUNS = {
    "USB Cables": ["USB-C to USB-C Cable", "USB-A to USB-C Cable", "Thunderbolt 4 Cable", "USB-C Extension Cable"],
    "Switches": ["8-Port Gigabit Switch", "5-Port 2.5GbE Switch", "Managed PoE+ Switch"],
    "External Solid State Drives": ["Portable NVMe SSD", "Rugged External SSD"],
    "Soldering Equipment": ["Digital Soldering Station", "Hot Air Rework Station"],
    "Multimeters": ["True-RMS Digital Multimeter", "Auto-Ranging Clamp Meter"],
}
SPEC_SENTENCES = [
    "Rated for {a} W power delivery at {b} V / {c} A with an e-marker chip (model {m}).",
    "Supports data transfer up to {a} Gbps and DisplayPort Alt Mode {b}.{c} at 8K/60Hz.",
    "Conductors are {a}AWG tinned copper with triple shielding (foil, braid {b} %, drain wire) and a TPE jacket.",
    "Operating temperature -{a} to +{b} degrees C; storage humidity {c} % RH non-condensing.",
    "Passed {a},000 bend cycles at {b} degrees and a {c} kg pull test on each connector (test report {m}).",
    "Compliant with USB-IF specification revision {b}.{c}, RoHS 3, REACH SVHC {a} and UL 94 V-0 flammability.",
    "The housing is CNC-machined 6063 aluminium, {a} mm x {b} mm x {c} mm, anodised, with strain relief.",
    "Firmware {m} adds link aggregation (802.3ad), {a} VLANs, IGMP snooping v{c} and a {b}-entry MAC table.",
    "Sequential read {a}0 MB/s and write {b}0 MB/s measured with CrystalDiskMark {c}.0 on a host of model {m}.",
    "Temperature range {a}0 to {b}0 degrees C with +/- {c} degrees C stability and a {a} W ceramic heater {m}.",
    "Measures DC voltage to {a}00 V, AC current to {b}0 A, capacitance to {c} mF; CAT III {a}00 V safety rating.",
    "In the box: the unit, a {a} m cable, {b} adapters, a quick start guide in {c} languages and warranty card {m}.",
]
SHORT_DESCRIPTIONS = [
    "Compact and durable.", "Works with laptops, tablets and phones.", "Two-year warranty.",
    "Tested before shipping.", "Colour: {colour}.", "",
]
COLOURS = ["black", "grey", "silver", "blue", "red", "white"]
LONG_SHARE = 1 / 3
DUPLICATE_GROUP = 3
VERY_LONG_CHARS = 9_000  # under prepare's 10,000-character cut, over 8 MiniLM windows


def _model_number(rng: np.random.Generator) -> str:
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ"), size=2))
    return f"{letters}-{rng.integers(1000, 9999)}-{rng.choice(list('ABCDEFX'))}{rng.integers(1, 9)}"


def _spec_text(rng: np.random.Generator, min_words: int, max_chars: int | None = None) -> str:
    sentences: list[str] = []
    words = 0
    while words < min_words or (max_chars is not None and sum(map(len, sentences)) + len(sentences) < max_chars):
        template = SPEC_SENTENCES[int(rng.integers(len(SPEC_SENTENCES)))]
        sentence = template.format(a=int(rng.integers(2, 99)), b=int(rng.integers(1, 9)), c=int(rng.integers(1, 9)),
                                   m=_model_number(rng))
        if max_chars is not None and sum(map(len, sentences)) + len(sentences) + len(sentence) > max_chars:
            break
        sentences.append(sentence)
        words += len(sentence.split())
    return " ".join(sentences)


def _items(count: int, rng: np.random.Generator) -> tuple[list[dict], dict]:
    weights = np.array([w for _, w in CATEGORY_PATHS])
    category_of = rng.choice(len(CATEGORY_PATHS), size=count, p=weights / weights.sum())
    # Duplicate titles: variants of one product (same title, brand and category; own description each), the first
    # group identical in every text field.
    starts = rng.choice(count // DUPLICATE_GROUP, size=max(1, count // 15), replace=False) * DUPLICATE_GROUP
    duplicate_groups = [list(range(int(s), int(s) + DUPLICATE_GROUP)) for s in sorted(starts)]
    identical = duplicate_groups[0]
    copies = {member: group[0] for group in duplicate_groups for member in group[1:]}
    in_groups = {member for group in duplicate_groups for member in group}
    long_ids = set(rng.choice(count, size=max(1, round(count * LONG_SHARE)), replace=False).tolist())
    long_ids -= set(identical[1:])  # they copy their first member's text
    very_long_id = min(long_ids - in_groups, default=None)
    items = []
    for item_id in range(count):
        path = CATEGORY_PATHS[category_of[item_id]][0]
        noun = NOUNS[path[-1]][int(rng.integers(len(NOUNS[path[-1]])))]
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        title = f"{brand} {noun}, {int(rng.integers(1, 5))} m, model {_model_number(rng)}"
        if item_id == very_long_id:
            description = _spec_text(rng, min_words=350, max_chars=VERY_LONG_CHARS)
        elif item_id in long_ids:
            description = _spec_text(rng, min_words=int(rng.integers(350, 600)))
        else:
            template = SHORT_DESCRIPTIONS[int(rng.integers(len(SHORT_DESCRIPTIONS)))]
            description = template.format(colour=COLOURS[int(rng.integers(len(COLOURS)))])
        item = {"item_id": item_id, "title": title, "brand": brand, "categories": path,
                "description": description or None, "price": round(float(rng.uniform(5, 400)), 2)}
        if item_id in copies:
            first = items[copies[item_id]]
            copied = ("title", "brand", "categories") + (("description",) if item_id in identical else ())
            item.update({name: first[name] for name in copied})
        items.append(item)
    facts = {
        "items": count,
        "long_description_item_ids": [i for i, item in enumerate(items)
                                      if len((item["description"] or "").split()) >= 350],
        "very_long_item_ids": [i for i, item in enumerate(items) if len(item["description"] or "") > 8_000],
        "duplicate_title_groups": duplicate_groups,
        "identical_item_groups": [identical],
        "category_shares": {" > ".join(path): round(float(np.mean(category_of == c)), 3)
                            for c, (path, _) in enumerate(CATEGORY_PATHS)},
    }
    return items, facts


def _sequences(items: int, users: int, rng: np.random.Generator) -> list[dict]:
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8  # a long tail, most-bought items first in a shuffled order
    popularity = popularity[rng.permutation(items)]
    lengths = rng.integers(5, 10, size=users)
    # every item is bought at least once: deal a shuffled catalogue out over the users first
    dealt: list[list[int]] = [[] for _ in range(users)]
    for position, item in enumerate(rng.permutation(items).tolist()):
        dealt[position % users].append(item)
    sequences = []
    for user_id in range(users):
        chosen = list(dict.fromkeys(dealt[user_id]))
        while len(chosen) < max(lengths[user_id], len(dealt[user_id])):
            weights = popularity.copy()
            weights[chosen] = 0.0
            chosen.append(int(rng.choice(items, p=weights / weights.sum())))
        order = rng.permutation(len(chosen))
        sequences.append({"user_id": user_id, "item_ids": [chosen[i] for i in order]})
    return sequences


def write_catalogue(folder: Path, items: int = 60, users: int = 40, seed: int = 0) -> Path:
    """Write `items.jsonl`, `sequences.jsonl` and `facts.json` into `folder` (created); return `folder`."""
    if items < 2 * DUPLICATE_GROUP or users < 1:
        raise ValueError(f"need at least {2 * DUPLICATE_GROUP} items and 1 user, got {items} and {users}")
    if users * 9 < items:
        raise ValueError(f"{users} users of at most 9 items cannot buy each of {items} items")
    rng = np.random.default_rng(seed)
    item_records, facts = _items(items, rng)
    sequences = _sequences(items, users, rng)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("items.jsonl", item_records), ("sequences.jsonl", sequences)):
        (folder / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    facts.update(users=users, seed=seed, interactions=sum(len(s["item_ids"]) for s in sequences))
    (folder / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = write_catalogue(args.out_dir, args.items, args.users, args.seed)
    facts = json.loads((folder / "facts.json").read_text())
    print(f"wrote {folder}: {facts['items']} items, {facts['users']} users, {facts['interactions']} interactions, "
          f"{len(facts['long_description_item_ids'])} long descriptions, "
          f"{len(facts['duplicate_title_groups'])} duplicate-title groups")


if __name__ == "__main__":
    main()
