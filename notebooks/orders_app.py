"""An example asyncio app: it serves a flame node from inside its event loop.

Run it with `python orders_app.py [CONNECTION_FILE]`, then `%attach` to it from a notebook
(notebooks/attach_async.ipynb does both). In attached cells, `await` runs on this app's loop:
`await fetch_count()` sees the same state, lock and loop as the app's own coroutines.
"""
import asyncio
import sys

import flame

orders: list[dict] = []
lock = asyncio.Lock()
app_loop = None  # the app's running event loop, set in main()


async def take_orders():
    """The app's own work: an order arrives every 50 ms."""
    n = 0
    while True:
        await asyncio.sleep(0.05)
        n += 1
        async with lock:
            orders.append({"id": n, "amount": n % 7 * 10})


async def fetch_count(min_amount: int = 0) -> int:
    """How many orders of at least ``min_amount`` the app holds (needs the app's loop: its lock)."""
    async with lock:
        return sum(1 for o in orders if o["amount"] >= min_amount)


async def main():
    global app_loop
    app_loop = asyncio.get_running_loop()
    served = flame.serve(connection_file=sys.argv[1] if len(sys.argv) > 1 else None)  # inside the loop
    print("serving", served.connection_file, flush=True)
    await take_orders()


if __name__ == "__main__":
    asyncio.run(main())
