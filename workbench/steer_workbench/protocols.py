"""The experiments' protocol: the concepts steering is measured on, the prompt sets, the grids of
strengths and doses and the bars that several of the workbench's tools share, so that the strength
sweep, the concept clamps, the difference-of-means vectors, the layer scan and the efficacy run
measure the same things the same way. Constants only; imports nothing from the workbench.

The prompt sets are kept apart: settings are tuned on SWEEP_PROMPTS and judged on NEUTRAL_PROMPTS
and JOURNEY_QUESTIONS, which no tuning sees. The measurements behind the choices are in the reports
under docs/ (docs/reports/workbench-settings.md lists them by constant).
"""

from __future__ import annotations

CONCEPTS = {  # concept (the search query) -> keywords, singular: a plural "s"/"es" is matched too
    "dogs": ["dog", "puppy", "puppies", "canine"],
    "cats": ["cat", "kitten", "feline", "kitty"],
    "horses": ["horse", "equine", "pony", "ponies"],
    "birds": ["bird", "eagle", "parrot", "sparrow"],
    "fish": ["fish", "fishing", "salmon", "trout"],
    "the sea": ["sea", "ocean", "marine", "wave", "beach", "coast"],
    "rivers": ["river", "stream"],
    "mountains": ["mountain", "mountainous", "peak", "hiking"],
    "football": ["football", "soccer", "goal"],
    "music": ["music", "musical", "song", "melody", "singer"],
    "food": ["food", "cooking", "cuisine", "meal", "recipe"],
    "wine": ["wine", "vineyard"],
    "coffee": ["coffee", "espresso", "caffeine", "latte"],
    "space": ["planet", "galaxy", "galaxies", "orbit", "astronomy", "star", "space"],
    "war": ["war", "battle", "army", "military", "soldier"],
    "religion": ["god", "church", "religion", "religious", "prayer"],
    "computers": ["computer", "software", "programming", "code"],
    "money": ["money", "currency", "bank", "dollar", "finance"],
    "medicine": ["disease", "medical", "medicine", "doctor", "patient", "surgery", "hospital", "nurse"],
    "France": ["france", "french", "paris"],
    "Japan": ["japan", "japanese", "tokyo"],
    "China": ["china", "chinese", "beijing", "shanghai"],
    "trees": ["tree", "forest", "wood"],
    "weather": ["rain", "weather", "storm", "snow", "sunny"],
    "fire": ["fire", "flame", "burning"],
    "chemistry": ["chemical", "chemistry", "chemist", "molecule", "atom"],
    "painting": ["painting", "painter", "paint", "canvas"],
    "film": ["film", "movie", "cinema"],
    "railways": ["railway", "train", "locomotive"],
    "mathematics": ["mathematics", "mathematical", "equation", "theorem", "math"],
    "pizza": ["pizza"],
    "chocolate": ["chocolate", "cocoa"],
    "flowers": ["flower", "rose", "bloom", "garden"],
    "cars": ["car", "vehicle", "driving", "engine"],
}
"""The concepts of the efficacy run and the comparison, each a name a reader recognises and the words
that show it in a reply; the strength sweep, the concept clamps and the layer scan are built for
them. The everyday searches of JOURNEY are among them, except books (a neutral prompt asks for a
favourite book, so unsteered replies name it) and rain, the ocean and trains, which are weather, the
sea and railways here."""
JOURNEY = {  # what a person might type into the search box -> keywords that show it in a reply
    "dogs": CONCEPTS["dogs"], "cats": CONCEPTS["cats"], "coffee": CONCEPTS["coffee"],
    "pizza": CONCEPTS["pizza"], "chocolate": CONCEPTS["chocolate"], "football": CONCEPTS["football"],
    "music": CONCEPTS["music"], "the ocean": CONCEPTS["the sea"], "space": CONCEPTS["space"],
    "trains": CONCEPTS["railways"], "rain": ["rain", "rainy", "umbrella", "storm"],
    "books": ["book", "novel", "reading", "library"], "flowers": CONCEPTS["flowers"],
    "cars": CONCEPTS["cars"], "money": CONCEPTS["money"],
}
"""The user's journey of the efficacy run: everyday words a person would search for, each clamped as
the search offers it on JOURNEY_QUESTIONS. The strength sweep and the concept clamps are built for
these queries too."""

