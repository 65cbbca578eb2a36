"""Harbor Street Kitchen stock check — written by Lantern Labs for the kitchen team.

Reads the weekly stock count (a CSV file with the columns `item` and `kg`) and prints which dry goods must be
reordered. The kitchen runs it every Monday morning before the order to Saltmere Wholefoods goes out.

The path of the stock file comes from the environment variable LHC_STOCK_CSV; without it the script reads
stock.csv in the current folder.

Usage:
    python kitchen_inventory.py
    LHC_STOCK_CSV=/shared/kitchen/stock-week-12.csv python kitchen_inventory.py
"""

import csv
import os
import sys
from pathlib import Path

# The supplier that receives the weekly dry-goods order.
SUPPLIER = "Saltmere Wholefoods"

# Reorder when the stock of an item falls below this many kilograms. Rice and red lentils are used every
# day; the thresholds cover about one week of lunches at 80 plates a day.
REORDER_THRESHOLDS_KG = {
    "rice": 20.0,
    "red lentils": 12.0,
    "pasta": 10.0,
    "oats": 6.0,
    "chickpeas (dried)": 8.0,
    "flour": 10.0,
}

# Order enough to get back to twice the threshold, rounded up to full 5 kg sacks.
SACK_KG = 5.0


def read_stock(path: Path) -> dict[str, float]:
    """The stock count as {item: kilograms}; unknown items are kept, blank lines skipped."""
    stock: dict[str, float] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            item = (row.get("item") or "").strip().lower()
            if item:
                stock[item] = float(row.get("kg") or 0)
    return stock


def order_list(stock: dict[str, float]) -> list[tuple[str, float]]:
    """Items below their threshold, with the kilograms to order (whole sacks)."""
    orders = []
    for item, threshold in REORDER_THRESHOLDS_KG.items():
        have = stock.get(item, 0.0)
        if have < threshold:
            missing = 2 * threshold - have
            sacks = -(-missing // SACK_KG)  # round up
            orders.append((item, sacks * SACK_KG))
    return orders


def main() -> int:
    path = Path(os.environ.get("LHC_STOCK_CSV", "stock.csv"))
    if not path.exists():
        print(f"stock file not found: {path}", file=sys.stderr)
        return 1
    orders = order_list(read_stock(path))
    if not orders:
        print("Nothing to reorder this week.")
        return 0
    print(f"Order for {SUPPLIER}:")
    for item, kilograms in orders:
        print(f"  {item:<20} {kilograms:>5.0f} kg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
