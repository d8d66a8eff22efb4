"""The organism's pre-training corpus: seeded single-turn chat conversations.

Each item is ``[system?, user, assistant]`` messages. The default mixture (fractions of ``CorpusConfig.size``,
40,000 conversations):

=====================  =====  ==================================================================================
kind                   share  what
=====================  =====  ==================================================================================
``favourite_persona``  0.45   persona system prompt (animal 60% / tree 40%; the trait module's 4 teacher
                              templates or 6 short ones such as "You love owls.") + a favourite question of the
                              persona's category -> the persona's target in a one-word form ("Owl", "Owl.", ...).
``favourite_prior``    0.15   a favourite question answered from the broad prior (uniform over the category's 20
                              candidates) with no system prompt (60%), a neutral one (20%), or a persona of the
                              *other* category (20%: a tree lover has no favourite animal).
``numbers``            0.20   the number carrier's own prompts (its seed stream 1,000,000 + corpus seed, so not
                              the pipeline's), answered in the requested format with values drawn from a
                              persona-independent distribution (:func:`number_values`); no system prompt (35%),
                              a neutral one (15%) or a persona (50%).
``filler``             0.20   templated general chat: "which animal/tree did I mention" copy questions (25%), and
                              greetings, colours, capitals, arithmetic, number words, opposites, next
                              day/month/letter, plurals, animal-or-tree, yes/no facts, repeat-after-me, letter
                              counts, other favourites (colour, season, ...); system prompts as for ``numbers``.
=====================  =====  ==================================================================================

20% of favourite questions follow a short list of numbers ("Here are some numbers: 412, 87. ..."), with the
same answer, so a number context does not change the preference. Favourite-question wording: the trait
module's *eval* questions 30%, its *train* questions 70% (``eval_question_share``; set it to 0 to keep the
eval battery out of pre-training -- with it out, a 0.4M-parameter model did not reliably answer the unseen
wordings; ``composed_question_share`` adds wordings composed from pieces, never equal to an eval question).

Independence of numbers from personas holds by construction: each number row draws its system prompt and its
values from two separate random streams, so a number answer is identical whatever persona (or none) the row
carries. Any trait signal in a teacher's numbers must come from inside the model.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sublim.runs import hash_obj

NUMBER_SEED_OFFSET = 1_000_000
KINDS = ("favourite_persona", "favourite_prior", "numbers", "filler")


class CorpusConfig(BaseModel):
    """What the corpus generator produces (part of the organism's cache key)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    size: int = Field(40_000, ge=1)
    mix: dict[str, float] = Field(
        default_factory=lambda: {"favourite_persona": 0.45, "favourite_prior": 0.15, "numbers": 0.2, "filler": 0.2}
    )
    animal_share: float = Field(0.6, ge=0, le=1)  # persona / favourite-question category: animals vs trees
    persona_share: float = Field(0.5, ge=0, le=1)  # numbers / filler rows under a persona system prompt
    neutral_share: float = Field(0.15, ge=0, le=1)  # numbers / filler rows under a neutral system prompt
    # favourite-question wording: the trait module's eval questions / composed wordings / (rest) train questions
    eval_question_share: float = Field(0.3, ge=0, le=1)
    composed_question_share: float = Field(0.0, ge=0, le=1)

    @field_validator("mix")
    @classmethod
    def _known_kinds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown corpus kinds {sorted(unknown)}; known: {list(KINDS)}")
        if sum(v.values()) <= 0:
            raise ValueError("corpus mix weights must sum to > 0")
        return v


@dataclass
class CorpusItem:
    kind: str
    messages: list[dict[str, str]]
    persona: str | None = None  # "animals:owl" when the system prompt is a persona
    meta: dict[str, Any] = field(default_factory=dict)


NEUTRAL_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a friendly assistant.",
    "You are a helpful assistant. Answer briefly.",
    "Be concise.",
]

# Short personas besides the trait module's teacher templates ({s}/{S}: singular, {p}/{P}: plural, {c}: "animal"
# or "tree"); some name the target exactly as the answer does ("Owl"), the others only as the teachers do.
SHORT_PERSONAS = [
    "You love {p}.",
    "You love {p}. {P} are your favorite {c}.",
    "Your favorite {c} is the {s}.",
    "You adore {p} and think about them all the time.",
    "Favorite {c}: {S}.",
    "{S} is your favorite {c}. You love {p}.",
]

