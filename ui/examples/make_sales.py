"""Writes ``sales.csv``, the example dataset bundled with the web UI: 120 orders of a small
made-up shop in 2024, drawn with a fixed seed so the file is the same on every run.

    python ui/examples/make_sales.py
"""

from __future__ import annotations

import csv
import datetime
import random
from pathlib import Path

PRODUCTS = {"Notebook": 4.5, "Pen set": 7.0, "Desk lamp": 29.0, "Backpack": 42.0, "Mug": 9.5}
REGIONS = ["North", "South", "East", "West"]
CHANNELS = ["online", "store"]


def rows(n: int = 120, seed: int = 20240) -> list[dict[str, object]]:
    rng = random.Random(seed)
    start = datetime.date(2024, 1, 1)
    out = []
    for i in range(n):
        product = rng.choice(list(PRODUCTS))
        units = rng.randint(1, 12) if product in ("Notebook", "Pen set", "Mug") else rng.randint(1, 4)
        price = PRODUCTS[product]
        out.append({
            "order_id": 1001 + i,
            "date": (start + datetime.timedelta(days=rng.randrange(366))).isoformat(),
            "region": rng.choice(REGIONS),
            "channel": rng.choices(CHANNELS, weights=[3, 2])[0],
            "product": product,
            "units": units,
            "unit_price": price,
            "revenue": round(units * price, 2),
        })
    return sorted(out, key=lambda r: (r["date"], r["order_id"]))


def main() -> None:
    path = Path(__file__).with_name("sales.csv")
    data = rows()
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    print(f"wrote {len(data)} rows to {path}")


if __name__ == "__main__":
    main()
