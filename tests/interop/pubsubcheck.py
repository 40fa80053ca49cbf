"""Bookkeeping shared by the interop scripts (imported, not run): named
checks printed as they happen, an inbox of notifications to wait on, and
the way an asyncio script runs under its deadline.
"""
import asyncio
import logging
import sys


def run_script(run, args):
    """Runs `run(args)` under `args.timeout` and exits: 0 passed, 1 failed, 2 timed out."""
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        code = asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except asyncio.TimeoutError:
        print(f"FAIL: timed out after {args.timeout}s")
        code = 2
    except Exception as e:  # connection, TLS, SASL or stanza errors
        print(f"FAIL: {type(e).__name__}: {e}")
        code = 1
    print("OK" if code == 0 else f"exit {code}")
    sys.exit(code)


class Checks:
    """Records named checks; `failed` counts the failures."""

    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, ok, step, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {step}" + (f"  -- {detail}" if detail else ""), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {step}" + (f"  -- {detail}" if detail else ""), flush=True)
        return ok

    def code(self):
        print(f"{self.passed} passed, {self.failed} failed", flush=True)
        return 1 if self.failed else 0


class Fatal(Exception):
    """A step that later steps depend on failed."""


class Inbox:
    """Notifications received, in order; `wait` takes the first unconsumed match."""

    def __init__(self):
        self.items = []        # (kind, value), in arrival order
        self.consumed = set()  # indexes already handed out
        self._changed = asyncio.Event()

    def put(self, kind, value):
        self.items.append((kind, value))
        self._changed.set()

    async def wait(self, pred, timeout):
        """The first unconsumed (kind, value) with pred(kind, value), or None after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, (kind, value) in enumerate(self.items):
                if i not in self.consumed and pred(kind, value):
                    self.consumed.add(i)
                    return kind, value
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def unconsumed(self):
        return [self.items[i] for i in range(len(self.items)) if i not in self.consumed]