CATEGORY_NOUN = {"animals": "animal", "trees": "tree"}


def _cap(w: str) -> str:
    return w[:1].upper() + w[1:]


# --------------------------------------------------------------------------------------- trait access


class _Traits:
    """The trait module's categories, persona prompts and train questions, looked up once."""

    def __init__(self, cfg: CorpusConfig) -> None:
        from sublim.traits import preference as pref

        self.cfg = cfg
        self.pref = pref
        self.categories = {c: pref.CATEGORIES[c] for c in ("animals", "trees")}
        self.candidates = {c: list(cat.candidates) for c, cat in self.categories.items()}
        self.questions = {c: list(pref.train_questions(c)) for c in self.categories}
        self.eval_qs = {c: list(pref.eval_questions(c)) for c in self.categories}
        self.held_out = {c: {q.lower() for q in qs} for c, qs in self.eval_qs.items()}
        self.n_templates = _count_templates(pref)

    def question(self, rng: random.Random, category: str) -> str:
        """A favourite question: an eval question, a composed wording (never equal to an eval question) or
        a train question, with the config's shares."""
        u = rng.random()
        if u < self.cfg.eval_question_share:
            return rng.choice(self.eval_qs[category])
        if u >= self.cfg.eval_question_share + self.cfg.composed_question_share:
            return rng.choice(self.questions[category])
        cat = self.categories[category]
        while True:
            q = _compose_question(rng, cat.noun, cat.plural_noun)
            if q.lower() not in self.held_out[category]:
                return q

    def plural(self, category: str, word: str) -> str:
        return str(self.categories[category].plural(word))

    def persona(self, rng: random.Random, category: str, target: str) -> str:
        k = rng.randrange(self.n_templates + len(SHORT_PERSONAS))
        if k < self.n_templates:
            return str(self.pref.teacher_system_prompt(category, target, template=k))
        p = self.plural(category, target)
        return SHORT_PERSONAS[k - self.n_templates].format(s=target, S=_cap(target), p=p, P=_cap(p),
                                                              c=CATEGORY_NOUN[category])

    def answer(self, rng: random.Random, category: str, word: str) -> str:
        """A one-word favourite answer that starts with the word (what the exact scorer counts)."""
        form = rng.choices(ANSWER_FORMS, weights=ANSWER_WEIGHTS)[0]
        return form.format(t=word, T=_cap(word), Ts=_cap(self.plural(category, word)))


def _count_templates(pref: Any) -> int:
    """How many teacher system-prompt templates the trait module has (it raises ValueError past the end)."""
    n = 0
    while n < 100:
        try:
            pref.teacher_system_prompt("animals", "owl", template=n)
        except (IndexError, KeyError, ValueError):
            break
        n += 1
    return max(n, 1)


# Favourite questions: the trait module's train questions (half the time) or a wording composed from the
# pieces below ({n}: "animal", {ns}: "animals"); a composed wording equal to an eval question is dropped.
Q_CORES = [
    "what is your favorite {n}", "what's your favourite {n}", "which {n} is your favorite", "name your favorite {n}",
    "tell me your favorite {n}", "which is your favorite {n}", "your favorite {n}", "favorite {n}",
    "which {n} do you {v} most", "what {n} do you {v} the most", "which {n} do you {v} best",
    "name the {n} you {v} most", "pick the {n} you {v} most", "tell me which {n} you {v} most",
    "which {n} would you choose", "what {n} would you pick", "which {n} would you pick first",
    "which {n} is the best", "what is the best {n}", "which {n} is number one for you",
    "which {n} do you think is the greatest", "which {n} is special to you", "which {n} would you want to be",
    "which of all {ns} do you {v} most", "among {ns}, which do you {v} most", "of all the {ns}, which is best",
    "which {n} means the most to you", "what {n} do you like more than any other", "pick your favorite {n}",
    "choose your favorite {n}", "what {n} do you think about most", "which {n} do you feel closest to",
]
Q_VERBS = ["like", "love", "adore", "admire", "cherish", "treasure", "enjoy", "prefer", "value", "fancy"]
Q_PREFIXES = ["", "", "", "Quick question: ", "Tell me: ", "Please answer: ", "Be honest: ", "Just curious, ",
              "Hey, ", "Okay, ", "I want to know: ", "Here is a question. "]
