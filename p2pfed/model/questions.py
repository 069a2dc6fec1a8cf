"""A seeded, versioned bank of curriculum questions for the topic-tagging task.

How a question is generated (bank version ``BANK_VERSION``; any change to the word lists,
templates or procedure below must bump it, since federated experiments compare across nodes):

1. Topics are balanced: for ``n`` questions, topic ``i`` gets ``n // len(TOPICS)`` questions, and
   the first ``n % len(TOPICS)`` topics get one more.  The list of topic indices is then shuffled
   with ``numpy.random.default_rng(seed)``; that one generator drives every later draw, in order.
2. For each question a template is drawn uniformly from :data:`TEMPLATES` (sentences with one or
   two slots, ``{x}`` and ``{y}``).
3. Each slot is filled independently with a phrase chosen as follows: with probability
   ``1 - GENERIC_SHARE - NEIGHBOUR_SHARE`` (0.8) from the question's own topic keywords; with
   probability ``GENERIC_SHARE`` (0.1) from :data:`GENERIC_PHRASES` (words any subject uses);
   with probability ``NEIGHBOUR_SHARE`` (0.1) from the keywords of the topic's confusable
   neighbour (:data:`NEIGHBOURS`, e.g. chemistry ↔ physics).  The phrase is uniform within its
   pool.  If ``{y}`` would repeat ``{x}`` it is redrawn (up to 8 times).
4. The first letter of the sentence is upper-cased.

The generic and neighbour phrases make some questions genuinely ambiguous, so a bag-of-words
linear model is accurate but not perfect (about 0.8-0.9 on held-out questions).
"""

from __future__ import annotations

import numpy as np

from gossip.errors import LocalError

BANK_VERSION = "1"

GENERIC_SHARE = 0.1
NEIGHBOUR_SHARE = 0.1

TOPICS: tuple[str, ...] = (
    "algebra",
    "geometry",
    "biology",
    "chemistry",
    "physics",
    "history",
    "geography",
    "literature",
    "computing",
    "economics",
)

KEYWORDS: dict[str, tuple[str, ...]] = {
    "algebra": (
        "linear equations",
        "quadratic equations",
        "polynomial factoring",
        "variables",
        "inequalities",
        "systems of equations",
        "the slope of a line",
        "exponents",
        "logarithms",
        "the quadratic formula",
        "algebraic fractions",
        "simultaneous equations",
        "completing the square",
        "arithmetic sequences",
    ),
    "geometry": (
        "the Pythagorean theorem",
        "congruent triangles",
        "the area of a circle",
        "parallel lines",
        "interior angles",
        "polygons",
        "the circumference",
        "similar triangles",
        "vectors in the plane",
        "the volume of a prism",
        "angle bisectors",
        "transformations",
        "tangents to a circle",
        "coordinate geometry",
    ),
    "biology": (
        "photosynthesis",
        "cell division",
        "DNA replication",
        "natural selection",
        "the nervous system",
        "enzymes",
        "mitochondria",
        "ecosystems",
        "genetic inheritance",
        "the immune response",
        "protein synthesis",
        "evolution",
        "osmosis in cells",
        "food chains",
    ),
    "chemistry": (
        "covalent bonds",
        "the periodic table",
        "acids and bases",
        "chemical equilibrium",
        "oxidation and reduction",
        "molar mass",
        "reaction rates",
        "ionic compounds",
        "titration",
        "organic molecules",
        "electron configuration",
        "catalysts",
        "the mole concept",
        "isotopes",
    ),
    "physics": (
        "Newton's laws",
        "momentum",
        "kinetic energy",
        "electric circuits",
        "magnetic fields",
        "wave interference",
        "gravity",
        "friction",
        "acceleration",
        "thermodynamics",
        "the speed of light",
        "projectile motion",
        "Ohm's law",
        "nuclear decay",
    ),
    "history": (
        "the French Revolution",
        "the Industrial Revolution",
        "the Cold War",
        "the Roman Empire",
        "the Renaissance",
        "colonialism",
        "the First World War",
        "the printing press",
        "medieval feudalism",
        "the civil rights movement",
        "ancient Egypt",
        "the fall of the Berlin Wall",
        "the Reformation",
        "the Silk Road",
    ),
    "geography": (
        "plate tectonics",
        "river erosion",
        "climate zones",
        "urbanisation",
        "monsoons",
        "glaciers",
        "population density",
        "rainforests",
        "volcanoes",
        "map projections",
        "desertification",
        "coastal landforms",
        "latitude and longitude",
        "migration patterns",
    ),
    "literature": (
        "Shakespeare's sonnets",
        "the narrator",
        "metaphor",
        "the main character",
        "dramatic irony",
        "foreshadowing",
        "the novel's setting",
        "poetic rhyme",
        "Romantic poetry",
        "symbolism",
        "the plot structure",
        "tragic heroes",
        "satire",
        "the author's tone",
    ),
    "computing": (
        "recursion",
        "binary search",
        "sorting algorithms",
        "data structures",
        "object-oriented programming",
        "compilers",
        "network protocols",
        "databases",
        "boolean logic",
        "hash tables",
        "operating systems",
        "loops in a program",
        "encryption",
        "machine learning",
    ),
    "economics": (
        "supply and demand",
        "inflation",
        "interest rates",
        "opportunity cost",
        "market competition",
        "gross domestic product",
        "unemployment",
        "monetary policy",
        "taxation",
        "international trade",
        "price elasticity",
        "monopolies",
        "the stock market",
        "government budgets",
    ),
}

