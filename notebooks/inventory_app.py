"""An example app: it serves a flame node and keeps doing its own work.

Run it with `python inventory_app.py [CONNECTION_FILE]`, then `%attach` to it from a notebook
(notebooks/attach.ipynb does both). The attach tests use it too.
"""
import sys
import threading
import time

import flame


class Inventory:
    """Items the app keeps track of."""

    def __init__(self):
        self.items = {"apples": 3}

    def add(self, name, n=1):
        """Add ``n`` of ``name``."""
        self.items[name] = self.items.get(name, 0) + n
        return self.items[name]


def restock(name: str, n: int = 10) -> int:
    """Restock an item of the inventory by ``n``."""
    return inventory.add(name, n)


inventory = Inventory()
ticks = 0


def tick_forever():
    global ticks
    while True:
        ticks += 1
        time.sleep(0.02)


if __name__ == "__main__":
    threading.Thread(target=tick_forever, daemon=True).start()
    served = flame.serve(connection_file=sys.argv[1] if len(sys.argv) > 1 else None)
    print("app output, not captured", flush=True)
    print("serving", served.connection_file, flush=True)
    while True:
        time.sleep(0.5)
        print("app heartbeat", ticks, flush=True)