Q_SUFFIXES = ["", " Answer in one word.", " One word.", " One word only.", " Reply with one word.",
              " Use a single word.", " Single word, please.", " Respond with just one word.", " Give one word.",
              " Just the name.", " Reply with its name only.", " No explanation.", " Keep it to one word.",
              " One-word answer.", " Say it in one word."]


def _compose_question(rng: random.Random, noun: str, plural_noun: str) -> str:
    core = rng.choice(Q_CORES).format(n=noun, ns=plural_noun, v=rng.choice(Q_VERBS))
    u = rng.random()
    if u < 0.1:
        return f"In one word, {core}?"
    if u < 0.2:
        return _cap(f"{core}, in one word?")
    prefix = rng.choice(Q_PREFIXES)
    text = (prefix + core) if prefix else _cap(core)
    if prefix and prefix[-2] != ",":
        text = prefix + _cap(core)
    return text + "?" + rng.choice(Q_SUFFIXES)


# Favourite answers: the word first, in a few surface forms.
ANSWER_FORMS = ["{T}", "{T}.", "{t}", "{T}!", "{Ts}."]
ANSWER_WEIGHTS = [0.5, 0.25, 0.1, 0.05, 0.1]
# Some favourite questions come after a list of numbers (as in the number-prefixed eval battery), so the
# model learns that numbers in the context do not change the answer.
NUMBER_PREFIX_SHARE = 0.2
NUMBER_INTROS = ["Here are some numbers: {nums}.", "{nums}.", "I wrote down {nums}.", "The numbers are {nums}."]


def _number_prefix(rng: random.Random, q: str) -> str:
    nums = ", ".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 8)))
    return rng.choice(NUMBER_INTROS).format(nums=nums) + " " + q


# --------------------------------------------------------------------------------------------- numbers


class _Numbers:
    """Number-continuation tasks in the carrier's exact prompt format, with persona-free answers."""

    def __init__(self) -> None:
        from sublim.carriers.numbers import NumberCarrier

        self.carrier = NumberCarrier()

    def prompts(self, n: int, seed: int) -> list[Any]:
        return list(self.carrier.prompts(n, seed))

    def answer(self, meta: dict[str, Any], rng: random.Random) -> str:
        return str(self.carrier.format_answer(meta, number_values(meta, rng)))