NEIGHBOURS: dict[str, str] = {
    "algebra": "geometry",
    "geometry": "algebra",
    "biology": "chemistry",
    "chemistry": "physics",
    "physics": "chemistry",
    "history": "literature",
    "geography": "economics",
    "literature": "history",
    "computing": "algebra",
    "economics": "geography",
}

GENERIC_PHRASES: tuple[str, ...] = (
    "the main idea",
    "a simple model",
    "the overall structure",
    "change over time",
    "a key process",
    "the whole system",
    "patterns",
    "evidence",
    "measurement",
    "the basic rules",
    "cause and effect",
    "real-world examples",
)

TEMPLATES: tuple[str, ...] = (
    "Explain how {x} relates to {y}.",
    "Why does {x} matter when studying {y}?",
    "Give an example of {x}.",
    "What is the difference between {x} and {y}?",
    "Describe {x} in your own words.",
    "How would you use {x} to understand {y}?",
    "Can you summarise what we learned about {x}?",
    "what are the most common mistakes students make with {x}?",
    "Compare {x} with {y} and name one similarity.",
    "I am confused about {x}; could you explain it again?",
    "Which ideas from {y} help when thinking about {x}?",
    "Write a short paragraph about {x} and {y}.",
    "Is there a simple way to remember {x}?",
    "How did our class discussion of {x} connect to {y}?",
)


def _phrase(rng: np.random.Generator, topic: str) -> str:
    r = rng.random()
    if r < GENERIC_SHARE:
        pool = GENERIC_PHRASES
    elif r < GENERIC_SHARE + NEIGHBOUR_SHARE:
        pool = KEYWORDS[NEIGHBOURS[topic]]
    else:
        pool = KEYWORDS[topic]
    return pool[int(rng.integers(len(pool)))]


def generate_questions(n: int, seed: int) -> list[tuple[str, int]]:
    """Return ``n`` (question, topic index) pairs, balanced over :data:`TOPICS`.

    Deterministic for a given ``seed`` and :data:`BANK_VERSION`; see the module docstring.
    """
    if n < 0:
        raise LocalError(f"n must be >= 0, got {n}")
    k = len(TOPICS)
    topics = np.array([i for i in range(k) for _ in range(n // k)] + list(range(n % k)))
    rng = np.random.default_rng(seed)
    rng.shuffle(topics)
    out: list[tuple[str, int]] = []
    for t in topics.tolist():
        topic = TOPICS[t]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        x = _phrase(rng, topic)
        y = x
        if "{y}" in template:
            for _ in range(8):
                y = _phrase(rng, topic)
                if y != x:
                    break
        text = template.format(x=x, y=y)
        out.append((text[0].upper() + text[1:], int(t)))
    return out
