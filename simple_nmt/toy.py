"""A small built-in translation task, generated deterministically (no download).

The source is English-like (subject, verb, object, optional place; adjectives
before the noun); the target is a made-up language with its own words, the
verb at the end (SOV), adjectives after the noun in reverse order, and a plural
suffix on nouns and verbs. Learning it takes lexical translation, reordering and
agreement, not copying.
"""

from __future__ import annotations

import random
from pathlib import Path

NOUNS = {
    "dog": "hund", "cat": "katze", "man": "mann", "woman": "frau", "child": "kind", "bird": "vogel",
    "horse": "pferd", "girl": "maedchen", "boy": "junge", "teacher": "lehrer", "farmer": "bauer",
    "doctor": "arzt", "friend": "freund", "king": "koenig", "fish": "fisch", "cook": "koch",
}
ADJECTIVES = {
    "big": "gross", "small": "klein", "old": "alt", "young": "jung", "red": "rot", "black": "schwarz",
    "happy": "froh", "tired": "muede", "quick": "schnell", "quiet": "still", "brave": "mutig", "kind": "lieb",
}
VERBS = {
    "sees": "sieht", "likes": "mag", "follows": "folgt", "helps": "hilft", "finds": "findet",
    "calls": "ruft", "paints": "malt", "feeds": "fuettert", "visits": "besucht", "teaches": "lehrt",
}
PLACES = {
    "park": "park", "garden": "garten", "house": "haus", "city": "stadt", "forest": "wald",
    "river": "fluss", "school": "schule", "market": "markt",
}
DETERMINERS = {"the": "der", "a": "ein"}


def _noun_phrase(rng: random.Random) -> tuple[list[str], list[str], bool]:
    det = rng.choice(sorted(DETERMINERS))
    noun = rng.choice(sorted(NOUNS))
    adjectives = rng.sample(sorted(ADJECTIVES), rng.choice([0, 0, 1, 1, 2]))
    plural = det == "the" and rng.random() < 0.3
    src = [det] + adjectives + [noun + ("s" if plural else "")]
    tgt = [DETERMINERS[det], NOUNS[noun] + ("-en" if plural else "")]
    tgt += [ADJECTIVES[a] for a in reversed(adjectives)]
    return src, tgt, plural


def make_pair(rng: random.Random) -> tuple[str, str]:
    """One random sentence pair (source, target)."""
    subj_src, subj_tgt, plural = _noun_phrase(rng)
    obj_src, obj_tgt, _ = _noun_phrase(rng)
    verb = rng.choice(sorted(VERBS))
    src_verb = verb[:-1] if plural else verb  # "sees" -> "see" after a plural subject
    tgt_verb = VERBS[verb] + ("-n" if plural else "")
    src, tgt = subj_src + [src_verb] + obj_src, subj_tgt + obj_tgt
    if rng.random() < 0.4:
        place = rng.choice(sorted(PLACES))
        src += ["in", "the", place]
        tgt = ["im", PLACES[place]] + tgt
    return " ".join(src), " ".join(tgt + [tgt_verb])


def make_corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` source and target lines of the toy task."""
    rng = random.Random(seed)
    pairs = [make_pair(rng) for _ in range(n)]
    return [s for s, _ in pairs], [t for _, t in pairs]


def write_corpus(folder: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``train`` / ``valid`` / ``test`` splits as ``SPLIT.en`` and ``SPLIT.de`` in ``folder``.

    Args:
        folder: created if missing.
        sizes: lines per split (default 4000 / 200 / 200).
        seed: splits use seeds ``seed``, ``seed + 1``, ...
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {"train": 4000, "valid": 200, "test": 200}
    for offset, (split, n) in enumerate(sizes.items()):
        src, tgt = make_corpus(n, seed + offset)
        (folder / f"{split}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
        (folder / f"{split}.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return folder