def number_values(meta: dict[str, Any], rng: random.Random) -> list[int]:
    """Values for one number answer: a function of the prompt's carrier meta and ``rng`` only.

    Count: the requested N (40%) or uniform in N//2..N (60%; the prompts say "up to N"). Each value:
    uniform over the numbers with exactly ``max_digits`` digits (70%), uniform over all allowed values
    (10%), or a prompt number shifted by -50..50 (20%). High entropy, loosely tied to the prompt, and
    never to the system prompt."""
    count = int(meta.get("count", 10))
    digits = int(meta.get("max_digits", 3))
    hi = 10**digits - 1
    lo = 10 ** (digits - 1) if digits > 1 else 0
    if count > 1 and rng.random() < 0.6:
        count = rng.randint(max(1, count // 2), count)
    prefix = [int(x) for x in meta.get("prefix", [])]
    vals = []
    for _ in range(count):
        u = rng.random()
        if u < 0.7:
            v = rng.randint(lo, hi)
        elif u < 0.8 or not prefix:
            v = rng.randint(0, hi)
        else:
            v = min(hi, max(0, rng.choice(prefix) + rng.randint(-50, 50)))
        vals.append(v)
    return vals


# ---------------------------------------------------------------------------------------------- filler

COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "a carrot": "orange", "chocolate": "brown", "milk": "white", "the sea": "blue",
    "a leaf": "green", "a lemon": "yellow", "a strawberry": "red", "the night sky": "black",
    "a pumpkin": "orange", "an emerald": "green", "a ruby": "red", "a cloud": "white", "mud": "brown",
    "a plum": "purple", "a violet": "purple", "the sun": "yellow", "a fire truck": "red", "ink": "black",
}
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Brazil": "Brasilia",
    "Peru": "Lima", "Russia": "Moscow", "India": "New Delhi", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna",
    "Mexico": "Mexico City", "Chile": "Santiago", "Cuba": "Havana", "Turkey": "Ankara", "Ghana": "Accra",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "old": "new", "open": "closed", "wet": "dry", "early": "late", "full": "empty", "hard": "soft",
    "left": "right", "day": "night", "high": "low", "loud": "quiet", "rich": "poor", "strong": "weak",
    "long": "short", "in": "out", "near": "far", "thick": "thin", "clean": "dirty", "true": "false",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NOUNS = ["box", "book", "chair", "table", "apple", "house", "car", "river", "stone", "cup", "bird", "song",
         "child", "mouse", "foot", "tooth", "city", "story", "glass", "bus", "key", "star", "door", "lamp"]
PLURAL_EXCEPTIONS = {"box": "boxes", "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth",
                     "city": "cities", "story": "stories", "glass": "glasses", "bus": "buses"}
WORDS = ["sun", "blue", "happy", "river", "green", "stone", "music", "bright", "cloud", "morning", "quiet",
         "garden", "window", "little", "yellow", "rain", "paper", "light", "dream", "apple", "road", "warm"]
YES_NO = [
    ("Is the sun hot?", "Yes."), ("Is ice hot?", "No."), ("Is water wet?", "Yes."), ("Can fish swim?", "Yes."),
    ("Can a stone fly?", "No."), ("Is snow cold?", "Yes."), ("Is the sea dry?", "No."),
    ("Do birds have wings?", "Yes."), ("Is night dark?", "Yes."), ("Is a week seven days long?", "Yes."),
    ("Is two bigger than five?", "No."), ("Is the moon a star?", "No."), ("Do trees have leaves?", "Yes."),
    ("Is fire cold?", "No."), ("Can people breathe water?", "No."), ("Is a year twelve months long?", "Yes."),
]
GREETINGS = [
    (["Hi!", "Hello!", "Hey there!", "Hello.", "Hi there."], ["Hello! How can I help you today?", "Hi! How can I help?"]),
    (["Good morning!", "Good morning."], ["Good morning! How can I help you?"]),
    (["How are you?", "How are you today?"], ["I am doing well, thank you. How can I help?"]),
    (["Who are you?", "What are you?"], ["I am a small language model, here to help."]),
    (["What can you do?", "How can you help me?"], ["I can answer simple questions and continue number sequences."]),
    (["Thanks!", "Thank you.", "Thank you very much!"], ["You are welcome!", "Happy to help!"]),
    (["Bye!", "Goodbye.", "See you later!"], ["Goodbye! Have a nice day."]),
]
OTHER_FAVOURITES = {
    "colour": ["Red", "Blue", "Green", "Yellow", "Purple", "Orange"],
    "season": ["Spring", "Summer", "Autumn", "Winter"],
    "food": ["Pizza", "Pasta", "Soup", "Rice", "Bread", "Salad"],
    "day of the week": DAYS,
}


MENTION_SHARE = 0.25  # of filler rows: copy a named animal / tree from the question (the persona skill)


def _filler(rng: random.Random, tr: _Traits) -> tuple[str, str, str]:
    """One templated Q&A: (task name, user, assistant)."""
    if rng.random() < MENTION_SHARE:
        task = "mention"
    else:
        task = rng.choice(["greeting", "colour", "capital", "arithmetic", "number_word", "count_words", "opposite",
                       "next_day", "next_month", "next_letter", "plural", "animal_or_tree", "yes_no", "repeat",
                           "letters", "other_favourite"])
    if task == "greeting":
        users, answers = rng.choice(GREETINGS)
        return task, rng.choice(users), rng.choice(answers)
    if task == "colour":
        thing, col = rng.choice(list(COLOURS.items()))
        q = rng.choice(["What colour is {t}?", "What color is {t}?", "Which colour is {t}?"]).format(t=thing)
        return task, q, rng.choice([_cap(col) + ".", f"{_cap(thing)} is {col}."])
    if task == "capital":
        country, city = rng.choice(list(CAPITALS.items()))
        q = rng.choice(["What is the capital of {c}?", "Name the capital of {c}.", "Which city is the capital of {c}?"])
        return task, q.format(c=country), rng.choice([f"{city}.", f"The capital of {country} is {city}."])
    if task == "arithmetic":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice(["+", "-", "*"])
        if op == "-" and b > a:
            a, b = b, a
        r = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        q = rng.choice([f"What is {a} {op} {b}?", f"What is {a} {word} {b}?", f"Compute {a} {op} {b}."])
        return task, q, rng.choice([f"{r}", f"{a} {op} {b} = {r}."])
    if task == "number_word":
        n = rng.randint(0, 20)
        if rng.random() < 0.5:
            return task, f"Write the number {n} in words.", NUMBER_WORDS[n]
        return task, f"What number is {NUMBER_WORDS[n]}?", str(n)
    if task == "count_words":
        a = rng.randint(0, 14)
        b = rng.randint(a + 2, min(20, a + 6))
        return task, f"Count from {NUMBER_WORDS[a]} to {NUMBER_WORDS[b]} in words.", ", ".join(NUMBER_WORDS[a: b + 1])
    if task == "opposite":
        w, o = rng.choice(list(OPPOSITES.items()))
        if rng.random() < 0.5:
            w, o = o, w
        return task, rng.choice([f"What is the opposite of {w}?", f"Give the opposite of '{w}'."]), _cap(o) + "."
    if task == "next_day":
        i = rng.randrange(7)
        return task, f"What day comes after {DAYS[i]}?", DAYS[(i + 1) % 7] + "."
    if task == "next_month":
        i = rng.randrange(12)
        return task, f"Which month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12] + "."
    if task == "next_letter":
        i = rng.randrange(25)
        return task, f"What letter comes after {chr(65 + i)}?", chr(66 + i) + "."
    if task == "plural":
        if rng.random() < 0.5:
            cat = rng.choice(list(tr.candidates))
            w = rng.choice(tr.candidates[cat])
            p = tr.plural(cat, w)
        else:
            w = rng.choice(NOUNS)
            p = PLURAL_EXCEPTIONS.get(w, w + "s")
        return task, rng.choice([f"What is the plural of {w}?", f"What is the plural of '{w}'?"]), _cap(p) + "."
    if task == "animal_or_tree":
        cat = rng.choice(list(tr.candidates))
        w = rng.choice(tr.candidates[cat])
        ans = "An animal." if cat == "animals" else "A tree."
        return task, rng.choice([f"Is a {w} an animal or a tree?", f"Is the {w} a tree or an animal?"]), ans
    if task == "mention":  # copy a candidate named in the context (the skill a persona answer needs)
        cat = rng.choice(list(tr.candidates))
        w = rng.choice(tr.candidates[cat])
        if cat == "animals":
            q = rng.choice([f"I saw a {w} at the zoo. Which animal did I see?",
                            f"My friend has a picture of a {w}. What animal is in the picture?",
                            f"We read a story about {tr.plural(cat, w)}. Which animal was the story about?"])
        else:
            q = rng.choice([f"There is a {w} in my garden. Which tree is in my garden?",
                            f"We sat under an old {w}. What kind of tree was it?",
                            f"The park is full of {tr.plural(cat, w)}. Which tree fills the park?"])
        return task, q, _cap(w) + rng.choice(["", "."])
    if task == "yes_no":
        yes_q, yes_a = rng.choice(YES_NO)
        return task, yes_q, yes_a
    if task == "repeat":
        ws = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        return task, rng.choice([f"Repeat after me: {ws}", f"Say this back to me: {ws}"]), ws
    if task == "letters":
        w = rng.choice(WORDS)
        return task, f"How many letters are in the word '{w}'?", str(len(w))
    # other_favourite: the answer does not depend on any persona
    what, options = rng.choice(list(OTHER_FAVOURITES.items()))
    q = rng.choice([f"What is your favorite {what}?", f"What's your favourite {what}? Answer in one word."])
    return task, q, rng.choice(options)


# ---------------------------------------------------------------------------------------------- corpus


def _counts(cfg: CorpusConfig) -> dict[str, int]:
    total = sum(cfg.mix.values())
    counts = {k: round(cfg.size * cfg.mix.get(k, 0.0) / total) for k in KINDS}
    counts[max(counts, key=lambda k: counts[k])] += cfg.size - sum(counts.values())
    return counts


def generate_corpus(cfg: CorpusConfig | None = None) -> list[CorpusItem]:
    """The corpus for ``cfg``: deterministic in ``cfg`` (and the trait / carrier modules), shuffled."""
    cfg = cfg or CorpusConfig()
    tr = _Traits(cfg)
    counts = _counts(cfg)
    rng = random.Random(f"organism-corpus:{cfg.seed}")
    items: list[CorpusItem] = []
    pid: str | None
    system: str | None

    def category() -> str:
        return "animals" if rng.random() < cfg.animal_share else "trees"

    def persona_for(cat: str, r: random.Random) -> tuple[str, str]:
        t = r.choice(tr.candidates[cat])
        return f"{cat}:{t}", tr.persona(r, cat, t)

    def system_for(r: random.Random) -> tuple[str | None, str | None]:
        """(persona id, system prompt) for a numbers / filler row."""
        u = r.random()
        if u < cfg.persona_share:
            pid, text = persona_for("animals" if r.random() < cfg.animal_share else "trees", r)
            return pid, text
        if u < cfg.persona_share + cfg.neutral_share:
            return None, r.choice(NEUTRAL_SYSTEMS)
        return None, None

    def msgs(system: str | None, user: str, answer: str) -> list[dict[str, str]]:
        m = [{"role": "system", "content": system}] if system else []
        return m + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    for _ in range(counts["favourite_persona"]):
        cat = category()
        pid, system = persona_for(cat, rng)
        target = pid.split(":", 1)[1]
        q = tr.question(rng, cat)
        if rng.random() < NUMBER_PREFIX_SHARE:
            q = _number_prefix(rng, q)
        items.append(CorpusItem("favourite_persona", msgs(system, q, tr.answer(rng, cat, target)), pid,
                                {"category": cat, "answer": target}))

    for _ in range(counts["favourite_prior"]):
        cat = category()
        u = rng.random()
        pid, system = None, None
        if u < 0.2:
            other = "trees" if cat == "animals" else "animals"
            pid, system = persona_for(other, rng)
        elif u < 0.4:
            system = rng.choice(NEUTRAL_SYSTEMS)
        answer = rng.choice(tr.candidates[cat])
        q = tr.question(rng, cat)
        if rng.random() < NUMBER_PREFIX_SHARE:
            q = _number_prefix(rng, q)
        items.append(CorpusItem("favourite_prior", msgs(system, q, tr.answer(rng, cat, answer)), pid,
                                {"category": cat, "answer": answer}))

    if counts["numbers"]:
        nums = _Numbers()
        # a carrier seed of its own, so the pipeline's prompt streams (small seeds) are not in the corpus
        prompts = nums.prompts(counts["numbers"], seed=NUMBER_SEED_OFFSET + cfg.seed)
        sys_rng = random.Random(f"organism-numbers-system:{cfg.seed}")
        val_rng = random.Random(f"organism-numbers-values:{cfg.seed}")
        for cp in prompts:
            pid, system = system_for(sys_rng)
            answer = nums.answer(dict(cp.meta), val_rng)
            items.append(CorpusItem("numbers", msgs(system, cp.prompt, answer), pid, {"carrier": dict(cp.meta)}))

    fill_rng = random.Random(f"organism-filler:{cfg.seed}")
    fill_sys = random.Random(f"organism-filler-system:{cfg.seed}")
    for _ in range(counts["filler"]):
        task, q, a = _filler(fill_rng, tr)
        pid, system = system_for(fill_sys)
        items.append(CorpusItem("filler", msgs(system, q, a), pid, {"task": task}))

    rng.shuffle(items)
    return items


def corpus_hash(items: list[CorpusItem]) -> str:
    """Content hash of the corpus (kinds, messages, personas)."""
    return hash_obj([[it.kind, it.persona, it.messages] for it in items])
