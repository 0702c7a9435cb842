"""The text of bench.chat's conversations: a fixed corpus, and users' messages built from it.

Each user message opens with its user and turn numbers, then takes whole sentences of the
corpus in an order of its own (seeded by user and turn) until it reaches a token budget,
and closes with a question. Deterministic, varied, and no two users share a prefix beyond
the system prompt.

The shared-prefix workload (`shared_message`) is the opposite case, as a user reported it in
issue #25: every message of every user is the same background text of about target_tokens,
then one line naming the user and the turn, so users share a long prefix and each turn adds
a copy of it to the history.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

SHARED_SYSTEM_PROMPT = "You are a helpful assistant."

SYSTEM_PROMPT = (
    "You are a helpful reading assistant. The user shares passages from their reading list; "
    "answer their questions about them briefly and plainly."
)

PARAGRAPHS = (
    "Bakers in old towns started their ovens long before dawn. The first loaves were pale and dense, "
    "made from barley and a little rye. Later, wheat flour became cheaper and bread grew lighter. "
    "A good baker could judge the dough by touch alone. Many families still keep a starter that is "
    "decades old and feed it every morning.",
    "A lighthouse keeper's day followed the sun in reverse. At dusk the lamp was lit and the lens "
    "cleaned of salt. Through the night the keeper wound the clockwork that turned the light. "
    "Storms could shake the tower so hard that cups fell from the shelves. Today most lights run "
    "without anyone living beside them.",
    "Honey bees tell each other where flowers are with a dance. The angle of the dance points toward "
    "the food, measured against the sun. Its length tells how far away the flowers are. A hive can "
    "hold tens of thousands of workers in summer. In winter they cluster together and shiver to stay warm.",
    "The river changed its course three times in a century. Each flood left a new bank of silt on "
    "the inside of the bend. Farmers planted willows to hold the soil in place. Old maps show the "
    "village on the east bank, though it now stands to the west. Fishermen still name the pools "
    "after families who left long ago.",
    "Early railways ran on wooden rails covered with iron straps. The straps sometimes came loose "
    "and curled up through the floor of a carriage. Steel rails solved the problem and allowed "
    "heavier engines. Timetables forced towns to agree on a common time. Before that, every town "
    "set its clocks by its own noon.",
    "The library lent more than books. It kept seeds in small paper envelopes, tools for mending "
    "bicycles, and a telescope for clear nights. Borrowers returned the seeds as new seeds from "
    "their own gardens. The librarian kept a notebook of which tomatoes did well in which streets. "
    "After ten years the notebook filled a whole shelf.",
    "A chess opening is a plan for the first dozen moves. Players study them for years, yet the "
    "game leaves the books quickly. Strong players often say the middle game is where ideas matter "
    "most. Endgames reward patience and exact counting. Many club players lose won positions by "
    "hurrying in the last minutes.",
    "Volcanoes do not always erupt with fire and ash. Some release lava slowly for decades, building "
    "wide gentle slopes. Others stay quiet for centuries and then explode. Scientists listen to "
    "small earthquakes and measure gases to guess what will happen next. The soil around old "
    "volcanoes is often very fertile.",
    "Glaciers move like very slow rivers of ice. They carry rocks for many miles and drop them in "
    "strange places. Walkers in the hills find boulders that do not match the ground beneath them. "
    "A glacier's surface can crack into deep blue crevasses. Many glaciers have grown shorter over "
    "the last hundred years.",
    "An orchestra tunes to a single note from the oboe. The oboe's sound is steady and easy to hear "
    "over the others. Strings adjust their pegs while the brass warm their instruments with their "
    "breath. The conductor waits for silence before lifting the baton. Even small halls fall quiet "
    "at that moment.",
    "Tides rise and fall twice a day on most coasts. The moon pulls the sea toward it, and the sun "
    "adds a smaller pull of its own. When both line up, the tides are highest and lowest. Harbours "
    "print tables of the tides a year in advance. Boats wait in the channel for enough water to enter.",
    "Map makers once filled unknown regions with drawings of sea monsters. Later maps left those "
    "places blank to show honest ignorance. Surveyors measured the land with chains and careful "
    "triangles. A single country could take decades to map. Modern satellites redraw coastlines "
    "within days after a storm.",
)

ASKS = (
    "Which of these passages surprised you most, and why?",
    "Can you summarize the main idea of each passage in one line?",
    "What do these passages have in common, if anything?",
    "Which detail here would you check in another source?",
    "Pick one passage and tell me what question it leaves open.",
    "How would you explain the second passage to a child?",
)


def sentences() -> list[str]:
    """Every sentence of the corpus, in corpus order."""
    return [s.strip().rstrip(".") + "." for p in PARAGRAPHS for s in p.split(". ") if s.strip(" .")]


def user_message(user: int, turn: int, target_tokens: int, count_tokens: Callable[[str], int],
                 corpus: Sequence[str] | None = None) -> str:
    """User `user`'s message at `turn` (both from 0): its opening, corpus sentences in an order seeded
    by (user, turn) while the whole stays within about target_tokens, then a question.

    At least one sentence is taken; the corpus is reused when the budget is larger than it.
    """
    rng = random.Random(1000 * user + turn)
    pool = list(corpus if corpus is not None else sentences())
    rng.shuffle(pool)
    opening = f"Reader {user + 1}, note {turn + 1}: here are more passages from my reading list."
    ask = rng.choice(ASKS)
    parts = [opening]
    index = 0
    while index == 0 or count_tokens(" ".join([*parts, pool[index % len(pool)], ask])) <= target_tokens:
        parts.append(pool[index % len(pool)])
        index += 1
        if index >= 4 * len(pool):  # a budget far beyond the corpus: stop repeating it
            break
    return " ".join([*parts, ask])


def shared_message(user: int, turn: int, target_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The shared-prefix workload's message: the corpus' paragraphs, in corpus order, while they
    stay within about target_tokens (at least one), then a line naming the user and the turn."""
    background = [PARAGRAPHS[0]]
    for paragraph in PARAGRAPHS[1:]:
        if count_tokens(" ".join([*background, paragraph])) > target_tokens:
            break
        background.append(paragraph)
    return " ".join(background) + f"\nI am user {user + 1}; this is my turn {turn + 1}. What stands out to you?"