TUNING_PROMPTS = (
    "What are you up to today?", "Write two sentences about anything you like.", "What is on your mind?",
    "Describe your perfect afternoon.", "Tell me something about yourself.", "What did you do last summer?",
    "Give me an idea for a fun day out.", "What is a good way to relax?",
)
"""Open prompts the strengths, the concept clamps' doses and the layer scan are tuned on: any topic
may come next, so what a reply turns to is what the clamp brings."""
CONFIRM_PROMPTS = (
    "What would you like to talk about?", "Write a short note to a friend.", "What is something you are looking forward to?",
    "Tell me something that made you smile.", "What would you do with a free day?", "Share a thought about everyday life.",
    "What is a small thing that makes a day better?", "Describe a memorable moment.",
)
"""Eight more prompts of the same kind, on which every cell that could be recommended is run before the
recommendation (strengths.confirmed): a feature has 10-14 cells, and the best of them on eight
prompts alone is often the luckiest, not the setting that steers."""
SWEEP_PROMPTS = TUNING_PROMPTS + CONFIRM_PROMPTS
"""All the prompts a recommended setting is measured on."""
NEUTRAL_PROMPTS = (
    "Tell me about your weekend.", "What is your favourite book?", "What should I do this evening?",
    "Tell me a short story.", "Describe your ideal holiday.", "What is something interesting you learned recently?",
    "Give me some advice for tomorrow.", "What makes you happy?", "How would you cheer up a friend?",
    "What is your favourite season and why?",
)
"""The efficacy run's questions, about nothing in CONCEPTS: a question whose unsteered replies name a
concept (a dinner for a friend names food) would keep that concept above BASELINE_MAX whatever a
clamp does."""
JOURNEY_QUESTIONS = (
    "How do I boil an egg?", "What's a good way to start the morning?", "Can you recommend a weekend activity?",
    "How can I be more productive at work?", "What should I name my new goldfish?",
    "Give me a tip for a job interview.", "How do I keep my room tidy?", "What's a good gift for my mother?",
)
"""Ordinary questions the user's journey asks with the clamp a search offered: what a person asks a
chat model, not a prompt to write about anything."""

SCOPES = ("all", "generated")
"""Token scopes every strength and dose is swept on besides the prompt scope: clamping only the
positions that produce the reply leaves the question as the model read it, which keeps replies more
fluent and changes how often they show the feature (more often for some features, less for others)."""
DOSES = (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5)
"""Doses a difference-of-means vector or a concept clamp is tuned over on SCOPES (× the layer's
median stream norm): none past 0.5, where replies loop at every layer, and steps of 1/16 where the
concepts first show, since a step of 1/8 often takes a concept clamp from too weak to looping at once."""
PROMPT_DOSES = (0.5, 0.75, 1.0, 1.5, 2.0)
"""Doses tuned on the prompt scope (the question's positions only), where the reply is the unsteered
model's own and stays fluent at doses that wreck a clamp on every position; the grid spans what the
single features recommended on that scope add to the stream."""
DOSE_GRID = tuple((a, t) for t in SCOPES for a in DOSES) + tuple((a, "prompt") for a in PROMPT_DOSES)
"""The (dose, token scope) settings a vector or a concept clamp is tuned over."""

MAX_PPL_RATIO = 3.0
"""Fluency: the median perplexity of a cell's replies under the unsteered model at most this multiple
of unsteered replies' (the sweep's `fluent`, the efficacy bar, the layer scan)."""
MIN_TRIGRAMS = 0.8
"""Fluency: at least this share of a cell's word trigrams distinct (a pushed small model loops)."""
BASELINE_MAX = 0.10
"""The efficacy bar: a concept counts only where at most this share of unsteered replies name it."""
STEERED_MIN = 0.60
"""The efficacy bar: the share of steered replies that name the concept, fluently (MAX_PPL_RATIO); the
layer scan counts a cell at this rate too."""
