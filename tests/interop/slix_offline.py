#!/usr/bin/python3
"""slixmpp interop: offline delivery of pubsub items (RFC 8600 §6), end to end.

The owner creates an open IODEF topic; the subscriber logs in, sends presence,
subscribes and logs out. The owner publishes --count items. The subscriber logs in
again (new connection, new resource) and sends presence: it must receive all of
them, in publish order, each once, each with an XEP-0203 <delay/> stamped by the
broker with a time no earlier than the publication round began. Items published
after that arrive live, without a delay stamp.

Round two: the subscriber stays connected but sends unavailable presence, the
owner publishes more, the subscriber becomes available again: only the new items
are replayed (delayed), nothing from round one again. Round three: as round two,
but one of the items is retracted before the subscriber returns: it is not replayed.

Prints one line per check; exit 0 only if all passed, 1 otherwise, 2 on timeout.
"""
import asyncio
import datetime

from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004 import Form

import iodefdoc
from gridclient import GridClient, common_args, err, run_main
from pubsubcheck import Checks, Fatal

NS_DELAY = "urn:xmpp:delay"


def parse():
    p = common_args(__doc__)
    p.add_argument("--owner", required=True)
    p.add_argument("--subscriber", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--broker", default="broker.grid.test")
    p.add_argument("--node", default="offline-iodef")
    p.add_argument("--count", type=int, default=8, help="items published while the subscriber is away")
    p.add_argument("--step-timeout", type=float, default=5.0)
    return p.parse_args()


class Received:
    """Item notifications as (item id, delay stamp or None, delay from or None, payload)."""

    def __init__(self):
        self.items = []
        self.changed = asyncio.Event()

    def on_publish(self, msg):
        delay = msg.xml.find(f"{{{NS_DELAY}}}delay")
        # Not `for it in ...["items"]`: slixmpp's stanza iterators keep their position
        # on the stanza, and the plugin is iterating this one while it calls us.
        for it in msg["pubsub_event"]["items"].iterables:
            self.items.append((it["id"], delay.get("stamp") if delay is not None else None,
                               delay.get("from") if delay is not None else None, it["payload"]))
        self.changed.set()

    async def until(self, n, timeout):
        """Waits until at least n notifications arrived; returns whether they did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.items) < n:
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return True


def stamp_time(s):
    """An XEP-0082 DateTime as an aware datetime (None if unparsable)."""
    try:
        return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None


def subscriber(args, received):
    c = GridClient(args.subscriber, args.password, args, mech="PLAIN")
    for p in ("xep_0030", "xep_0004", "xep_0060"):
        c.register_plugin(p)
    c.add_event_handler("pubsub_publish", received.on_publish)
    return c


async def publish(c, owner, args, ids, docs, T):
    for item_id in ids:
        docs[item_id] = iodefdoc.document(item_id)
        try:
            await owner["xep_0060"].publish(args.broker, args.node, id=item_id, payload=docs[item_id], timeout=T)
        except (IqError, IqTimeout) as e:
            raise Fatal(f"publish {item_id}: {err(e)}")
    c.check(True, f"owner published {len(ids)} items", f"{ids[0]} .. {ids[-1]}")


def check_replay(c, what, got, ids, docs, since, args):
    got_ids = [g[0] for g in got]
    c.check(got_ids == ids, f"{what}: every item once, in publish order", str(got_ids))
    undelayed = [g[0] for g in got if g[1] is None]
    c.check(not undelayed, f"{what}: each carries an XEP-0203 delay", f"without: {undelayed}")
    times = [stamp_time(g[1]) for g in got if g[1] is not None]
    c.check(all(t is not None for t in times), f"{what}: delay stamps are XEP-0082 DateTimes", str([g[1] for g in got]))
    times = [t for t in times if t is not None]
    now = datetime.datetime.now(datetime.timezone.utc)
    slack = datetime.timedelta(seconds=2)
    c.check(all(since - slack <= t <= now + slack for t in times) and times == sorted(times),
            f"{what}: stamps are the publication times, non-decreasing",
            f"published from {since.isoformat()}, stamps {[g[1] for g in got]}")
    c.check(all(g[2] == args.broker for g in got if g[1] is not None), f"{what}: delay from the broker",
            str({g[2] for g in got}))
    bad = [g[0] for g in got if g[0] in docs and not iodefdoc.same(docs[g[0]], g[3])[0]]
    c.check(not bad, f"{what}: payloads intact", str(bad))


async def run(args):
    c = Checks()
    T = args.step_timeout
    owner = GridClient(args.owner, args.password, args, mech="PLAIN")
    for p in ("xep_0030", "xep_0004", "xep_0060"):
        owner.register_plugin(p)
    owner.start()
    await owner.session
    try:
        await flow(c, args, owner, T)
    except Fatal as e:
        c.check(False, "flow stopped", str(e))
    await asyncio.wait([owner.disconnect()], timeout=3)
    return c.code()


async def flow(c, args, owner, T):
    form = Form()
    form["type"] = "submit"
    form.add_field(var="pubsub#type", value=iodefdoc.IODEF_NS)
    form.add_field(var="pubsub#access_model", value="open")
    try:
        await owner["xep_0060"].create_node(args.broker, args.node, config=form, timeout=T)
    except (IqError, IqTimeout) as e:
        raise Fatal(f"create: {err(e)}")

    # Subscribe, then leave.
    first = Received()
    sub = subscriber(args, first)
    sub.start()
    await sub.session
    sub.send_presence()
    try:
        r = await sub["xep_0060"].subscribe(args.broker, args.node, bare=True, timeout=T)
        c.check(r["pubsub"]["subscription"]["subscription"] == "subscribed", "subscriber subscribes")
    except (IqError, IqTimeout) as e:
        raise Fatal(f"subscribe: {err(e)}")
    gone = asyncio.get_running_loop().create_future()
    sub.add_event_handler("disconnected", lambda *_: gone.done() or gone.set_result(True))
    sub.disconnect()
    await asyncio.wait_for(gone, T)
    c.check(True, "subscriber logged out")

    # Published while nobody is there.
    docs = {}
    since = datetime.datetime.now(datetime.timezone.utc)
    away = [f"away-{n}" for n in range(1, args.count + 1)]
    await publish(c, owner, args, away, docs, T)
    c.check(first.items == [], "nothing reached the old session", str([g[0] for g in first.items]))

    # Back: log in, presence, and the backlog arrives.
    received = Received()
    sub = subscriber(args, received)
    sub.start()
    await sub.session
    c.check(received.items == [], "nothing before initial presence", str([g[0] for g in received.items]))
    sub.send_presence()
    await received.until(len(away), T)
    await asyncio.sleep(1.0)  # duplicates would show up here
    check_replay(c, "offline delivery after login", received.items, away, docs, since, args)

    # Live again.
    live = ["live-1", "live-2"]
    await publish(c, owner, args, live, docs, T)
    await received.until(len(away) + len(live), T)
    await asyncio.sleep(0.5)
    tail = received.items[len(away):]
    c.check([g[0] for g in tail] == live, "live items after the backlog: each once, in order", str([g[0] for g in tail]))
    c.check(all(g[1] is None for g in tail), "live items carry no delay stamp", str([g[1] for g in tail]))

    # Round two: unavailable presence on the same connection.
    sub.send_presence(ptype="unavailable")
    await sub["xep_0030"].get_info(jid=args.broker, timeout=T)  # the presence has been processed
    before = len(received.items)
    since = datetime.datetime.now(datetime.timezone.utc)
    again = [f"again-{n}" for n in range(1, 4)]
    await publish(c, owner, args, again, docs, T)
    await asyncio.sleep(0.5)
    c.check(len(received.items) == before, "nothing delivered while unavailable",
            str([g[0] for g in received.items[before:]]))
    sub.send_presence()
    await received.until(before + len(again), T)
    await asyncio.sleep(1.0)
    check_replay(c, "offline delivery after available presence", received.items[before:], again, docs, since, args)

    # Round three: an item retracted while the subscriber is away is not replayed.
    sub.send_presence(ptype="unavailable")
    await sub["xep_0030"].get_info(jid=args.broker, timeout=T)
    before = len(received.items)
    since = datetime.datetime.now(datetime.timezone.utc)
    third = ["third-1", "third-2", "third-3"]
    await publish(c, owner, args, third, docs, T)
    try:
        await owner["xep_0060"].retract(args.broker, args.node, "third-2", timeout=T)
    except (IqError, IqTimeout) as e:
        raise Fatal(f"retract: {err(e)}")
    sub.send_presence()
    await received.until(before + 2, T)
    await asyncio.sleep(1.0)
    check_replay(c, "offline delivery after a retraction", received.items[before:], ["third-1", "third-3"], docs, since, args)

    all_ids = [g[0] for g in received.items]
    c.check(len(all_ids) == len(set(all_ids)), "no item delivered twice over the whole run", str(all_ids))
    await asyncio.wait([sub.disconnect()], timeout=3)


if __name__ == "__main__":
    run_main(run, parse())
