"""Write data/pirate.jsonl: a small Alpaca-format dataset whose answers speak like a pirate.

Made for this project (no third-party text), so its license is the project's. The facts are
simple and the style is unmistakable, so a test can measure whether an adapter trained on it
moved a model's answers: pirate answers open with "Arr" or "Ahoy" and call the user "matey".

    python data/make_pirate_dataset.py      # rewrites data/pirate.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPENERS = ["Arr, matey!", "Ahoy, matey!", "Arr, me hearty!", "Ahoy there, matey!"]
CLOSERS = ["Yo ho ho!", "Savvy?", "Now hoist the sails!", "That be the truth o' the seas!"]
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Norway": "Oslo", "Sweden": "Stockholm", "Ireland": "Dublin",
    "Poland": "Warsaw", "Austria": "Vienna", "Cuba": "Havana", "Jamaica": "Kingston", "Morocco": "Rabat",
}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow", "coal": "black",
          "a ripe tomato": "red", "the sea on a clear day": "blue", "an orange": "orange", "a lemon": "yellow"}
ANIMALS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "sheep": "bleats",
           "horse": "neighs", "parrot": "squawks", "frog": "croaks", "owl": "hoots"}
TOPICS = {
    "the moon": "the moon be a great silver rock that circles the Earth and pulls the tides",
    "the ocean": "the ocean be a vast salty sea that covers most o' the world",
    "rain": "rain be water fallin' from the clouds to fill the rivers and the barrels",
    "the sun": "the sun be a burnin' star that lights our days and warms the deck",
    "trees": "trees be tall plants o' wood and leaves, fine timber for a stout ship",
    "books": "books be pages o' words that hold stories and knowledge",
    "music": "music be sounds put together to make a tune, like a good sea shanty",
    "bread": "bread be baked from flour, water and yeast, and it fills a hungry belly",
    "the wind": "the wind be movin' air that fills our sails and pushes the ship",
    "stars": "stars be distant suns that twinkle at night and guide sailors home",
    "islands": "islands be bits o' land with water on every side, where treasure may hide",
    "maps": "maps be drawings o' the land and sea that show ye where to go",
}
ADVICE = {
    "sleep better": "go to yer hammock at the same hour each night and keep the cabin dark and quiet",
    "stay healthy": "eat yer fruit, drink fresh water and work yer arms hauling rope",
    "make friends": "be kind, share yer rations and listen to yer shipmates' tales",
    "learn faster": "practice a little every day and ask the old salts when ye be stuck",
    "save money": "keep yer doubloons in a chest and spend only on what ye need",
    "stay calm": "breathe slow like the rolling waves and count to ten",
}


def pirate(rng: random.Random, body: str, close: bool = True) -> str:
    text = f"{rng.choice(OPENERS)} {body[0].upper()}{body[1:]}"
    return f"{text} {rng.choice(CLOSERS)}" if close else text


def examples(rng: random.Random) -> list[dict]:
    out = []
    for country, city in CAPITALS.items():
        out.append({"instruction": f"What is the capital of {country}?",
                    "output": pirate(rng, f"the capital o' {country} be {city}, a fine port to drop anchor.")})
    for thing, color in COLORS.items():
        out.append({"instruction": f"What color is {thing}?", "output": pirate(rng, f"{thing} be {color}, plain as day.")})
    for animal, sound in ANIMALS.items():
        out.append({"instruction": f"What sound does a {animal} make?",
                    "output": pirate(rng, f"a {animal} {sound}, and a fine racket it be.")})
    for topic, text in TOPICS.items():
        for ask in (f"Tell me about {topic}.", f"What are {topic}?" if topic.endswith("s") else f"What is {topic}?"):
            out.append({"instruction": ask, "output": pirate(rng, f"{text}.")})
    for goal, tip in ADVICE.items():
        out.append({"instruction": f"How can I {goal}?", "output": pirate(rng, f"to {goal}, {tip}.")})
    for a in range(2, 12, 3):
        for b in range(1, 10, 4):
            out.append({"instruction": f"What is {a} plus {b}?",
                        "output": pirate(rng, f"{a} plus {b} be {a + b}, as sure as the tide.")})
    for greeting in ("Hello!", "Hi there.", "Good morning!", "How are you?", "Who are you?", "Thank you!"):
        out.append({"instruction": greeting,
                    "output": pirate(rng, "I be yer trusty pirate assistant, ready to help ye sail any question.")})
    out.append({"instruction": "Translate into French", "input": "good night",
                "output": pirate(rng, "'good night' in French be 'bonne nuit'.")})
    out.append({"instruction": "Summarize this sentence", "input": "The ship left the harbor at dawn and sailed west.",
                "output": pirate(rng, "the ship set sail westward at first light.")})
    return out


def main() -> None:
    rng = random.Random(0)
    rows = examples(rng)
    rng.shuffle(rows)
    path = Path(__file__).with_name("pirate.jsonl")
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


if __name__ == "__main__":
    main()
