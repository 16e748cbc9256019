"""Synthetic training rows: distinct texts of a few words each."""
WORDS = ["apple", "banana", "cherry", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


def toy_rows(n, num_negatives=0, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 4)
        row = {"query": f"{words[0]} {words[1]} {i}", "positive": f"{words[1]} {words[2]} {words[3]} {i}"}
        for h in range(num_negatives):
            row["negative" if h == 0 else f"negative_{h}"] = f"{rng.choice(WORDS)} {rng.choice(WORDS)} n{i}{h}"
        rows.append(row)
    return rows
